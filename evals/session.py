"""One eval run on an output folder, the same for POPE and CHAIR: join the other processes, lock the folder, tidy
what a killed run left, check that a resume is the same run, generate, merge, and write the summary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lvlm_steer.evals.out_dir import locked_out_dir, prepare_out_dir, remove_leftovers
from lvlm_steer.evals.run_state import claim_out_dir, generation_settings
from lvlm_steer.evals.runner import Condition, EvalItem, Runner, merge_parts
from lvlm_steer.evals.shards import gather_to_rank0, join_shards, wait_for_rank0

# (records of every condition, images left out as unreadable) -> the summary to write
Summarize = Callable[[list[dict[str, Any]], list[str]], dict[str, Any]]


def run_eval(
    model: Any,
    processor: Any,
    out_dir: str | Path,
    identity: dict[str, Any],
    items: Sequence[EvalItem],
    conditions: Sequence[Condition],
    answer_fields: Callable[[EvalItem, str], dict[str, Any]],
    summarize: Summarize,
    batch_size: int,
    max_new_tokens: int,
    skip_unreadable: bool,
    progress: bool,
) -> dict[str, Any] | None:
    """Generate what ``out_dir`` lacks and return ``summarize``'s summary (None on ranks other than 0)."""
    shard = join_shards()
    out_dir = prepare_out_dir(out_dir)
    tag = str(out_dir.resolve())
    with locked_out_dir(out_dir, shard.rank, shard.world):
        if shard.rank == 0:  # the only writer of run.json, summary.json and *.tmp
            remove_leftovers(out_dir)
            claim_out_dir(out_dir, {**identity, **generation_settings(model, max_new_tokens)})
        wait_for_rank0(shard, tag)  # no rank writes a record before rank 0 has accepted the folder
        runner = Runner(model, processor, out_dir, batch_size, max_new_tokens, progress, shard, skip_unreadable)
        runner.run(items, conditions, answer_fields)
        parts = gather_to_rank0(shard, tag, {"unreadable": sorted(runner.unreadable)})
        if parts is None:
            return None
        records = merge_parts(out_dir, [i.id for i in items])
        unreadable = sorted({path for part in parts for path in part["unreadable"]})
        return summarize(records, unreadable)
