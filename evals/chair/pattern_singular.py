"""The singularizer of the official CHAIR code (``pattern.en.singularize``, Pattern 2.6), re-implemented for
``--chair-rules official``, quirks included, because published CHAIR numbers were computed through them.

Pattern is not a dependency (it does not install on current Python without a C toolchain and a database client);
this module reproduces the behaviour of its noun singularizer on lowercase tokens, step by step:

1. a word that is the *ending* of a listed uninflected or uncountable word comes back unchanged (the list test is
   "listed word ends with the token", so "ice" is kept because of "rice", "s" because of "species");
2. a word ending in a listed "-ie" plural comes back unchanged, still plural ("cookies", "collies", "doggies":
   Pattern returns the lowercased input there, not its singular); its "^pie" and "^tie" entries never match
   (a literal "^" in an ``endswith`` test), so "pies" -> "py" and "ties" -> "ty" by the "-ies" rule below;
3. irregular endings ("men" -> "man", "people" -> "person", "children" -> "child", "feet" -> "foot", also
   "our" -> "my", so "four" -> "fmy");
4. the first matching suffix rule of an ordered list; the last one drops any final "s", so "bus" -> "bu",
   "glass" -> "glas", "tennis" -> "tenni", "octopus" -> "octopu"; "[octop|vir]i" is a character class, so
   "safari" -> "safarus"; "-ta"/"-ia" become "-tum"/"-ium" ("pasta" -> "pastum"); "-oes" drops "es"
   ("canoes" -> "cano", "toes" -> "to").

Not reproduced, because no such token can ever be a CHAIR form: Pattern's recursion into hyphenated compounds
("mothers-in-law") and its "dogs'" -> "dog's" rule. Both keep the "-" or "'" in the result, and no form has either,
so we return such words unchanged. ``tests/test_chair.py`` checks the rules word by word.
"""

from __future__ import annotations

import re

# step 1: Pattern's uninflected and uncountable lists, as Pattern has them (two entries are glued together where
# its source lacks a comma: "wildebeestcarp", "watercheese"; "zombiebogie" below likewise)
_UNCHANGED_ENDINGS = frozenset(
    """
    bison debris headquarters pincers trout bream diabetes herpes pliers tuna breeches djinn high-jinks proceedings
    whiting britches eland homework rabies wildebeestcarp elk innings salmon chassis flounder jackanapes scissors
    christmas gallows mackerel series clippers georgia measles shears cod graffiti mews species contretemps mumps
    swine corps news swiss
    advice equipment happiness luggage software bread fruit information mathematics progress understanding
    butter furniture ketchup mayonnaise research watercheese garbage knowledge meat rice electricity gravel love
    mustard sand
    """.split()
)

# step 2: "-ie" singulars whose plural Pattern leaves as it is ("^pie", "^tie" never match, so they are left out)
_IE_WORDS = frozenset(
    """
    alergie cutie hoagie newbie softie veggie auntie doggie hottie nightie sortie weenie beanie eyrie indie oldie
    stoolie yuppie birdie freebie junkie sweetie zombiebogie goonie laddie pixie techie bombie groupie laramie
    quickie collie hankie lingerie reverie toughie cookie hippie meanie rookie valkyrie
    """.split()
)

# step 3: irregular plural endings (no ending is the end of another, so at most one applies)
_IRREGULAR_ENDINGS = {
    "atlantes": "atlas", "atlases": "atlas", "axes": "axe", "beeves": "beef", "brethren": "brother",
    "children": "child", "corpora": "corpus", "corpuses": "corpus", "ephemerides": "ephemeris", "feet": "foot",
    "ganglia": "ganglion", "geese": "goose", "genera": "genus", "genii": "genie", "graffiti": "graffito",
    "helves": "helve", "kine": "cow", "leaves": "leaf", "loaves": "loaf", "men": "man", "mongooses": "mongoose",
    "monies": "money", "moves": "move", "mythoi": "mythos", "numena": "numen", "occipita": "occiput",
    "octopodes": "octopus", "opera": "opus", "opuses": "opus", "our": "my", "oxen": "ox", "penes": "penis",
    "penises": "penis", "people": "person", "sexes": "sex", "soliloquies": "soliloquy", "teeth": "tooth",
    "testes": "testis", "trilbys": "trilby", "turves": "turf", "zoa": "zoon",
}  # fmt: skip

# step 4: (pattern, replacement), first match wins; Python fills an unmatched group with "" as Pattern does by hand
_SUFFIX_RULES = [
    (re.compile(p), r)
    for p, r in (
        (r"(.)ae$", r"\1a"),
        (r"(.)itis$", r"\1itis"),
        (r"(.)eaux$", r"\1eau"),
        (r"(quiz)zes$", r"\1"),
        (r"(matr)ices$", r"\1ix"),
        (r"(ap|vert|ind)ices$", r"\1ex"),
        (r"^(ox)en", r"\1"),
        (r"(alias|status)es$", r"\1"),
        (r"([octop|vir])i$", r"\1us"),  # a character class in Pattern: any of "octp|vir" before a final "i"
        (r"(cris|ax|test)es$", r"\1is"),
        (r"(shoe)s$", r"\1"),
        (r"(o)es$", r"\1"),
        (r"(bus)es$", r"\1"),
        (r"([m|l])ice$", r"\1ouse"),
        (r"(x|ch|ss|sh)es$", r"\1"),
        (r"(m)ovies$", r"\1ovie"),
        (r"(.)ombies$", r"\1ombie"),
        (r"(s)eries$", r"\1eries"),
        (r"([^aeiouy]|qu)ies$", r"\1y"),
        (r"([aeo]l)ves$", r"\1f"),
        (r"([^d]ea)ves$", r"\1f"),
        (r"arves$", "arf"),
        (r"erves$", "erve"),
        (r"([nlw]i)ves$", r"\1fe"),
        (r"([lr])ves$", r"\1f"),
        (r"([aeo])ves$", r"\1ve"),
        (r"(sive)s$", r"\1"),
        (r"(tive)s$", r"\1"),
        (r"(hive)s$", r"\1"),
        (r"([^f])ves$", r"\1fe"),
        (r"(^analy)ses$", r"\1sis"),
        (r"((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis"),
        (r"(.)opses$", r"\1opsis"),
        (r"(.)yses$", r"\1ysis"),
        (r"(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
        (r"(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"),
        (r"(.)oses$", r"\1osis"),
        (r"([ti])a$", r"\1um"),
        (r"(n)ews$", r"\1ews"),
        (r"s$", ""),
    )
]


def pattern_singularize(word: str) -> str:
    """What ``pattern.en.singularize`` returns for a lowercase token (see the module docstring for the steps)."""
    if "-" in word or word.endswith("'"):
        return word
    if any(listed.endswith(word) for listed in _UNCHANGED_ENDINGS):
        return word
    if any(word.endswith(ie + "s") for ie in _IE_WORDS):
        return word
    for ending, singular in _IRREGULAR_ENDINGS.items():
        if word.endswith(ending):
            return word[: -len(ending)] + singular
    for pattern, replacement in _SUFFIX_RULES:
        if pattern.search(word):
            return pattern.sub(replacement, word)
    return word
