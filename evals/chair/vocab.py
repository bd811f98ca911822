"""The CHAIR vocabulary: the 80 COCO categories and the words that count as a mention of each.

CHAIR (Rohrbach et al., 2018) only scores words it can tie to a COCO category, so this table decides what a caption
"mentions". It follows the official CHAIR synonyms list (one line per category; every surface form there maps to the
same category here, which ``tests/test_chair.py`` checks against the file) so that scores stay comparable with
published numbers. Forms are singular: `extract_objects` singularizes caption words before the look-up, so plural
spellings in the official list ("people", "children", "oxen", "skis") are kept only for completeness.

Quirks of the official list and what our ``fixed`` rules do about each (the ``official`` rules keep the original
behaviour: `OFFICIAL_FORMS` is the official list less the forms it can never match, see `official.py`):

* ``" motor bike"`` (motorcycle) and ``" cheesecake"`` (cake) carry a leading space, so the original code never
  matches them. We strip the space and DO match them: the list's authors plainly meant them, both words are rare in
  captions, so the effect on scores is tiny, and a caption saying "motor bike" is about a motorcycle.
* ``"iPhone"`` is capitalised, so it never matches lowercased text in the original code. We store ``"iphone"`` and
  match it (cell phone).
* ``"stove top oven"`` has three words; the original merges only word pairs, so it never matches there. We merge
  phrases of up to three words, so it matches (one oven mention instead of "stove" + "oven").
* Misspellings and singularizer artefacts (``"knive"``, ``"phon"``, ``"televison"``, ``"solider"``) and duplicated
  forms are kept (deduplicated): they are harmless and keep the table a superset of the official one.
* ``"bow"`` maps to tie, ``"orange"`` (also a colour), ``"seat"`` (chair), ``"pitcher"`` (person), ``"mouse"``,
  ``"notebook"`` (laptop) and the like are ambiguous, but we keep the official mapping for comparability.

Deliberate differences from the official list (`DELIBERATE_DIFFERENCES`: official forms we map differently or drop)
are none: comparability wins over our own taste. Additions (`ADDED_FORMS`, forms the official list lacks) are few
and each says why; the phrase rules that are not plain surface forms (baby/adult + animal, "home plate",
"train track", the toilet/seat rule) live in `extract.py`.
"""

from __future__ import annotations

# category -> its surface forms (the category's own name included where it is a word people write)
# fmt: off
_TABLE: dict[str, tuple[str, ...]] = {
    "person": (
        "person", "people", "man", "woman", "boy", "girl", "child", "children", "kid", "baby", "adult", "teenager",
        "lady", "gentleman", "guy", "male", "female", "mother", "father", "sister", "bride", "groom", "grandchild",
        "player", "pitcher", "skier", "snowboarder", "skater", "skateboarder", "rider", "biker", "bicyclist",
        "walker", "camper", "hunter", "driver", "passenger", "traveler", "foreigner", "villager", "shopper", "buyer",
        "student", "worker", "coworker", "chef", "baker", "doctor", "patient", "policeman", "cop", "officer",
        "soldier", "solider", "serviceman", "cowboy", "politician", "caller", "drinker", "offender", "trespasser",
        "thief",
    ),
    "bicycle": ("bicycle", "bike", "unicycle", "minibike", "trike"),
    "car": (
        "car", "automobile", "van", "minivan", "sedan", "suv", "hatchback", "coupe", "jeep", "cab", "taxi",
        "taxicab", "limo",
    ),
    "motorcycle": ("motorcycle", "motorbike", "motor bike", "motor cycle", "scooter", "moped"),
    "airplane": (
        "airplane", "air plane", "plane", "jet", "jetliner", "airbus", "aircraft", "monoplane", "biplane", "seaplane",
    ),
    "bus": ("bus", "minibus", "trolley"),
    "train": ("train", "locomotive", "tramway", "caboose"),
    "truck": ("truck", "pickup", "lorry", "hauler", "firetruck"),
    "boat": (
        "boat", "ship", "vessel", "watercraft", "liner", "sailboat", "motorboat", "powerboat", "speedboat",
        "rowboat", "paddleboat", "lifeboat", "houseboat", "ferryboat", "riverboat", "steamboat", "tugboat",
        "steamship", "battleship", "freighter", "trawler", "schooner", "barge", "ferry", "yacht", "dinghy", "skiff",
        "canoe", "kayak", "catamaran", "pontoon", "sailboard",
    ),
    "traffic light": ("traffic light", "traffic signal", "stop light", "stoplight", "street light", "streetlight"),
    "fire hydrant": ("fire hydrant", "hydrant"),
    "stop sign": ("stop sign",),
    "parking meter": ("parking meter",),
    "bench": ("bench", "pew"),
    "bird": (
        "bird", "songbird", "seabird", "shorebird", "waterbird", "waterfowl", "fowl", "blackbird", "bluebird",
        "bluejay", "chickadee", "cockatiel", "cockatoo", "condor", "cormorant", "cowbird", "crow", "duck", "egret",
        "falcon", "finch", "flamingo", "goose", "gosling", "gull", "seagull", "heron", "hummingbird", "kingfisher",
        "loon", "lorikeet", "macaw", "magpie", "mallard", "oriole", "osprey", "ostrich", "owl", "parakeet", "parrot",
        "peacock", "peafowl", "pelican", "pheasant", "pigeon", "puffin", "quail", "raven", "robin", "rooster",
        "sandpiper", "sparrow", "swan", "turkey", "vulture", "buzzard", "warbler", "willet", "woodpecker",
    ),
    "cat": ("cat", "kitten", "feline", "tabby"),
    "dog": (
        "dog", "doggie", "doggy", "puppy", "pup", "canine", "hound", "mutt", "beagle", "brindle", "bulldog",
        "chihuahua", "cocker", "collie", "corgi", "dachshund", "doberman", "greyhound", "husky", "labrador",
        "pitbull", "poodle", "pug", "retriever", "rottweiler", "schnauzer", "sheepdog", "spaniel", "terrier",
        "weimaraner", "whippet",
    ),
    "horse": (
        "horse", "racehorse", "pony", "colt", "foal", "mare", "stallion", "equine", "bronco", "bronc", "mustang",
        "palomino", "clydesdale",
    ),
    "sheep": ("sheep", "lamb", "ram", "ewe", "goat"),
    "cow": ("cow", "cattle", "calf", "heifer", "bull", "ox", "oxen", "holstein", "buffalo", "bison", "zebu"),
    "elephant": ("elephant",),
    "bear": ("bear", "panda"),
    "zebra": ("zebra",),
    "giraffe": ("giraffe",),
    "backpack": ("backpack", "knapsack"),
    "umbrella": ("umbrella",),
    "handbag": ("handbag", "purse", "wallet", "briefcase"),
    "tie": ("tie", "bow tie", "bow"),
    "suitcase": ("suitcase", "suit case", "luggage"),
    "frisbee": ("frisbee",),
    "skis": ("skis", "ski"),
    "snowboard": ("snowboard",),
    "sports ball": ("sports ball", "ball"),
    "kite": ("kite",),
    "baseball bat": ("baseball bat",),
    "baseball glove": ("baseball glove",),
    "skateboard": ("skateboard",),
    "surfboard": ("surfboard", "longboard", "shortboard", "skimboard", "wakeboard"),
    "tennis racket": ("tennis racket", "racket"),
    "bottle": ("bottle",),
    "wine glass": ("wine glass",),
    "cup": ("cup",),
    "fork": ("fork",),
    "knife": ("knife", "knive", "pocketknife"),
    "spoon": ("spoon",),
    "bowl": ("bowl", "container"),
    "banana": ("banana",),
    "apple": ("apple",),
    "sandwich": ("sandwich", "sub", "burger", "hamburger", "cheeseburger"),
    "orange": ("orange",),
    "broccoli": ("broccoli",),
    "carrot": ("carrot",),
    "hot dog": ("hot dog",),
    "pizza": ("pizza",),
    "donut": ("donut", "doughnut", "bagel"),
    "cake": ("cake", "cupcake", "cheesecake", "coffeecake", "shortcake", "pancake"),
    "chair": ("chair", "seat", "stool"),
    "couch": ("couch", "sofa", "loveseat", "settee", "futon", "recliner", "chesterfield"),
    "potted plant": ("potted plant", "houseplant"),
    "bed": ("bed",),
    "dining table": ("dining table", "table", "desk"),
    "toilet": ("toilet", "urinal", "commode", "lavatory", "potty"),
    "tv": ("tv", "television", "televison", "monitor"),
    "laptop": ("laptop", "laptop computer", "computer", "notebook", "netbook", "macbook", "lenovo"),
    "mouse": ("mouse",),
    "remote": ("remote",),
    "keyboard": ("keyboard",),
    "cell phone": (
        "cell phone", "cellphone", "mobile phone", "phone", "phon", "smartphone", "telephone", "iphone",
    ),
    "microwave": ("microwave",),
    "oven": ("oven", "stove", "stovetop", "stove top oven"),
    "toaster": ("toaster",),
    "sink": ("sink",),
    "refrigerator": ("refrigerator", "fridge", "freezer"),
    "book": ("book",),
    "clock": ("clock",),
    "vase": ("vase",),
    "scissors": ("scissors",),
    "teddy bear": ("teddy bear", "teddybear"),
    "hair drier": ("hair drier", "hairdryer"),
    "toothbrush": ("toothbrush",),
}
# fmt: on

# forms the official list lacks, each with the reason we add it
ADDED_FORMS: dict[str, str] = {
    # the usual spelling; without it "hair dryer" yields no mention at all ("hair" and "dryer" are not forms)
    "hair dryer": "hair drier",
    # modifier phrases: alone, "passenger" is a person form and "seat" a chair form, so the phrase must win
    # (a passenger jet is one airplane, a toilet seat one toilet)
    "passenger jet": "airplane",
    "passenger train": "train",
    "toilet seat": "toilet",
}

# official forms we deliberately map differently (form -> our category, or None for "no category"); see docstring
DELIBERATE_DIFFERENCES: dict[str, str | None] = {}

# multi-word phrases that name no COCO object but contain a form: merged so that their words yield no mention
NON_OBJECT_PHRASES: tuple[str, ...] = ("home plate", "train track")

COCO_CATEGORIES: tuple[str, ...] = tuple(_TABLE)

# categories that "baby"/"adult" may modify ("a baby elephant" is one elephant, not a person and an elephant)
LIVING_CATEGORIES: frozenset[str] = frozenset(
    {"person", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"}
)


def _build_surface_forms() -> dict[str, str]:
    forms: dict[str, str] = {}
    for category, words in _TABLE.items():
        for word in words:
            if forms.setdefault(word, category) != category:
                raise AssertionError(f"surface form {word!r} is listed under {forms[word]!r} and {category!r}")
    for word, category in ADDED_FORMS.items():
        if forms.setdefault(word, category) != category:
            raise AssertionError(f"added form {word!r} clashes with {forms[word]!r}")
    for word, category in DELIBERATE_DIFFERENCES.items():
        if category is None:
            forms.pop(word, None)
        else:
            forms[word] = category
    return forms


# surface form (lowercase, singular; multi-word forms use single spaces) -> COCO category; treat as read-only
SURFACE_FORMS: dict[str, str] = _build_surface_forms()

# official forms the official code can never match (see the module docstring): why, for each
NEVER_MATCHED_OFFICIALLY: dict[str, str] = {
    "motor bike": "listed as ' motor bike' (leading space)",
    "cheesecake": "listed as ' cheesecake' (leading space)",
    "iphone": "listed as 'iPhone', never equal to a lowercased token",
}

# the forms the official code matches, exactly: the official list less the three above, none of ours added
OFFICIAL_FORMS: dict[str, str] = {
    form: category for category, forms in _TABLE.items() for form in forms if form not in NEVER_MATCHED_OFFICIALLY
}

if len(COCO_CATEGORIES) != 80:
    raise AssertionError(f"the COCO detection set has 80 categories, the table {len(COCO_CATEGORIES)}")
