"""CHAIR: our singularizer, object extraction by the fixed rules (every merge rule), ground truth from COCO files,
metrics by hand, and our vocabulary against the official CHAIR synonyms list."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lvlm_steer.evals.chair import (
    COCO_CATEGORIES,
    DEFAULT_CHAIR_PROMPT,
    SURFACE_FORMS,
    ChairDataError,
    Mention,
    MissingGroundTruthError,
    chair_scores,
    extract_objects,
    image_files,
    load_ground_truth,
    singularize,
    tokenize,
)
from lvlm_steer.evals.chair.vocab import ADDED_FORMS, DELIBERATE_DIFFERENCES

SYNONYMS = Path(__file__).resolve().parents[2] / "shared/reference/chair/synonyms.txt"
SYNONYMS_SHA256 = "b685537b36fe21b791c87151b96a991ceb582edff19f3da204dcc7a7905502f2"
# table forms that are plurals (kept because the official list has them); singularize maps them elsewhere
PLURAL_FORMS = {"people", "children", "oxen", "skis"}


def categories(caption: str) -> list[str]:
    """Categories by our fixed rules (the official ones are tested in test_chair_official.py)."""
    return [m.category for m in extract_objects(caption, "fixed")]


# --- singularizer ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "plural, singular",
    [
        # irregulars
        ("people", "person"), ("men", "man"), ("women", "woman"), ("children", "child"), ("mice", "mouse"),
        ("geese", "goose"), ("teeth", "tooth"), ("feet", "foot"), ("oxen", "ox"), ("policemen", "policeman"),
        ("grandchildren", "grandchild"), ("knives", "knife"), ("pocketknives", "pocketknife"), ("wives", "wife"),
        ("leaves", "leaf"), ("shelves", "shelf"), ("bookshelves", "bookshelf"), ("calves", "calf"),
        ("thieves", "thief"), ("skis", "ski"), ("buses", "bus"), ("minibuses", "minibus"), ("quizzes", "quiz"),
        # -es after s/sh/ch/x/z
        ("glasses", "glass"), ("boxes", "box"), ("benches", "bench"), ("dishes", "dish"),
        ("toothbrushes", "toothbrush"), ("sandwiches", "sandwich"), ("ostriches", "ostrich"), ("dresses", "dress"),
        ("lenses", "lens"), ("walruses", "walrus"), ("headaches", "headache"),
        # -ies
        ("skies", "sky"), ("puppies", "puppy"), ("ponies", "pony"), ("ladies", "lady"), ("ferries", "ferry"),
        ("ties", "tie"), ("pies", "pie"), ("collies", "collie"), ("magpies", "magpie"), ("neckties", "necktie"),
        # -ves that only drop s, -oes, -os
        ("gloves", "glove"), ("stoves", "stove"), ("olives", "olive"), ("potatoes", "potato"),
        ("buffaloes", "buffalo"), ("canoes", "canoe"), ("shoes", "shoe"), ("flamingos", "flamingo"),
        # plain -s, incl. -ys, -es that only drop s, and -is/-us plurals of -i/-u words
        ("dogs", "dog"), ("tvs", "tv"), ("turkeys", "turkey"), ("cowboys", "cowboy"), ("horses", "horse"),
        ("vases", "vase"), ("oranges", "orange"), ("suitcases", "suitcase"), ("bananas", "banana"),
        ("taxis", "taxi"), ("corgis", "corgi"), ("zebus", "zebu"), ("giraffes", "giraffe"),
        # already singular or invariant
        ("bus", "bus"), ("glass", "glass"), ("grass", "grass"), ("cross", "cross"), ("dress", "dress"),
        ("bass", "bass"), ("sheep", "sheep"), ("scissors", "scissors"), ("tennis", "tennis"), ("cattle", "cattle"),
        ("bison", "bison"), ("airbus", "airbus"), ("octopus", "octopus"), ("famous", "famous"), ("this", "this"),
        ("is", "is"), ("was", "was"), ("ramen", "ramen"), ("person", "person"), ("dog", "dog"),
        # case
        ("Dogs", "dog"),
    ],
)  # fmt: skip
def test_singularize(plural, singular):
    assert singularize(plural) == singular


def test_singularize_keeps_every_singular_table_word():
    # "sports" (in "sports ball") may change: phrase keys are singularized the same way as captions
    for form in SURFACE_FORMS:
        for word in form.split():
            if word not in PLURAL_FORMS | {"sports"}:
                assert singularize(word) == word, form


# --- extraction ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("A man holds a cell phone next to a fire hydrant.", ["person", "cell phone", "fire hydrant"]),
        ("Two hot dogs on a dining table.", ["hot dog", "dining table"]),
        ("A traffic light, a stop sign and a parking meter.", ["traffic light", "stop sign", "parking meter"]),
        ("Teddy bears beside a potted plant and a hair drier.", ["teddy bear", "potted plant", "hair drier"]),
        ("A baseball bat, a baseball glove and sports balls.", ["baseball bat", "baseball glove", "sports ball"]),
        ("A tennis racket by two wine glasses.", ["tennis racket", "wine glass"]),
        ("Motorbikes, a motor bike and a motor cycle.", ["motorcycle", "motorcycle", "motorcycle"]),
        ("An air plane over the airport.", ["airplane"]),
        ("A man in a bow tie.", ["person", "tie"]),
        ("A toilet seat.", ["toilet"]),
        ("The seat of the toilet is up.", ["toilet"]),
        ("A man sits on a seat.", ["person", "chair"]),
        ("A baby elephant and an adult giraffe.", ["elephant", "giraffe"]),
        ("A baby girl with adult women.", ["person", "person"]),
        ("A baby in a stroller.", ["person"]),
        ("A baby animal.", []),
        ("A passenger jet at the gate.", ["airplane"]),
        ("A passenger train and a passenger.", ["train", "person"]),
        ("A player stands at home plate.", ["person"]),
        ("Train tracks run through the field.", []),
        ("A train on the train tracks.", ["train"]),
        ("A stove top oven and a laptop computer.", ["oven", "laptop"]),
        ("A man's iPhone beside a cheesecake.", ["person", "cell phone", "cake"]),
        ("People and children watch the buses.", ["person", "person", "bus"]),
        ("A hair dryer.", ["hair drier"]),
        ("A dog chases another dog.", ["dog", "dog"]),
        ("Nothing here but grass and sky.", []),
    ],
)
def test_extract_objects(caption, expected):
    assert categories(caption) == expected


def test_mention_fields():
    mentions = extract_objects("Two women wait at a traffic light, near toilet seats.", "fixed")
    assert mentions == [
        Mention(word="woman", category="person", index=1),
        Mention(word="traffic light", category="traffic light", index=5),
        Mention(word="toilet seat", category="toilet", index=8),
    ]


def test_tokenize():
    assert tokenize("The dog's bowl -- it's hot-dog time, 2 dogs\u2019 bowls!") == [
        "the", "dog", "bowl", "it", "hot", "dog", "time", "2", "dogs", "bowls",
    ]  # fmt: skip


def test_every_table_form_extracts_to_its_category():
    for form, category in SURFACE_FORMS.items():
        if form in ("toilet seat", "hair dryer"):  # additions covered above
            continue
        assert categories(form) == [category], form


# --- ground truth --------------------------------------------------------------------------------------------------


def _coco(tmp_path: Path) -> tuple[Path, Path]:
    instances = {
        "images": [
            {"id": 1, "file_name": "COCO_val2014_000000000001.jpg"},
            {"id": 2, "file_name": "COCO_val2014_000000000002.jpg"},
            {"id": 3, "file_name": "COCO_val2014_000000000003.jpg"},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1},
            {"id": 11, "image_id": 1, "category_id": 18},
            {"id": 12, "image_id": 1, "category_id": 18},
            {"id": 13, "image_id": 2, "category_id": 3},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}],
    }
    captions = {
        "annotations": [
            {"id": 1, "image_id": 2, "caption": "A car parked by a bench."},
            {"id": 2, "image_id": 2, "caption": "Two people walk past a parked car."},
            {"id": 3, "image_id": 1, "caption": "A man plays with his dog."},
        ]
    }
    paths = tmp_path / "instances_val2014.json", tmp_path / "captions_val2014.json"
    for path, data in zip(paths, (instances, captions), strict=True):
        path.write_text(json.dumps(data))
    return paths


def test_ground_truth_from_instances_and_captions(tmp_path):
    instances, captions = _coco(tmp_path)
    assert load_ground_truth(instances) == {1: {"person", "dog"}, 2: {"car"}, 3: set()}
    assert load_ground_truth(instances, captions) == {1: {"person", "dog"}, 2: {"car", "bench", "person"}, 3: set()}
    assert load_ground_truth(str(instances), str(captions)) == load_ground_truth(instances, captions)
    assert image_files(instances) == {i: f"COCO_val2014_{i:012d}.jpg" for i in (1, 2, 3)}


def test_ground_truth_errors(tmp_path):
    instances, captions = _coco(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found.*instances_val2014"):
        load_ground_truth(tmp_path / "missing.json")
    with pytest.raises(ChairDataError, match="no 'categories' list.*captions file"):
        load_ground_truth(captions)
    with pytest.raises(ChairDataError, match="not a COCO captions file"):
        load_ground_truth(instances, instances)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ChairDataError, match="not valid JSON"):
        load_ground_truth(bad)
    bad.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "hat"}]}))
    with pytest.raises(ChairDataError, match="outside the 80 COCO"):
        load_ground_truth(bad)
    bad.write_text(json.dumps({"images": [{"id": 1}], "annotations": [], "categories": []}))
    with pytest.raises(ChairDataError, match="file_name"):
        image_files(bad)


# --- metrics -------------------------------------------------------------------------------------------------------


def test_chair_scores_by_hand():
    truth = {1: {"person", "dog", "frisbee"}, 2: {"cat", "couch"}, 3: {"car", "bus"}, 4: {"bed"}}
    captions = {
        1: "A man throws a frisbee to his dog while a woman watches.",  # 12 words, 4 mentions, none hallucinated
        2: "A cat sleeps on a couch next to a remote and a cat toy.",  # 14 words, 4 mentions, remote hallucinated
        3: "A red truck parked on the street near a dog.",  # 10 words, 2 mentions, both hallucinated
    }
    scores = chair_scores(captions, truth)
    assert scores["chair_i"] == pytest.approx(3 / 10)
    assert scores["chair_s"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx((3 + 2 + 0) / (3 + 2 + 2))
    assert scores["mean_length"] == pytest.approx((12 + 14 + 10) / 3)
    assert (scores["n_captions"], scores["n_mentions"], scores["n_hallucinated"]) == (3, 10, 3)
    assert scores["per_caption"][1] == {
        "image_id": 2,
        "caption": captions[2],
        "mentioned": ["cat", "couch", "remote"],
        "hallucinated": ["remote"],
        "ground_truth": ["cat", "couch"],
    }
    assert scores["per_caption"][2]["hallucinated"] == ["truck", "dog"]
    json.dumps(scores)


def test_chair_scores_edge_cases():
    empty = chair_scores({}, {})
    assert empty["chair_i"] == empty["chair_s"] == empty["recall"] == empty["mean_length"] == 0.0
    assert empty["per_caption"] == []
    none = chair_scores({5: "Nothing to see."}, {5: set()})
    assert (none["chair_i"], none["chair_s"], none["recall"], none["mean_length"]) == (0.0, 0.0, 0.0, 3.0)
    with pytest.raises(KeyError, match="image_id 7 has a caption but no ground truth"):
        chair_scores({7: "A dog."}, {5: {"dog"}})
    with pytest.raises(MissingGroundTruthError, match="'7'"):
        chair_scores({"7": "A dog."}, {7: {"dog"}})


def test_exports():
    assert len(COCO_CATEGORIES) == 80 and len(set(COCO_CATEGORIES)) == 80
    assert {"dining table", "cell phone", "hair drier", "tv", "skis", "donut"} <= set(COCO_CATEGORIES)
    assert set(SURFACE_FORMS.values()) == set(COCO_CATEGORIES)
    assert DEFAULT_CHAIR_PROMPT == "Please describe this image in detail."


# --- official synonyms list ----------------------------------------------------------------------------------------


def test_table_matches_official_synonyms():
    if not SYNONYMS.is_file():
        pytest.skip(f"official CHAIR synonyms list {SYNONYMS} is absent (it lives in ../shared beside the checkout)")
    data = SYNONYMS.read_bytes()
    assert hashlib.sha256(data).hexdigest() == SYNONYMS_SHA256, f"{SYNONYMS} is not the expected official file"
    lines = [line.split(", ") for line in data.decode("utf-8").splitlines() if line.strip()]
    assert tuple(parts[0].strip() for parts in lines) == COCO_CATEGORIES
    mismatched = {}
    for parts in lines:
        category = parts[0].strip()
        for form in parts:
            form = form.strip().lower()
            expected = DELIBERATE_DIFFERENCES.get(form, category)
            if SURFACE_FORMS.get(form) != expected:
                mismatched[form] = (SURFACE_FORMS.get(form), expected)
            elif expected is not None and form not in PLURAL_FORMS:
                assert categories(form) == [expected], form
    assert not mismatched, f"forms mapped differently from the official list: {mismatched}"
    official = {form.strip().lower() for parts in lines for form in parts}
    # our table = official forms + documented additions, nothing else
    assert set(SURFACE_FORMS) - official == set(ADDED_FORMS) - set(DELIBERATE_DIFFERENCES)
