"""Find the COCO objects a caption mentions, by the official CHAIR rules (the default) or by our fixed ones.

``extract_objects(caption, rules)`` dispatches: ``"official"`` reproduces the official code (see `official.py`),
``"fixed"`` is our corrected reading, described here: tokenize, singularize, merge phrases, look words up.

Everything is offline and rule-based (no nltk data, no pattern), so CHAIR scores do not depend on what a machine
happens to have downloaded. The steps, in order:

1. lowercase; tokens are runs of letters, digits and apostrophes (punctuation and hyphens split words); a trailing
   possessive ``'s`` or ``'`` is dropped ("man's" -> "man");
2. every token is singularized with `singularize`;
3. phrases are merged greedily left to right, longest first (up to three words): multi-word surface forms
   ("traffic light", "hot dog", "stove top oven"), modifier phrases ("toilet seat" -> toilet, "passenger jet" ->
   airplane, "passenger train" -> train, "baby"/"adult" + an animal or person word -> that word) and phrases that
   name no object ("home plate", "train track"), which consume their words so that "train" yields nothing;
4. each remaining word or merged phrase is looked up in `SURFACE_FORMS`;
5. the toilet/seat rule of the original code: when a caption mentions a toilet, a bare "seat" is the toilet's seat,
   not a chair, so it yields no mention ("the seat of the toilet is up").

Repeated mentions of one category stay separate mentions: CHAIR_i counts mentions, not categories.
"""

from __future__ import annotations

import re

from .mention import Mention
from .official import official_mentions
from .vocab import LIVING_CATEGORIES, NON_OBJECT_PHRASES, SURFACE_FORMS

# ---------------------------------------------------------------------------------------------------------------
# singularizer
# ---------------------------------------------------------------------------------------------------------------

# words that end in "s" (or look plural) but are already singular, or have one form for both
_INVARIANT = frozenset(
    """
    sheep deer fish moose bison swine salmon trout aircraft spacecraft hovercraft cattle police offspring series
    species news means scissors pants jeans trousers binoculars goggles pliers tongs headquarters barracks
    crossroads gallows measles mumps diabetes rabies herpes physics mathematics economics athletics gymnastics
    politics ethics chaos cosmos ethos pathos kudos thermos asbestos rhinoceros pancreas canvas atlas alias bias
    gas lens christmas texas kansas arkansas has was does goes this yes whereas always perhaps sometimes
    """.split()
)

# plural -> singular where no rule applies
_IRREGULAR = {
    "people": "person",
    "men": "man",
    "women": "woman",
    "children": "child",
    "mice": "mouse",
    "lice": "louse",
    "geese": "goose",
    "teeth": "tooth",
    "feet": "foot",
    "oxen": "ox",
    "skis": "ski",
    "busses": "bus",
    "axes": "axe",
    "quizzes": "quiz",
    "lives": "life",
    "elves": "elf",
    "cacti": "cactus",
    "fungi": "fungus",
    "octopi": "octopus",
    "hippopotami": "hippopotamus",
    "alumni": "alumnus",
    "antennae": "antenna",
    "larvae": "larva",
    "bacteria": "bacterium",
    "criteria": "criterion",
    "phenomena": "phenomenon",
    "crises": "crisis",
    "oases": "oasis",
    "analyses": "analysis",
    "theses": "thesis",
    "hypotheses": "hypothesis",
    "diagnoses": "diagnosis",
    "indices": "index",
    "matrices": "matrix",
    "vertices": "vertex",
    "appendices": "appendix",
}

# irregular endings that also hold inside compounds ("pocketknives", "bookshelves", "policemen", "grandchildren")
_IRREGULAR_SUFFIXES = (
    ("knives", "knife"),
    ("wives", "wife"),
    ("shelves", "shelf"),
    ("selves", "self"),
    ("leaves", "leaf"),
    ("loaves", "loaf"),
    ("wolves", "wolf"),
    ("halves", "half"),
    ("calves", "calf"),
    ("thieves", "thief"),
    ("scarves", "scarf"),
    ("hooves", "hoof"),
    ("dwarves", "dwarf"),
    ("wharves", "wharf"),
    ("children", "child"),
    ("people", "person"),
    ("buses", "bus"),
)

# words ending in "men" that are not plurals of "-man"
_NOT_MEN_PLURALS = frozenset(
    "omen amen abdomen specimen stamen semen regimen ramen lumen hymen bitumen acumen albumen yemen foramen".split()
)

# singulars ending in "ie" ("collies" -> "collie", not "colly"); short ones ("ties", "pies") are handled by length
_IE_SINGULARS = frozenset(
    """
    collie doggie magpie necktie bowtie cookie movie zombie hippie brownie smoothie goalie selfie rookie birdie
    hoodie veggie calorie prairie pixie beanie bootie sweetie cutie auntie budgie walkie talkie genie newbie
    yuppie hottie roomie boogie junkie groupie sortie lingerie kiddie pinkie lassie beastie bookie freebie foodie
    techie indie aussie oldie quickie stogie sharpie koozie onesie barbie
    """.split()
)

# singulars ending in "o" whose plural adds "es" ("buffaloes"); other "-oes" words just drop "s" ("canoes")
_O_ES_SINGULARS = frozenset(
    "potato tomato hero mango volcano echo torpedo domino mosquito buffalo flamingo tornado cargo veto".split()
)

# singulars ending in "che" ("headaches"); other "-ches" drop "es" ("benches", "sandwiches")
_CHE_SINGULARS = frozenset(
    """
    ache headache stomachache toothache earache backache heartache bellyache mustache moustache niche cache
    quiche cliche avalanche creche psyche attache panache douche tranche ganache microfiche
    """.split()
)

# singulars ending in "s" whose plural adds "es" ("walruses", "lenses")
_S_ES_SINGULARS = frozenset(
    """
    bus gas lens canvas atlas alias bias iris octopus cactus virus campus bonus circus walrus platypus citrus
    asparagus lotus hippopotamus syllabus status focus census chorus genius sinus thermos rhinoceros fetus abacus
    hibiscus eucalyptus
    """.split()
)

# singulars ending in "i" or "u", so their plural ends in "is"/"us" yet must drop the "s" ("taxis", "zebus")
_I_U_SINGULARS = frozenset(
    """
    ski taxi kiwi corgi bikini martini zucchini safari chili yeti mini semi alibi deli sushi wiki khaki bonsai
    tsunami salami origami tiki rabbi yogi panini pepperoni broccoli hibachi tatami sari lei wasabi samurai
    menu emu gnu tutu haiku tofu guru bayou caribou tiramisu zebu kudzu
    """.split()
)


def singularize(word: str) -> str:
    """The singular of an English noun, by rules and exception lists (lowercase in, lowercase out).

    Built for caption nouns, not for every English word: a verb such as "holds" becomes "hold", which is harmless
    because only table forms are ever looked up.
    """
    word = word.lower()
    if len(word) <= 2 or word in _INVARIANT:
        return word
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    for plural, singular in _IRREGULAR_SUFFIXES:
        if word.endswith(plural):
            return word[: -len(plural)] + singular
    if word.endswith("men") and word not in _NOT_MEN_PLURALS:
        return word[:-3] + "man"
    if not word.endswith("s"):
        return word
    stem = word[:-1]
    if word.endswith(("ss", "us", "is")):
        return stem if stem in _I_U_SINGULARS else word
    if word.endswith("ies"):
        return stem if stem in _IE_SINGULARS or len(word) <= 4 else word[:-3] + "y"
    if word.endswith("oes"):
        return word[:-2] if word[:-2] in _O_ES_SINGULARS else stem
    if word.endswith("es"):
        if stem in _CHE_SINGULARS:
            return stem
        if word.endswith(("sses", "shes", "ches", "xes", "zzes")) or word[:-2] in _S_ES_SINGULARS:
            return word[:-2]
    return stem


# ---------------------------------------------------------------------------------------------------------------
# tokens and phrases
# ---------------------------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_MODIFIERS = ("baby", "adult")
# what "baby"/"adult" may modify: forms of living categories, plus words for animals that are not COCO objects
_MODIFIABLE = frozenset({"animal", "cub"}).union(
    w for w, c in SURFACE_FORMS.items() if c in LIVING_CATEGORIES and " " not in w
)


def _phrase_key(phrase: str) -> tuple[str, ...]:
    return tuple(singularize(w) for w in phrase.split())


# singularized word tuple -> (surface form, category or None); built once from the table
_PHRASES: dict[tuple[str, ...], tuple[str, str | None]] = {
    _phrase_key(form): (form, category) for form, category in SURFACE_FORMS.items() if " " in form
}
_PHRASES.update({_phrase_key(p): (p, None) for p in NON_OBJECT_PHRASES})
_MAX_PHRASE = max(len(k) for k in _PHRASES)


def tokenize(caption: str) -> list[str]:
    """Lowercase words of a caption (letters, digits, inner apostrophes), possessive endings dropped."""
    text = caption.lower().replace("\u2019", "'").replace("\u2018", "'")
    words = []
    for token in _TOKEN.findall(text):
        if token.endswith("'s"):
            token = token[:-2]
        words.append(token)
    return words


def _lookup(singular: str, raw: str) -> tuple[str, str] | None:
    """(form, category) for one word: its singular first, then the word as written (a singularizer miss)."""
    for form in (singular, raw):
        if form in SURFACE_FORMS:
            return form, SURFACE_FORMS[form]
    return None


DEFAULT_CHAIR_RULES = "official"
# each rule set, as summaries and reports describe it
CHAIR_RULES: dict[str, str] = {
    "official": "official CHAIR code (nltk tokens, pattern singularize: bus/ties never count, hyphenated words whole, "
    "baby/adult only with its listed animals)",
    "fixed": "lvlm-steer's corrected reading (bus, ties, split hyphens, baby/adult with any animal, motor bike, "
    "cheesecake, iPhone, hair dryer, stove top oven)",
}


def check_rules(rules: str) -> str:
    """``rules`` if it names a rule set, else a ValueError naming both."""
    if rules not in CHAIR_RULES:
        raise ValueError(f"unknown CHAIR rules {rules!r}; choose 'official' (as published) or 'fixed' (ours)")
    return rules


def extract_objects(caption: str, rules: str = DEFAULT_CHAIR_RULES) -> list[Mention]:
    """The COCO object mentions of a caption, in caption order, by the ``official`` or the ``fixed`` rules."""
    if check_rules(rules) == "official":
        return official_mentions(caption)
    return fixed_mentions(caption)


def fixed_mentions(caption: str) -> list[Mention]:
    """The COCO object mentions of a caption by our fixed rules (see the module docstring)."""
    raw = tokenize(caption)
    words = [singularize(w) for w in raw]
    mentions: list[Mention] = []
    i = 0
    while i < len(words):
        span, hit = 1, None
        for n in range(min(_MAX_PHRASE, len(words) - i), 1, -1):
            entry = _PHRASES.get(tuple(words[i : i + n]))
            if entry is not None:
                span, hit = n, entry
                break
        if hit is None and words[i] in _MODIFIERS and i + 1 < len(words) and words[i + 1] in _MODIFIABLE:
            found = _lookup(words[i + 1], raw[i + 1])
            span, hit = 2, (f"{words[i]} {words[i + 1]}", found[1] if found else None)
        if hit is None:
            hit = _lookup(words[i], raw[i])
        if hit is not None and hit[1] is not None:
            mentions.append(Mention(word=hit[0], category=hit[1], index=i))
        i += span
    if any(m.category == "toilet" for m in mentions):
        mentions = [m for m in mentions if m.word != "seat"]
    return mentions
