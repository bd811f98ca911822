"""An eval's output folder: checked before the model loads, locked while a run writes to it, tidied on the next run.

The lock is an advisory ``flock`` on ``.lock`` (``.lock.rankN`` for the other ranks of a launch), which the OS
releases when its process dies, so a lock left by a killed run is simply taken over. The file holds the PID of
its holder, so a second eval on the same folder is told which process has it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lvlm_steer.errors import SteeringError

try:
    import fcntl
except ImportError:  # not on Windows: no locking there
    fcntl = None


class OutDirBusyError(SteeringError, RuntimeError):
    """Another eval process is writing to the same output folder."""


def prepare_out_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` (or check it) and make sure it is a writable folder: before any slow work starts."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SteeringError(f"--out {out_dir} is a file, not a folder; pass a folder path")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise SteeringError(f"--out {out_dir} is not writable; pass a folder you can write to")
    return out_dir


def _lock_name(rank: int) -> str:
    return ".lock" if rank == 0 else f".lock.rank{rank}"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"PID {info['pid']} on {info.get('host', '?')}, since {since}"


def _try_lock(path: Path):
    """An open file holding an exclusive lock on ``path``, or None when another process holds it."""
    handle = path.open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


@contextmanager
def locked_out_dir(out_dir: Path, rank: int = 0, world: int = 1) -> Iterator[None]:
    """Hold this process's lock on ``out_dir`` for the block; a busy folder raises `OutDirBusyError` at once."""
    if fcntl is None:
        yield
        return
    path = out_dir / _lock_name(rank)
    handle = _try_lock(path)
    if handle is None:
        raise OutDirBusyError(
            f"{out_dir} is in use by another eval ({_holder(path)}); wait for it to finish, or pass another --out"
        )
    try:
        if world == 1:  # a single process also merges and deletes the per-rank parts: no rank may be running
            for other in sorted(out_dir.glob(".lock.rank*")):
                probe = _try_lock(other)
                if probe is None:
                    raise OutDirBusyError(f"{out_dir} is in use by a sharded eval ({_holder(other)}); wait for it")
                probe.close()
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
        handle.flush()
        yield
    finally:
        handle.truncate(0)
        handle.close()


def check_not_busy(out_dir: Path, rank: int = 0, world: int = 1) -> None:
    """Raise `OutDirBusyError` now if another eval holds ``out_dir`` (the run itself takes the lock later)."""
    with locked_out_dir(out_dir, rank, world):
        pass


def remove_leftovers(out_dir: Path) -> list[str]:
    """Delete what a killed run left behind: half-written ``*.tmp`` files and old ``rank*.done`` markers."""
    removed = []
    for pattern in ("*.tmp", "rank*.done"):
        for path in out_dir.glob(pattern):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed
