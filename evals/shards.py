"""Several processes on one eval (``accelerate launch``, ``torchrun``): who does which items, and the merge.

Each process takes every WORLD_SIZE-th item and writes its own part; rank 0 waits until every rank has posted
"done" and merges the parts. The processes meet through the launcher's key-value store (torch's ``env://``
rendezvous, MASTER_ADDR/MASTER_PORT), first within `JOIN_TIMEOUT_S`: a WORLD_SIZE left in the environment of a
lone process is then an error within a minute instead of a silent wait for peers that never come.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from lvlm_steer.errors import SteeringError

JOIN_TIMEOUT_S = 60.0
DONE_TIMEOUT_S = 24 * 3600.0
LAUNCH_HINT = (
    "for one process, unset WORLD_SIZE and RANK (env -u WORLD_SIZE -u RANK ...); for several, start them with "
    "accelerate launch --num_processes N -m lvlm_steer.cli ... (or torchrun), which sets MASTER_ADDR/MASTER_PORT"
)


class ShardSetupError(SteeringError, RuntimeError):
    """RANK/WORLD_SIZE say this is one of several processes, but the others cannot be reached."""


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1
    store: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def from_env(cls) -> Shard:
        """This process's rank and world size from RANK/WORLD_SIZE (1 process when unset); no connection yet."""
        try:
            world = int(os.environ.get("WORLD_SIZE", 1))
            rank = int(os.environ.get("RANK", 0))
        except ValueError:
            raise ShardSetupError(
                f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} / RANK={os.environ.get('RANK')!r} are not "
                f"whole numbers; {LAUNCH_HINT}"
            ) from None
        if world < 1 or not 0 <= rank < world:
            raise ShardSetupError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world}); {LAUNCH_HINT}")
        return cls(rank, world)


_joined: dict[tuple[int, int], Shard] = {}
_calls: dict[str, int] = {}


def join_shards(timeout_s: float = JOIN_TIMEOUT_S) -> Shard:
    """`Shard.from_env`, connected to its peers (once per process); raise `ShardSetupError` when they are absent.

    The CLI calls it before loading the model, so that a missing peer is found in ``timeout_s``, not after a load.
    """
    shard = Shard.from_env()
    if shard.world == 1:
        return shard
    key = (shard.rank, shard.world)
    if key not in _joined:
        _joined[key] = Shard(shard.rank, shard.world, _meet(shard, timeout_s))
    return _joined[key]


def _meet(shard: Shard, timeout_s: float) -> Any:
    import torch.distributed as dist

    where = f"WORLD_SIZE={shard.world}, RANK={shard.rank}"
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        unset = ", ".join(missing)
        raise ShardSetupError(f"{where} is set but {unset} is not: no launcher started this process; {LAUNCH_HINT}")
    address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        store, _, _ = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout_s)))
        store = dist.PrefixStore("lvlm_steer", store)
        store.add("joined", 1)
        _wait_count(store, "joined", shard.world, timeout_s)
    except Exception as exc:
        raise ShardSetupError(
            f"{where}: not all {shard.world} processes met at {address} within {timeout_s:.0f} s ({exc}); {LAUNCH_HINT}"
        ) from exc
    return store


def _wait_count(store: Any, key: str, target: int, timeout_s: float) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while store.add(key, 0) < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{store.add(key, 0)} of {target} processes arrived")
        time.sleep(0.1)


def _numbered(tag: str) -> str:
    n = _calls[tag] = _calls.get(tag, 0) + 1
    return f"{tag}#{n}"


def wait_for_rank0(shard: Shard, tag: str) -> None:
    """Rank 0 says it has passed this point; the other ranks wait until it has (e.g. until it checked the folder)."""
    if shard.world == 1:
        return
    key = f"{_numbered(tag)}/rank0"
    if shard.rank == 0:
        shard.store.set(key, "ok")
    else:
        shard.store.wait([key], timedelta(seconds=DONE_TIMEOUT_S))


def gather_to_rank0(shard: Shard, tag: str, payload: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Post this rank's ``payload`` under ``tag``; on rank 0 wait for every rank's and return them (else None).

    ``tag`` names one eval (e.g. its output folder); a process that runs several evals (the demo) numbers them.
    """
    if shard.world == 1:
        return [payload]
    if shard.store is None:
        raise ShardSetupError(f"WORLD_SIZE={shard.world}: call join_shards() before running a sharded eval")
    prefix = f"{_numbered(tag + '/done')}"
    shard.store.set(f"{prefix}/{shard.rank}", json.dumps(payload))
    if shard.rank != 0:
        return None
    keys = [f"{prefix}/{r}" for r in range(shard.world)]
    shard.store.wait(keys, timedelta(seconds=DONE_TIMEOUT_S))
    return [json.loads(shard.store.get(k)) for k in keys]
