"""CHAIR ground truth from COCO annotation files: which categories each image really holds.

As in the original CHAIR, an image's truth is the union of its instance annotations' categories and the categories
its five reference captions mention (read with the same `extract_objects` rules), so an object that annotators describe
but did not box is not counted as a hallucination. Plain `json` is enough; pycocotools is not needed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lvlm_steer.errors import SteeringError

from .extract import DEFAULT_CHAIR_RULES, check_rules, extract_objects
from .vocab import COCO_CATEGORIES

JsonSource = str | os.PathLike | Mapping[str, Any]
_HINT = "use COCO's annotations/instances_val2014.json (and captions_val2014.json) from annotations_trainval2014.zip"


class ChairDataError(SteeringError, ValueError):
    """A COCO annotation file is not JSON, or lacks the fields CHAIR needs."""


def _load(source: JsonSource, what: str) -> tuple[dict[str, Any], str]:
    """The parsed JSON object and a name for it in error messages."""
    if isinstance(source, Mapping):
        return dict(source), f"the {what} dict"
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"COCO {what} file {path} not found; {_HINT}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ChairDataError(f"{path} is not valid JSON ({e}); {_HINT}") from e
    if not isinstance(data, dict):
        raise ChairDataError(f"{path} holds a JSON {type(data).__name__}, not a COCO object; {_HINT}")
    return data, str(path)


def _records(data: dict[str, Any], key: str, fields: tuple[str, ...], name: str, what: str) -> list[dict[str, Any]]:
    """``data[key]``, checked to be a list of objects that each have ``fields``."""
    records = data.get(key)
    if not isinstance(records, list):
        swapped = " (is this the captions file? pass the instances file first)" if key == "categories" else ""
        raise ChairDataError(f"{name} has no {key!r} list, so it is not a COCO {what} file{swapped}; {_HINT}")
    for record in records:
        if not isinstance(record, dict) or any(f not in record for f in fields):
            raise ChairDataError(
                f"{name}: every entry of {key!r} needs the fields {list(fields)}, so it is not a COCO {what} file; "
                f"got {str(record)[:200]}"
            )
    return records


def _category_names(data: dict[str, Any], name: str) -> dict[int, str]:
    names = {int(c["id"]): str(c["name"]) for c in _records(data, "categories", ("id", "name"), name, "instances")}
    unknown = sorted(set(names.values()) - set(COCO_CATEGORIES))
    if unknown:
        raise ChairDataError(f"{name} has categories outside the 80 COCO ones ({unknown[:5]}); CHAIR needs COCO's")
    return names


def load_ground_truth(
    instances_json: JsonSource, captions_json: JsonSource | None = None, rules: str = DEFAULT_CHAIR_RULES
) -> dict[int, set[str]]:
    """image_id -> COCO category names present: boxed instances, plus objects the reference captions mention
    (read with the same ``rules`` as the generated captions, as the official code does).

    Every image listed in the instances file gets an entry (an empty set when nothing is annotated).
    """
    check_rules(rules)
    data, name = _load(instances_json, "instances")
    names = _category_names(data, name)
    truth: dict[int, set[str]] = {int(im["id"]): set() for im in _records(data, "images", ("id",), name, "instances")}
    for ann in _records(data, "annotations", ("image_id", "category_id"), name, "instances"):
        category_id = int(ann["category_id"])
        if category_id not in names:
            raise ChairDataError(
                f"{name}: annotation {ann.get('id')} has category_id {category_id}, not in 'categories'"
            )
        truth.setdefault(int(ann["image_id"]), set()).add(names[category_id])
    if captions_json is not None:
        captions, cap_name = _load(captions_json, "captions")
        for ann in _records(captions, "annotations", ("image_id", "caption"), cap_name, "captions"):
            found = {m.category for m in extract_objects(str(ann["caption"]), rules)}
            truth.setdefault(int(ann["image_id"]), set()).update(found)
    return truth


def image_files(instances_json: JsonSource) -> dict[int, str]:
    """image_id -> file_name (relative to the images folder, e.g. ``COCO_val2014_000000000042.jpg``)."""
    data, name = _load(instances_json, "instances")
    return {
        int(im["id"]): str(im["file_name"]) for im in _records(data, "images", ("id", "file_name"), name, "instances")
    }
