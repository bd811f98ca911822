"""Result files that survive a crash: JSON lines appended and flushed per record, summaries written atomically."""

from __future__ import annotations

import json
import os
import queue
import secrets
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class JsonlAppender:
    """Append one JSON object per line from a background thread, off the generation's critical path.

    Every record is flushed to the OS as soon as it is written (a killed process loses nothing handed over);
    `sync` makes the written lines durable (fsync) and is called once per batch. `close` drains the queue, also
    after Ctrl-C, so every record handed over reaches the file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_partial_last_line(self.path)
        self._file = self.path.open("a", encoding="utf-8")
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="jsonl-writer", daemon=True)
        self._thread.start()

    def write(self, record: dict[str, Any]) -> None:
        self._raise_if_failed()
        self._queue.put(json.dumps(record, ensure_ascii=False) + "\n")

    def sync(self) -> None:
        self._queue.put(_SYNC)

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()
        self._file.close()
        self._raise_if_failed()

    def _drain(self) -> None:
        while True:
            line = self._queue.get()
            if line is _STOP:
                return
            try:
                if line is _SYNC:
                    os.fsync(self._file.fileno())
                else:
                    self._file.write(line)
                    self._file.flush()
            except BaseException as exc:  # surfaced to the caller on the next write/close
                self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise OSError(f"writing {self.path} failed: {self._error}") from self._error

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_SYNC, _STOP = object(), object()


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Records of a results file; a torn last line (a crash mid-write) is skipped, any other bad line raises."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                return
            raise ValueError(f"{path}:{number}: not a JSON record ({exc}); fix or delete that line") from exc


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to a temporary file and rename it over ``path``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_replacing(path, [json.dumps(data, indent=2, ensure_ascii=False) + "\n"])


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Write a whole JSON-lines file atomically (used when merging shards)."""
    _write_replacing(Path(path), (json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def _write_replacing(path: Path, chunks: Iterable[str]) -> None:
    """Write ``chunks`` to a temporary file beside ``path``, make it durable, rename it over ``path``; on an error
    (a full disk) remove the temporary file and re-raise."""
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _temp_beside(path: Path) -> tuple[int, Path]:
    """A new ``<name>.<random>.tmp`` next to ``path``, created with the umask's permissions (mkstemp's are 0600,
    which would make every result file private whatever the user's umask). A killed run's leftovers end in .tmp."""
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp


def _truncate_partial_last_line(path: Path) -> None:
    """Drop a torn last line left by a crash, so the next append starts on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    with path.open("r+b") as f:
        f.truncate(cut)
