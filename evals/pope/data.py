"""POPE question files: load (JSON lines or one JSON array), fingerprint and write them.

The official files are JSON lines ``{"question_id", "image", "text", "label"}``; some mirrors ship the same objects
as a single JSON list. Both load into the same `PopeSet`, whose ``sha256`` lets a report pin the exact file it used.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lvlm_steer.errors import SteeringError

SPLITS = ("random", "popular", "adversarial")
# the short-answer instruction LLaVA-1.5-style evals append to each POPE question
DEFAULT_PROMPT_SUFFIX = "Answer the question using a single word or phrase."
LABELS = ("yes", "no")
_FIELDS = ("question_id", "image", "text", "label")


class PopeDataError(SteeringError, ValueError):
    """A POPE question file is empty, not JSON, or has a missing field or a label other than yes/no."""


@dataclass(frozen=True)
class PopeQuestion:
    """One yes/no question about one image; ``label`` is ``"yes"`` or ``"no"``, ``question_id`` a string."""

    question_id: str
    image: str
    text: str
    label: str


@dataclass
class PopeSet:
    """The questions of one file, plus where they came from (path, sha256 of its bytes, split guessed from its name)."""

    questions: list[PopeQuestion]
    path: str
    sha256: str
    split: str | None

    def __len__(self) -> int:
        return len(self.questions)

    def __iter__(self) -> Iterator[PopeQuestion]:
        return iter(self.questions)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of the file's bytes (read in chunks, so large files are fine)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def guess_split(path: str | Path) -> str | None:
    """``random`` / ``popular`` / ``adversarial`` when exactly one of them occurs in the file name, else None."""
    name = Path(path).name.lower()
    found = [split for split in SPLITS if split in name]
    return found[0] if len(found) == 1 else None


def load_questions(path: str | Path) -> PopeSet:
    """Read a POPE question file (JSON lines, or one JSON array of the same objects) into a `PopeSet`.

    Labels are normalised to lowercase ``yes``/``no`` and question ids to strings (the official files use ints).
    Errors name the file and the line (JSON lines) or item (JSON array) at fault.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"POPE question file not found: {path} (pass the path of a coco_pope_*.json file)")
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PopeDataError(f"{path}: not UTF-8 text ({e}); POPE files are JSON lines") from e
    if content.lstrip().startswith("["):
        entries = _array_entries(path, content)
    else:
        entries = _jsonl_entries(path, content)
    questions = _questions(path, entries)
    if not questions:
        raise PopeDataError(f"{path}: the question set is empty; expected one JSON object per line")
    return PopeSet(questions=questions, path=str(path), sha256=hashlib.sha256(raw).hexdigest(), split=guess_split(path))


def write_questions(questions: Iterable[PopeQuestion], path: str | Path) -> Path:
    """Write questions as official-style JSON lines (integer ids where the id is all digits), so they round-trip."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for q in questions:
        qid: int | str = int(q.question_id) if q.question_id.isdigit() else q.question_id
        lines.append(json.dumps({"question_id": qid, "image": q.image, "text": q.text, "label": q.label}))
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _jsonl_entries(path: Path, content: str) -> list[tuple[str, object]]:
    """(where, parsed object) for each non-blank line."""
    entries = []
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise PopeDataError(f"{path}, line {lineno}: not valid JSON ({e.msg}): {line[:80]!r}") from e
    return entries


def _array_entries(path: Path, content: str) -> list[tuple[str, object]]:
    try:
        items = json.loads(content)
    except json.JSONDecodeError as e:
        raise PopeDataError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from e
    if not isinstance(items, list):
        raise PopeDataError(f"{path}: expected a JSON list of question objects, got {type(items).__name__}")
    return [(f"item {i}", item) for i, item in enumerate(items, start=1)]


def _questions(path: Path, entries: list[tuple[str, object]]) -> list[PopeQuestion]:
    questions: list[PopeQuestion] = []
    seen: dict[str, str] = {}
    for where, obj in entries:
        if not isinstance(obj, dict):
            raise PopeDataError(f"{path}, {where}: expected a JSON object, got {type(obj).__name__}")
        missing = [key for key in _FIELDS if key not in obj]
        if missing:
            raise PopeDataError(f"{path}, {where}: missing field(s) {missing}; each question needs {list(_FIELDS)}")
        label = str(obj["label"]).strip().lower()
        if label not in LABELS:
            raise PopeDataError(f"{path}, {where}: label {obj['label']!r} is not 'yes' or 'no'")
        for key in ("text", "image"):
            if not isinstance(obj[key], str) or not obj[key].strip():
                raise PopeDataError(
                    f"{path}, {where}: {key} is {obj[key]!r}; each question needs a non-empty {key} string"
                )
        qid = str(obj["question_id"])
        if qid in seen:
            raise PopeDataError(f"{path}, {where}: question_id {qid} already used at {seen[qid]}; ids must be unique")
        seen[qid] = where
        questions.append(PopeQuestion(question_id=qid, image=obj["image"], text=obj["text"], label=label))
    return questions
