"""CHAIR official-rules mode: the official code's mentions (nltk tokens, pattern singularize, its pair merges) on a
hand-checked caption set, next to our fixed rules; the singularizer's quirks word by word; the flag end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lvlm_steer.evals.chair import CHAIR_RULES, DEFAULT_CHAIR_RULES, chair_scores, extract_objects, load_ground_truth
from lvlm_steer.evals.chair.nltk_tokens import official_tokens
from lvlm_steer.evals.chair.pattern_singular import pattern_singularize
from lvlm_steer.evals.chair.vocab import NEVER_MATCHED_OFFICIALLY, OFFICIAL_FORMS

DATA = json.loads((Path(__file__).parent / "data" / "chair_mentions.json").read_text(encoding="utf-8"))
SYNONYMS = Path(__file__).resolve().parents[2] / "shared/reference/chair/synonyms.txt"


def _caption_set() -> list[dict]:
    """Every caption of the data file with its expected mentions: phrases alone, composed captions, whole ones."""
    phrases, frames = DATA["phrases"], DATA["frames"]
    rows = [dict(p) for p in phrases]
    for f, a, b in DATA["composed"]:
        frame = frames[f]
        first, second = phrases[a]["text"], phrases[b]["text"]
        text = frame.format(a=first, A=first[0].upper() + first[1:], b=second)
        rows.append({"text": text, **{r: phrases[a][r] + phrases[b][r] for r in ("official", "fixed")}})
    return rows + DATA["captions"]


CAPTIONS = _caption_set()


@pytest.mark.parametrize("rules", ["official", "fixed"])
def test_mentions_on_the_hand_checked_caption_set(rules):
    assert len(CAPTIONS) >= 300
    wrong = []
    for row in CAPTIONS:
        got = [[m.word, m.category] for m in extract_objects(row["text"], rules)]
        if got != row[rules]:
            wrong.append((row["text"], row[rules], got))
    print(f"{rules}: {len(CAPTIONS) - len(wrong)}/{len(CAPTIONS)} captions with the expected mentions")
    assert not wrong, wrong[:5]


def test_caption_set_covers_every_difference_between_the_rules():
    differ = [row["text"] for row in CAPTIONS if row["official"] != row["fixed"]]
    texts = " ".join(differ).lower()
    for needle in (
        "bus",
        "ties",
        "man-made",
        "vase-like",
        "baby duck",
        "cheesecake",
        "iphone",
        "hair dryer",
        "motor bike",
        "stove top oven",
        "collies",
        "dog.the",
        "baby goat",
    ):
        assert needle in texts, needle
    assert len(differ) >= 100


def test_default_rules_are_official():
    assert DEFAULT_CHAIR_RULES == "official" and set(CHAIR_RULES) == {"official", "fixed"}
    assert extract_objects("A red bus.") == []
    assert [m.category for m in extract_objects("A red bus.", "fixed")] == ["bus"]
    with pytest.raises(ValueError, match="official"):
        extract_objects("A bus.", "papers")


# pattern.en.singularize (Pattern 2.6), derived rule by rule from its source: word -> what it returns
PATTERN = {
    # the last rule drops any final "s"
    "bus": "bu", "glass": "glas", "tennis": "tenni", "octopus": "octopu", "dogs": "dog", "tvs": "tv", "skis": "ski",
    "pizzas": "pizza", "oranges": "orange", "giraffes": "giraffe",
    # "-ies" -> "-y" unless a listed "-ie" word; "^tie"/"^pie" never match
    "ties": "ty", "pies": "py", "puppies": "puppy", "babies": "baby", "neckties": "neckty", "magpies": "magpy",
    # listed "-ie" plurals come back unchanged, still plural
    "cookies": "cookies", "collies": "collies", "doggies": "doggies", "movies": "movie", "zombies": "zombie",
    # endings of uninflected/uncountable words come back unchanged
    "scissors": "scissors", "series": "series", "news": "news", "ice": "ice", "rice": "rice", "s": "s",
    # irregular endings
    "people": "person", "women": "woman", "policemen": "policeman", "children": "child", "feet": "foot",
    "oxen": "ox", "teeth": "tooth", "leaves": "leaf", "axes": "axe", "taxes": "taxe", "four": "fmy", "omen": "oman",
    # ordered suffix rules
    "buses": "bus", "busses": "buss", "boxes": "box", "benches": "bench", "dishes": "dish", "glasses": "glass",
    "mice": "mouse", "potatoes": "potato", "canoes": "cano", "toes": "to", "shoes": "shoe", "knives": "knife",
    "wolves": "wolf", "olives": "olife", "gloves": "glove", "stoves": "stove", "curves": "curf", "scarves": "scarf",
    "shelves": "shelve", "safari": "safarus", "octopi": "octopus", "pasta": "pastum", "media": "medium",
    "antennae": "antenna", "bases": "basis", "analyses": "analysis", "hoses": "hose", "matrices": "matrix",
    "quizzes": "quiz",
    # unchanged
    "sheep": "sheep", "dog": "dog", "person": "person", "broccoli": "broccoli", "pizza": "pizza", "tie": "tie",
    "man-made": "man-made",
}  # fmt: skip


@pytest.mark.parametrize("word", list(PATTERN))
def test_pattern_singularize(word):
    assert pattern_singularize(word) == PATTERN[word]


def test_singularize_leaves_alone_what_can_never_be_a_form():
    # Pattern gives "dog's" and "mother-in-law" here; an apostrophe or hyphen keeps either result off every form
    assert pattern_singularize("dogs'") == "dogs'"
    assert pattern_singularize("mothers-in-law") == "mothers-in-law"


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("a man-made lake. the dog's ball, and dogs' toys.",
         ["a", "man-made", "lake", ".", "the", "dog", "'s", "ball", ",", "and", "dogs", "'", "toys", "."]),
        ("a cat/dog on a sofa.the tv", ["a", "cat/dog", "on", "a", "sofa.the", "tv"]),
        ("'dog' (bird) [bus] **kite**",
         ["'", "dog", "'", "(", "bird", ")", "[", "bus", "]", "*", "*", "kite", "*", "*"]),
        ("a dog; a cat: 3:30, 1,000 dogs... ok!?", ["a", "dog", ";", "a", "cat", ":", "3:30", ",", "1,000", "dogs",
                                                   "...", "ok", "!", "?"]),
        ("a cat\u2014dog, a dog,5", ["a", "cat", "\u2014", "dog", ",", "a", "dog,5"]),
        ("a dog.) a cat.\nthe end", ["a", "dog", ".", ")", "a", "cat", ".", "the", "end"]),
        # several possible ends with no space between: only the last ends the sentence, the period stays on "man"
        ("a man.! the dog", ["a", "man.", "!", "the", "dog"]),
        # closing marks up to the next space move to the sentence's end; "“" is none the word rules allow after it
        ("a cat.\"\u201c the dog", ["a", "cat.", "''", "\u201c", "the", "dog"]),
        ("a tie.\u2019 the dog", ["a", "tie", ".", "\u2019", "the", "dog"]),
        # ":" may follow a sentence's period, "%" may not
        ("a dog.:x", ["a", "dog", ".", ":", "x"]),
        ("a dog.%x", ["a", "dog.", "%", "x"]),
        # the bare-quote rule sees no space before "(" yet (brackets are spaced later), so "dog's" stays whole
        ("a dog's'( bus", ["a", "dog's", "'", "(", "bus"]),
    ],
)  # fmt: skip
def test_official_tokens(text, tokens):
    assert official_tokens(text) == tokens


@pytest.mark.skipif(not SYNONYMS.is_file(), reason=f"official CHAIR synonyms list not at {SYNONYMS}")
def test_official_forms_are_the_official_lists_matchable_forms():
    listed: dict[str, str] = {}
    for line in SYNONYMS.read_text().splitlines():
        forms = line.strip().split(", ")
        for form in forms:
            listed[form] = forms[0]
    # the official code matches a listed form only if a lowercased, singularized token can equal it
    matchable = {f: c for f, c in listed.items() if f == f.strip().lower()}
    assert OFFICIAL_FORMS == matchable
    assert {f.strip().lower() for f in set(listed) - set(matchable)} == set(NEVER_MATCHED_OFFICIALLY)


def test_scores_and_ground_truth_follow_the_rules(tmp_path):
    instances = {
        "images": [{"id": 1, "file_name": "a.jpg"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1}],
        "categories": [{"id": 1, "name": "person"}, {"id": 6, "name": "bus"}],
    }
    refs = {"annotations": [{"id": 1, "image_id": 1, "caption": "A man waits by a bus."}]}
    (tmp_path / "i.json").write_text(json.dumps(instances))
    (tmp_path / "c.json").write_text(json.dumps(refs))
    official = load_ground_truth(tmp_path / "i.json", tmp_path / "c.json")
    fixed = load_ground_truth(tmp_path / "i.json", tmp_path / "c.json", "fixed")
    assert official == {1: {"person"}} and fixed == {1: {"person", "bus"}}
    caption = {1: "A man, a bus and two buses."}
    off = chair_scores(caption, official)
    assert (off["n_mentions"], off["n_hallucinated"], off["chair_i"]) == (2, 1, 0.5)  # "bus" is no mention there
    fix = chair_scores(caption, fixed, "fixed")
    assert (fix["n_mentions"], fix["n_hallucinated"]) == (3, 0)


def test_cli_flag_and_report_name_the_rules(tmp_path):
    from lvlm_steer.cli import build_parser
    from lvlm_steer.evals.report import build_report, to_markdown

    base = ["eval", "chair", "--model", "m", "--images", "i", "--coco-annotations", "a", "--out", "o"]
    assert build_parser().parse_args(base).chair_rules == "official"
    assert build_parser().parse_args([*base, "--chair-rules", "fixed"]).chair_rules == "fixed"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--chair-rules", "papers"])
    metrics = {"chair_s": 0.5, "chair_i": 0.25, "recall": 0.5, "mean_length": 9.0, "n_captions": 2}
    for rules, folder in (("fixed", "new"), (None, "old")):
        summary = {"task": "chair", "model": "m", "methods": ["none"], "metrics": {"none": metrics}, "config": {}}
        if rules:
            summary["config"]["chair_rules"] = rules
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "summary.json").write_text(json.dumps(summary))
    report = build_report([tmp_path / "new", tmp_path / "old"])
    assert [r["scoring"] for r in report["runs"]] == ["CHAIR rules fixed", "CHAIR rules fixed"]  # old runs: fixed
    assert "scoring: CHAIR rules fixed" in to_markdown(report)
