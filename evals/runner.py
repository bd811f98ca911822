"""The batched, resumable eval runner shared by POPE and CHAIR.

For each condition (no method, or one or more methods applied together) it generates greedily over the items in
left-padded batches, loading the next batch's images while the current one generates, and appends one JSON record
per item to ``results.jsonl`` (flushed per record). A rerun with the same output folder skips what is already
there, so an interrupted run loses at most the batch in flight. Under ``accelerate launch`` (or any launcher that
sets RANK/WORLD_SIZE) each process takes every WORLD_SIZE-th item, writes its own part, and rank 0 merges
(`lvlm_steer.evals.shards`). An image that cannot be decoded stops the run with its name, or with
``skip_unreadable`` is left out and listed in ``Runner.unreadable``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import lvlm_steer as ls
from lvlm_steer.evals.images import UnreadableImageError, open_rgb
from lvlm_steer.evals.io import JsonlAppender, read_jsonl, write_jsonl
from lvlm_steer.evals.shards import Shard
from lvlm_steer.method import Method

RESULTS = "results.jsonl"


@dataclass
class EvalItem:
    """One prompt about one image; ``fields`` are copied into its result record (label, split, ids, ...)."""

    id: str
    image: Path
    prompt: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class Condition:
    """A named set of methods applied together; the label is what reports show (``none`` for the baseline)."""

    label: str
    methods: list[Method]


def parse_conditions(specs: Sequence[str]) -> list[Condition]:
    """``["none", "ablate:heads=1.2", "ablate:heads=1.2+scale:heads=3.1"]``; ``+`` combines methods in one condition."""
    conditions, seen = [], set()
    for spec in specs or ["none"]:
        methods = ls.parse_specs([part for part in spec.split("+") if part.strip()])
        label = "+".join(m.spec() for m in methods) or "none"
        if label in seen:
            raise ls.MethodSpecError(f"condition {label!r} given twice")
        seen.add(label)
        conditions.append(Condition(label, methods))
    return conditions


def results_path(out_dir: Path, shard: Shard) -> Path:
    """The file this process appends to: results.jsonl alone, its own part under several processes."""
    return out_dir / (RESULTS if shard.world == 1 else f"results.rank{shard.rank}.jsonl")


def existing_records(out_dir: Path) -> list[dict[str, Any]]:
    """Every record already written in ``out_dir`` (merged file and any per-rank parts)."""
    records = list(read_jsonl(out_dir / RESULTS))
    for part in sorted(out_dir.glob("results.rank*.jsonl")):
        records += list(read_jsonl(part))
    return records


@dataclass
class Runner:
    model: Any
    processor: Any
    out_dir: Path
    batch_size: int = 8
    max_new_tokens: int = 16
    progress: bool = True
    shard: Shard = field(default_factory=Shard.from_env)
    skip_unreadable: bool = False
    unreadable: set[str] = field(default_factory=set)  # images left out because they could not be decoded

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        self.out_dir = Path(self.out_dir)
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        tokenizer.padding_side = "left"
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def run(
        self,
        items: Sequence[EvalItem],
        conditions: Sequence[Condition],
        answer_fields: Callable[[EvalItem, str], dict[str, Any]],
    ) -> list[dict[str, Any]]:
        """Generate for every (condition, item) not yet in ``out_dir``; return this shard's new records."""
        done = {(r["method"], r["id"]) for r in existing_records(self.out_dir)}
        mine = [item for i, item in enumerate(items) if i % self.shard.world == self.shard.rank]
        new: list[dict[str, Any]] = []
        with JsonlAppender(results_path(self.out_dir, self.shard)) as sink:
            for condition in conditions:
                todo = [item for item in mine if (condition.label, item.id) not in done]
                if not todo:
                    continue
                new += self._run_condition(todo, condition, answer_fields, sink)
        return new

    def _run_condition(self, todo, condition, answer_fields, sink) -> list[dict[str, Any]]:
        from tqdm.auto import tqdm

        batches = [todo[i : i + self.batch_size] for i in range(0, len(todo), self.batch_size)]
        bar = tqdm(total=len(todo), desc=condition.label, unit="item", disable=not self.progress, dynamic_ncols=True)
        records = []
        steering = ls.steer(self.model, *condition.methods, processor=self.processor) if condition.methods else None
        try:
            with ThreadPoolExecutor(max_workers=1) as loader:
                upcoming = loader.submit(self._prepare, batches[0])
                for k in range(len(batches)):
                    batch, inputs = upcoming.result()
                    if k + 1 < len(batches):  # load the next images while this batch generates
                        upcoming = loader.submit(self._prepare, batches[k + 1])
                    if not batch:  # every image of this batch was unreadable and skipped
                        continue
                    start = time.perf_counter()
                    answers = self._generate(steering, inputs)
                    seconds = (time.perf_counter() - start) / len(batch)
                    for item, answer in zip(batch, answers, strict=True):
                        record = {
                            "id": item.id,
                            "method": condition.label,
                            **item.fields,
                            "prompt": item.prompt,
                            "answer": answer,
                            **answer_fields(item, answer),
                            "seconds": round(seconds, 4),
                        }
                        sink.write(record)
                        records.append(record)
                    sink.sync()
                    bar.update(len(batches[k]))
        finally:
            bar.close()
            if steering is not None:
                steering.remove()
        return records

    def _prepare(self, batch: Sequence[EvalItem]) -> tuple[list[EvalItem], dict[str, Any] | None]:
        """(the items whose image decoded, their processor inputs); unreadable images raise or are skipped."""
        kept, images = [], []
        for item in batch:
            try:
                images.append([open_rgb(item.image)])
            except UnreadableImageError:
                if not self.skip_unreadable:
                    raise
                self.unreadable.add(str(item.image))
                continue
            kept.append(item)
        if not kept:
            return kept, None
        texts = [chat_text(self.processor, item.prompt) for item in kept]
        inputs = dict(self.processor(images=images, text=texts, padding=True, return_tensors="pt"))
        # the raw image and question per row, for methods that refine the image itself (CARVE)
        return kept, inputs | {"images": [group[0] for group in images], "questions": [item.prompt for item in kept]}

    def _generate(self, steering, inputs: dict[str, Any]) -> list[str]:
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        raw = {k: inputs.pop(k) for k in ("images", "questions") if k in inputs}  # Steering.generate routes them
        kwargs = dict(max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=self._pad_id)
        with torch.inference_mode():
            out = steering.generate(**inputs, **raw, **kwargs) if steering else self.model.generate(**inputs, **kwargs)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        return [a.strip() for a in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]


def answer_items(runner: Runner, items: Sequence[EvalItem], methods: Sequence[Method] = ()) -> list[str]:
    """Answers for ``items`` under ``methods``, in memory (no result files): for sweeps such as head calibration."""
    steering = ls.steer(runner.model, *methods, processor=runner.processor) if methods else None
    try:
        answers: list[str] = []
        for k in range(0, len(items), runner.batch_size):
            _, inputs = runner._prepare(items[k : k + runner.batch_size])  # skip_unreadable is off: all kept
            answers += runner._generate(steering, inputs)
        return answers
    finally:
        if steering is not None:
            steering.remove()


def chat_text(processor: Any, prompt: str) -> str:
    """The prompt as the model's chat template renders one user turn with one image."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def merge_parts(out_dir: Path, order: Sequence[str]) -> list[dict]:
    """Rank 0, once every process has finished: all records in one results.jsonl (no duplicates, in order).

    The file is replaced only when that changes it (parts to fold in, duplicates, order), and only after every
    writer has closed it: the caller holds the folder's lock and has heard "done" from every rank.
    """
    parts = sorted(out_dir.glob("results.rank*.jsonl"))
    current = list(read_jsonl(out_dir / RESULTS))
    records = dedupe(current + [r for part in parts for r in read_jsonl(part)], order)
    if parts or records != current:
        write_jsonl(out_dir / RESULTS, records)
    for part in parts:
        part.unlink()
    return records


def dedupe(records: list[dict[str, Any]], order: Sequence[str]) -> list[dict[str, Any]]:
    """One record per (method, id), the first written kept, sorted by method then the items' order."""
    position = {item_id: i for i, item_id in enumerate(order)}
    unique: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        unique.setdefault((r["method"], r["id"]), r)
    methods = list(dict.fromkeys(r["method"] for r in records))
    return sorted(unique.values(), key=lambda r: (methods.index(r["method"]), position.get(r["id"], len(position))))
