"""POPE: answer parsers, metrics, the question-file loader, the builder on synthetic COCO, and the official files."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from lvlm_steer.evals.pope import (
    DEFAULT_PROMPT_SUFFIX,
    PARSERS,
    SPLITS,
    PopeDataError,
    PopeQuestion,
    build_pope,
    file_sha256,
    load_questions,
    parse_answer,
    pope_metrics,
    pope_report,
    question_text,
)
from lvlm_steer.testing.coco import make_coco

OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "reference" / "pope"
OFFICIAL_SHA256 = {
    "random": "ac25245170b975a5bdf9080b23fd431dfe6be458bc038259c1f4f09a6bef7994",
    "popular": "72c1a8ad45d0c13514f5f22598261df41d3b533854d29682e924db50ed8aa753",
    "adversarial": "420b3407db1fa9f1187a805dca41cb7b97fd91504e6c2179706188c107fb8ef8",
}
TEMPLATE = re.compile(r"^Is there (a|an) ([a-z ]+) in the image\?$")


# ---------------------------------------------------------------- parsers

# (answer, label, peer decision) rows hand-derived from each peer's evaluation code; see the file's "about"
PEER_TABLE = json.loads((Path(__file__).parent / "data" / "pope_peer_decisions.json").read_text(encoding="utf-8"))
PEER_PARSERS = ("pope", "lmms", "vlmeval", "vcd")


def _peer_rows(parser: str) -> list[tuple[str, str, str]]:
    """(answer, label, the peer's decision) for every answer under both labels."""
    rows = []
    for row in PEER_TABLE["rows"]:
        for label in ("yes", "no"):
            decision = row[parser][label] if isinstance(row[parser], dict) else row[parser]
            rows.append((row["answer"], label, decision))
    return rows


@pytest.mark.parametrize("parser", PEER_PARSERS)
def test_parser_named_after_a_peer_gives_the_peers_decisions(parser):
    rows = _peer_rows(parser)
    assert len(rows) >= 60
    differ = [(a, y, want, parse_answer(a, parser, y)) for a, y, want in rows if parse_answer(a, parser, y) != want]
    print(f"{parser}: {len(rows) - len(differ)}/{len(rows)} rows equal to the peer's decision")
    assert not differ


def test_peer_table_covers_the_tricky_answers():
    answers = {row["answer"] for row in PEER_TABLE["rows"]}
    tricky = {"Yes.", "**Yes**", "'Yes'", "yes:", "No-one knows.", "Yes,there is a dog", "I don't know", ""}
    assert tricky | {"Yes, but it is not clear.", "There's no snow"} <= answers


def test_peers_disagree_where_their_rules_do():
    # one answer each, so a parser that drifted back to a shared rule fails here by name
    assert parse_answer("Yes.", "lmms") == "unknown" and parse_answer("Yes.", "vlmeval") == "yes"
    assert parse_answer("**Yes**", "vlmeval") == "unknown" and parse_answer("**Yes**", "pope") == "yes"
    assert parse_answer("No-one knows.", "vlmeval") == "no" and parse_answer("No-one knows.", "pope") == "yes"
    assert parse_answer("I don't know", "vcd", "no") == "no" and parse_answer("I don't know", "vcd", "yes") == "no"
    assert parse_answer("There is a snowman.", "vcd", "no") == "no"
    assert parse_answer("There is a snowman.", "words") == "yes"


def test_vlmeval_removes_at_most_32_periods():
    # VLMEvalKit hands re.UNICODE (32) to Pattern.sub as its count, so a 33rd period survives
    assert parse_answer("." * 32 + "yes", "vlmeval") == "yes"
    assert parse_answer("." * 33 + "yes", "vlmeval") == "unknown"  # ".yes" is not "yes"


# our label-free repair of VCD's rule, under its own name: answer -> decision
WORDS = {
    "Yes": "yes",
    "NO": "no",
    "Yes. No doubt.": "no",
    "I cannot tell": "yes",
    "I don't know": "yes",
    "There is a snowman.": "yes",
    "The dog is not visible.": "no",
    "Nothing like that.": "yes",
    "isn't": "yes",
    "": "yes",
}


@pytest.mark.parametrize("answer", list(WORDS))
def test_words_parser(answer):
    assert parse_answer(answer, "words") == WORDS[answer]


def test_parse_answer_defaults_to_official_and_names_valid_parsers():
    assert set(PARSERS) == {"pope", "vcd", "lmms", "vlmeval", "words"}
    assert parse_answer("No, there is not.") == "no"
    with pytest.raises(ValueError, match="pope") as err:
        parse_answer("yes", "popee")
    assert all(name in str(err.value) for name in PARSERS)
    with pytest.raises(TypeError, match="str"):
        parse_answer(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="label='yes' or 'no'"):
        parse_answer("yes", "vcd")
    assert parse_answer("No", "pope", "yes") == "no"  # label-free parsers ignore a label


# ---------------------------------------------------------------- metrics


def test_metrics_against_hand_computed_confusion_matrix():
    labels = ["yes"] * 6 + ["no"] * 4
    preds = ["yes", "yes", "yes", "no", "unknown", "yes", "no", "no", "yes", "unknown"]
    m = pope_metrics(labels, preds)
    # yes-labelled: 4 yes (tp), 1 no (fn), 1 unknown (fn); no-labelled: 2 no (tn), 1 yes (fp), 1 unknown (neither)
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["unknown"], m["n"]) == (4, 1, 2, 2, 2, 10)
    assert m["accuracy"] == pytest.approx(6 / 10)
    assert m["precision"] == pytest.approx(4 / 5)
    assert m["recall"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * (4 / 5) * (4 / 6) / (4 / 5 + 4 / 6))
    assert m["yes_ratio"] == pytest.approx(5 / 10)
    assert m["unknown_rate"] == pytest.approx(2 / 10)


def test_lmms_convention_leaves_unknowns_out_of_recall_and_reports_label_yes_ratio():
    labels = ["yes"] * 6 + ["no"] * 4
    preds = ["yes", "yes", "yes", "no", "unknown", "yes", "no", "no", "yes", "unknown"]
    lmms = PARSERS["lmms"].convention
    m = pope_metrics(labels, preds, lmms)
    # lmms-eval: fn counts only "no" answers to yes questions, so the unknown on a yes question is in no count
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["unknown"]) == (4, 1, 2, 1, 2)
    assert m["recall"] == pytest.approx(4 / 5)
    assert m["precision"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(4 / 5)
    assert m["accuracy"] == pytest.approx(6 / 10)
    assert m["yes_ratio"] == pytest.approx(5 / 10)  # ours: predicted yes / n
    assert m["yes_ratio_labels"] == pytest.approx(6 / 10)  # lmms-eval's: yes labels / n
    # an lmms run where the model never says a bare word: lmms-eval reports recall 0 (0/0), we do too
    none_read = pope_metrics(["yes", "no"], ["unknown", "unknown"], lmms)
    assert (none_read["recall"], none_read["accuracy"], none_read["yes_ratio_labels"]) == (0.0, 0.0, 0.5)


def test_default_parser_and_metrics_keep_the_official_convention():
    labels = ["yes"] * 6 + ["no"] * 4
    preds = ["yes", "yes", "yes", "no", "unknown", "yes", "no", "no", "yes", "unknown"]
    for parser in ("pope", "vcd", "vlmeval", "words"):
        assert PARSERS[parser].convention == PARSERS["pope"].convention
    assert pope_metrics(labels, preds) == pope_metrics(labels, preds, PARSERS["pope"].convention)
    assert "yes_ratio_labels" not in pope_metrics(labels, preds)
    records = [{"split": "random", "label": y, "prediction": p} for y, p in zip(labels, preds, strict=True)]
    assert pope_report(records) == pope_report(records, "pope")
    assert pope_report(records, "lmms")["overall"]["recall"] == pytest.approx(4 / 5)
    assert pope_report(records)["overall"]["recall"] == pytest.approx(4 / 6)


def test_summary_rescores_with_the_label_and_the_parsers_convention():
    from lvlm_steer.evals.pope_eval import pope_summary

    records = [
        {"method": "none", "split": "random", "label": "no", "answer": "I don't know"},
        {"method": "none", "split": "random", "label": "yes", "answer": "Yes."},
    ]
    vcd = pope_summary(records, "vcd", ["none"], "m", [], [], 1, "", 16)["metrics"]["none"]["overall"]
    assert vcd["accuracy"] == 1.0  # VCD reads "know" as no on the no question, "yes" on the yes one
    lmms = pope_summary(records, "lmms", ["none"], "m", [], [], 1, "", 16)["metrics"]["none"]["overall"]
    assert (lmms["accuracy"], lmms["recall"], lmms["unknown"], lmms["yes_ratio_labels"]) == (0.0, 0.0, 2, 0.5)


def test_metrics_zero_division_and_bad_input():
    m = pope_metrics(["no", "no"], ["no", "no"])
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"]) == (0.0, 0.0, 0.0, 1.0)
    assert pope_metrics([], [])["accuracy"] == 0.0
    with pytest.raises(ValueError, match="parse_answer"):
        pope_metrics(["yes"], ["Yes, there is."])
    with pytest.raises(ValueError, match="2 labels but 1"):
        pope_metrics(["yes", "no"], ["yes"])


def test_report_per_split_and_pooled_overall():
    records = [
        {"split": "random", "label": "yes", "prediction": "yes"},
        {"split": "random", "label": "no", "prediction": "no"},
        {"split": "popular", "label": "yes", "prediction": "no"},
        {"split": "popular", "label": "no", "prediction": "yes"},
    ]
    report = pope_report(records)
    assert list(report) == ["random", "popular", "overall"]
    assert report["random"]["accuracy"] == 1.0 and report["popular"]["accuracy"] == 0.0
    assert report["overall"]["n"] == 4 and report["overall"]["accuracy"] == 0.5
    with pytest.raises(ValueError, match="prediction"):
        pope_report([{"split": "random", "label": "yes"}])


# ---------------------------------------------------------------- loader

ROWS = [
    {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"},
    {"question_id": 2, "image": "a.jpg", "text": "Is there an apple in the image?", "label": "No"},
]


def test_load_json_lines_and_json_array_agree(tmp_path):
    lines = tmp_path / "coco_pope_popular.json"
    lines.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    array = tmp_path / "my_questions.json"
    array.write_text(json.dumps(ROWS, indent=2))
    a, b = load_questions(lines), load_questions(array)
    assert a.questions == b.questions
    assert a.questions[1] == PopeQuestion("2", "a.jpg", "Is there an apple in the image?", "no")
    assert (a.split, b.split) == ("popular", None)
    assert a.sha256 == file_sha256(lines) and len(a.sha256) == 64 and a.path == str(lines)
    assert len(a) == 2


def test_loader_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + '{"question_id": 2, "image": \n')
    with pytest.raises(PopeDataError, match=r"q\.jsonl, line 2: not valid JSON"):
        load_questions(bad)
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({**ROWS[1], "label": "maybe"}) + "\n")
    with pytest.raises(PopeDataError, match=r"q\.jsonl, line 2: label 'maybe'"):
        load_questions(bad)
    bad.write_text(json.dumps([ROWS[0], {"question_id": 3}]))
    with pytest.raises(PopeDataError, match=r"item 2: missing field"):
        load_questions(bad)
    bad.write_text("\n  \n")
    with pytest.raises(PopeDataError, match="empty"):
        load_questions(bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_questions(tmp_path / "missing.json")
    assert issubclass(PopeDataError, ValueError)


# ---------------------------------------------------------------- builder on synthetic COCO


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_coco(tmp_path_factory.mktemp("coco"))


def _present(instances: Path) -> tuple[dict[str, set[str]], dict[int, str]]:
    """file_name -> set of category names, computed straight from the JSON (independent of the builder)."""
    data = json.loads(instances.read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    files = {im["id"]: im["file_name"] for im in data["images"]}
    present: dict[str, set[str]] = defaultdict(set)
    for ann in data["annotations"]:
        present[files[ann["image_id"]]].add(names[ann["category_id"]])
    return present, names


def _object(question: PopeQuestion) -> str:
    match = TEMPLATE.match(question.text)
    assert match, question.text
    return match.group(2)


def test_make_coco_is_valid_and_deterministic(tmp_path, coco):
    again = make_coco(tmp_path)
    assert again["instances"].read_bytes() == coco["instances"].read_bytes()
    assert again["captions"].read_bytes() == coco["captions"].read_bytes()
    data = json.loads(coco["instances"].read_text())
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        width, height = sizes[ann["image_id"]]
        assert 0 <= x and 0 <= y and x + w <= width and y + h <= height
    present, _ = _present(coco["instances"])
    assert len(present) == 12 and all(3 <= len(objs) <= 5 for objs in present.values())
    assert all((coco["images_dir"] / name).is_file() for name in present)
    captions = json.loads(coco["captions"].read_text())["annotations"]
    assert Counter(c["image_id"] for c in captions) == dict.fromkeys(coco["image_ids"], 2)


def test_build_is_deterministic_and_round_trips(tmp_path, coco):
    first = build_pope(coco["instances"], n_images=8, seed=3, out_dir=tmp_path)
    assert build_pope(coco["instances"], n_images=8, seed=3) == first
    assert build_pope(coco["instances"], n_images=8, seed=4) != first
    for split in SPLITS:
        loaded = load_questions(tmp_path / f"coco_pope_{split}.json")
        assert loaded.questions == first[split] and loaded.split == split
        assert [q.question_id for q in first[split]] == [str(i) for i in range(1, 8 * 6 + 1)]
        assert [q.label for q in first[split]] == ["yes", "no"] * 24  # interleaved, like the official files


def test_build_negatives_follow_each_split_rule(coco):
    questions = build_pope(coco["instances"], n_images=10, seed=0)
    present, names = _present(coco["instances"])
    frequency = Counter(obj for objs in present.values() for obj in objs)
    cooccur = Counter((a, b) for objs in present.values() for a in objs for b in objs)
    positives = [(q.question_id, q.image, q.text) for q in questions["random"] if q.label == "yes"]
    for split in SPLITS:
        assert [(q.question_id, q.image, q.text) for q in questions[split] if q.label == "yes"] == positives
        for q in questions[split]:
            obj = _object(q)
            assert q.text == question_text(obj)
            assert (obj in present[q.image]) == (q.label == "yes")
    by_image: dict[tuple[str, str], list[str]] = defaultdict(list)
    for split in ("popular", "adversarial"):
        for q in questions[split]:
            if q.label == "no":
                by_image[split, q.image].append(_object(q))
    for (split, image), negatives in by_image.items():
        absent = sorted(set(names.values()) - present[image])
        if split == "popular":
            ranked = sorted(absent, key=lambda o: (-frequency[o], o))
        else:
            ranked = sorted(absent, key=lambda o: (-sum(cooccur[p, o] for p in present[image]), o))
        assert negatives == ranked[:3], (split, image)


def test_question_text_uses_an_before_vowels():
    assert question_text("apple") == "Is there an apple in the image?"
    assert question_text("umbrella") == "Is there an umbrella in the image?"
    assert question_text("dining table") == "Is there a dining table in the image?"


def test_build_errors_are_clear(tmp_path, coco):
    with pytest.raises(ValueError, match="only 12 images"):
        build_pope(coco["instances"], n_images=13)
    with pytest.raises(FileNotFoundError, match="instances_val2014"):
        build_pope(tmp_path / "nope.json")


# ---------------------------------------------------------------- official files

needs_official = pytest.mark.skipif(
    not all((OFFICIAL / f"coco_pope_{s}.json").is_file() for s in SPLITS),
    reason=f"official POPE files not found under {OFFICIAL} (shared/reference/pope next to the repo)",
)


@pytest.fixture(scope="module")
def official():
    return {split: load_questions(OFFICIAL / f"coco_pope_{split}.json") for split in SPLITS}


@needs_official
@pytest.mark.parametrize("split", SPLITS)
def test_official_file_shape(official, split):
    pope = official[split]
    assert pope.split == split and pope.sha256 == OFFICIAL_SHA256[split]
    assert len(pope) == 3000
    assert Counter(q.label for q in pope) == {"yes": 1500, "no": 1500}
    per_image = Counter(q.image for q in pope)
    assert len(per_image) == 500 and set(per_image.values()) == {6}
    assert all(TEMPLATE.match(q.text) for q in pope)


@needs_official
def test_official_files_share_positives_and_match_our_template(official):
    positives = {s: [(q.question_id, q.image, q.text) for q in official[s] if q.label == "yes"] for s in SPLITS}
    assert positives["random"] == positives["popular"] == positives["adversarial"]
    # our question_text reproduces every official text but one ("an traffic light", random #2786)
    mismatches = {
        (s, q.question_id, q.text) for s in SPLITS for q in official[s] if q.text != question_text(_object(q))
    }
    assert mismatches == {("random", "2786", "Is there an traffic light in the image?")}


@needs_official
def test_official_parser_on_expected_answers(official):
    for q in official["adversarial"].questions[:60]:
        obj = _object(q)
        answer = f"Yes, there is a {obj} in the image." if q.label == "yes" else f"No, there is no {obj} in the image."
        assert parse_answer(answer) == q.label
        assert parse_answer(q.label.capitalize(), "lmms") == q.label
        assert parse_answer(q.label.capitalize() + ".", "lmms") == "unknown"
        assert parse_answer(f"{q.label.capitalize()}. {DEFAULT_PROMPT_SUFFIX}", "vlmeval") == q.label
