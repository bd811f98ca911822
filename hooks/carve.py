"""CARVE, contrastive attention refinement for visual enhancement (Ge et al., arXiv 2509.06461).

An input-space method: it changes the pixels the model sees, not its attention.
1. Capture: greedy-generate up to `max_steps` tokens for the task question Q and for the general prompt G, both
   with the image; at each step t and each layer l in `layers`, record A_{l,t}, the head-mean attention of the
   last query row to the image tokens.
2. Contrast: A^Q_{l,t} / (A^G_{l,t} + lam) (step t of Q paired with step t of G), reshaped to the image-token
   grid(s) (`Adapter.image_grids`), upsampled bilinearly to the image size, summed over layers and over steps with
   weight t (later steps weigh more).
3. Mask (`lvlm_steer.image_regions`): the top p of pixels, then the best max(k, int(p * regions)) connected
   regions by summed score; the image times the mask, cropped to its bounding box, upscaled (Lanczos).
4. Answer Q with [original, refined] (models trained on several images) or the refined image alone (`final`).

Faster than the official code (three uncached passes over eager attention): the capture passes use the KV cache
and share one prefill of the common prefix (the image) between Q and G, then decode side by side in one batch of
two rows; only the last row of the captured layers is probed (O(keys) per head, no (q x k) matrix); the last step
stops right after the last captured layer; G stops after as many steps as Q took (the contrast pairs step t with
step t); and A^G is cached per image, so several questions about one image pay for G once. The upsampling is
linear, so steps and layers are summed on the token grid and upsampled once.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from PIL import Image

from lvlm_steer.attention import AttentionCall
from lvlm_steer.attention_rows import masked_softmax, row_logits, rows_mask
from lvlm_steer.compat import cache_argument
from lvlm_steer.errors import MethodConfigError, MissingImagesError, SteeringError
from lvlm_steer.image_regions import WHOLE_IMAGE, Box, Refined, refine_image, score_map
from lvlm_steer.method import Method
from lvlm_steer.model_info import ModelInfo
from lvlm_steer.registry import register_method

log = logging.getLogger(__name__)

GENERAL_PROMPT = "Write a general description of the image."
FINAL_MODES = ("auto", "both", "refined")
DECODE_MODES = ("auto", "batch", "sequential")
GENERAL_CACHE_SIZE = 64


def _parse_layers(text: str) -> tuple[int, int] | None:
    if text.strip().lower() in ("", "auto", "none"):
        return None
    lo, dash, hi = text.partition("-")
    return (int(lo), int(hi)) if dash else (int(lo), int(lo))


def _format_layers(layers: tuple[int, int] | None) -> str:
    return "auto" if layers is None else f"{layers[0]}-{layers[1]}"


def default_layers(num_layers: int) -> tuple[int, int]:
    """Layers 20-25 for 28-32 layer models (the paper's), else the same relative depth (2/3 to 5/6)."""
    if 28 <= num_layers <= 32:
        return 20, 25
    lo = min(num_layers - 1, round(num_layers * 2 / 3))
    return lo, min(num_layers - 1, max(lo, round(num_layers * 5 / 6)))


class _CaptureDone(Exception):
    """Raised inside the last capture forward once the last captured layer is read (the rest is not needed)."""


@dataclass
class Attention:
    """One capture run: ``rows`` (steps, layers, image cells) head-mean attention, and the generated ``tokens``.

    ``complete`` is False when the run was cut short by a step limit below `CARVE.max_steps` (pairing with a
    shorter run needs no more steps); such a run may be too short for a later, longer pairing.
    """

    rows: torch.Tensor
    tokens: list[int]
    prompt_ids: torch.Tensor
    complete: bool = True

    @property
    def steps(self) -> int:
        return int(self.rows.shape[0])


class _Capture:
    """Recording state while capture forwards run: one or more runs, each fed by one batch row."""

    def __init__(self, layers: range, columns: torch.Tensor, runs: int = 1) -> None:
        self.layers = layers
        self.columns = [columns] * runs  # per run: key slots of the image's grid cells, in tile order
        self.seq_len = 0  # keys the forward in flight sees (prefix + everything fed so far)
        self.stop_after: int | None = None
        self.steps: list[list[dict[int, torch.Tensor]]] = [[] for _ in range(runs)]
        self.feeding: list[int | None] = [0]  # the run each batch row of the forward in flight belongs to

    def begin_step(self) -> None:
        for run in self.feeding:
            if run is not None:
                self.steps[run].append({})

    def record(self, layer: int, probs: torch.Tensor, key_len: int) -> None:
        """``probs`` (B, H, 1, K): the last row's probabilities of each batch row."""
        offset = self.seq_len - key_len  # a sliding-window layer holds only the last keys
        mean = probs[:, :, 0].mean(1)
        for b, run in enumerate(self.feeding):
            if run is None:
                continue
            if offset > int(self.columns[run].min()):
                raise SteeringError(f"carve: layer {layer} no longer sees the image (sliding window); choose others")
            self.steps[run][-1][layer] = mean[b, self.columns[run].to(mean.device) - offset]

    def stacked(self, run: int = 0) -> torch.Tensor:
        steps = self.steps[run]
        return torch.stack([torch.stack([s[layer] for layer in self.layers]) for s in steps]).float().cpu()


@register_method
@dataclass
class CARVE(Method):
    """Refine the image to where the question's attention differs from a general description's, then answer."""

    name: ClassVar[str] = "carve"
    summary: ClassVar[str] = "crop the image to question-specific attention (A_Q / A_G), answer on the refined image"
    paper: ClassVar[str] = "Ge et al., Focusing by Contrastive Attention (CARVE), arXiv 2509.06461"
    needs_raw_inputs: ClassVar[bool] = True

    layers: tuple[int, int] | None = field(
        default=None,
        metadata={
            "parse": _parse_layers,
            "format": _format_layers,
            "help": "captured layers lo-hi inclusive (auto: 20-25 for 28-32 layers, same depth otherwise)",
        },
    )
    p: float = field(default=0.2, metadata={"help": "fraction of pixels kept before region selection, (0, 1]"})
    k: int = field(default=3, metadata={"help": "keep at least this many connected regions"})
    lam: float = field(default=1e-8, metadata={"help": "lambda in A_Q / (A_G + lambda)"})
    max_steps: int = field(default=32, metadata={"help": "generated steps captured per prompt"})
    final: str = field(default="auto", metadata={"help": "final pass: both (original + refined), refined, auto"})
    cache_general: bool = field(default=True, metadata={"help": "reuse A_G for an image seen before"})
    general_prompt: str = field(default=GENERAL_PROMPT, metadata={"help": "the contrast prompt G"})
    capture_decode: str = field(
        default="auto", metadata={"help": "Q and G runs: batch (one 2-row batch), sequential, auto (batch off CPU)"}
    )

    def __post_init__(self) -> None:
        if not 0 < self.p <= 1:
            raise MethodConfigError(f"carve: p must be in (0, 1], got {self.p}")
        if self.k < 1:
            raise MethodConfigError(f"carve: k must be >= 1, got {self.k}")
        if self.lam < 0:
            raise MethodConfigError(f"carve: lam must be >= 0, got {self.lam}")
        if self.max_steps < 1:
            raise MethodConfigError(f"carve: max_steps must be >= 1, got {self.max_steps}")
        if self.capture_decode not in DECODE_MODES:
            raise MethodConfigError(
                f"carve: capture_decode must be one of {', '.join(DECODE_MODES)}, got {self.capture_decode!r}"
            )
        if self.final not in FINAL_MODES:
            raise MethodConfigError(f"carve: final must be one of {', '.join(FINAL_MODES)}, got {self.final!r}")
        if self.layers is not None and not 0 <= self.layers[0] <= self.layers[1]:
            raise MethodConfigError(f"carve: layers must be lo-hi with 0 <= lo <= hi, got {self.layers}")
        self._capture: _Capture | None = None
        self._general: OrderedDict[tuple, Attention] = OrderedDict()
        self._running = 0  # > 0 inside refine/generate: the forwards are CARVE's own
        self._warned = False
        self.last_refined: list[Refined] = []
        self.last_seconds: dict[str, float] = {}  # where the last generate spent its time: refine, answer

    # -- setup -------------------------------------------------------------------------------------------
    def layer_range(self, info: ModelInfo) -> range:
        lo, hi = self.layers if self.layers is not None else default_layers(info.num_layers)
        return range(lo, hi + 1)

    def validate(self, info: ModelInfo) -> None:
        layers = self.layer_range(info)
        if layers.stop > info.num_layers:
            raise MethodConfigError(
                f"carve: layers {layers.start}-{layers.stop - 1} do not fit this model's text layers "
                f"0..{info.num_layers - 1}; choose layers=lo-hi with hi <= {info.num_layers - 1} (or layers=auto)"
            )

    def requires_images(self) -> bool:
        return True

    def attention_layers(self, info: ModelInfo) -> frozenset[int]:
        return frozenset(self.layer_range(info))

    def prepare(self, steering, forward_kwargs: dict[str, Any]) -> None:
        if not self._running and not self._warned:
            self._warned = True
            log.warning(
                "carve changes the image, which a plain model(...) / model.generate(...) call cannot do: that call "
                "runs the model unchanged. Use steering.generate(**inputs, images=[...], questions=[...]) or "
                "carve.refine(steering, image, question)."
            )

    @contextlib.contextmanager
    def _own_forwards(self):
        self._running += 1
        try:
            yield
        finally:
            self._running -= 1

    # -- capture: probe the last row of the captured layers, pass the attention through unchanged ----------
    def edit_attention(self, call: AttentionCall) -> torch.Tensor:
        cap = self._capture
        if cap is not None:
            last = call.query.shape[2] - 1
            probs = masked_softmax(row_logits(call, last), rows_mask(call, last))  # (B, H, 1, K)
            cap.record(call.layer_idx, probs, call.key.shape[2])
            if cap.stop_after == call.layer_idx:
                raise _CaptureDone
        return call.base()

    def capture(
        self, steering, image: Image.Image, prompts: list[str], limit: int | None = None, paired: bool = False
    ) -> tuple[list[Attention], list]:
        """Greedy capture runs of ``prompts`` about one image, sharing the prefill of their common prefix.

        Each run stops at EOS or after ``limit`` (default `max_steps`) steps; with ``paired``, the runs after the
        first stop after as many steps as the first took (the contrast pairs step t with step t, so later steps
        would never be used). Returns one `Attention` per prompt and the image's grid tiles (the columns of
        ``rows``, in tile order).
        """
        limit = self.max_steps if limit is None else min(limit, self.max_steps)
        processor = _need_processor(steering)
        model = steering.model
        encs = [dict(processor(images=[[image]], text=[_chat(processor, p, 1)], return_tensors="pt")) for p in prompts]
        for enc in encs:
            enc.pop("labels", None)  # PaliGemma's processor adds training labels
        try:
            tiles = [t for t in steering.adapter.image_grids(encs[0])[0] if t.image == 0]
        except SteeringError as exc:
            raise SteeringError(
                f"carve maps attention onto the image-token grid, which is unknown here: {exc}"
            ) from exc
        if not tiles:
            raise MissingImagesError("carve: the prompt has no image tokens; the processor dropped the image")
        ids = [e["input_ids"][0] for e in encs]
        prefix = _common_prefix(ids)
        spans = steering.adapter.image_spans(ids[0])
        if prefix < max(e for _, e in spans) or steering.adapter.bidirectional_prompt:
            prefix = 0  # the image is not in the shared prefix, or the prefix sees what follows: prefill each alone
        layers = self.layer_range(steering.info)
        params = inspect.signature(model.forward).parameters
        cache_kw = cache_argument(model)
        extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        # one row without padding: no attention mask (a causal forward); per-token inputs are sliced like the ids
        shape = encs[0]["input_ids"].shape
        token_keys = [
            k for k, v in encs[0].items() if torch.is_tensor(v) and v.shape == shape and k != "attention_mask"
        ]
        vision = {k: v for k, v in encs[0].items() if k not in token_keys and k != "attention_mask"}
        from transformers import DynamicCache

        runs = []
        with torch.inference_mode(), steering.adapter.isolated_state(), self._own_forwards():
            shared = DynamicCache()
            if prefix:
                head = {k: encs[0][k][:, :prefix] for k in token_keys} | vision
                model(**_to(head, model), **{cache_kw: shared}, use_cache=True, **extra)
            columns = torch.cat([t.positions.flatten() for t in tiles])
            side_by_side = paired and len(encs) == 2 and prefix and limit > 1 and self._batch_decode(model)
            if side_by_side and _batchable(steering.adapter, shared):
                run = _Run(steering, self, layers, cache_kw, extra, prefix, token_keys)
                return run.pair(encs, columns, limit, shared), tiles
            for n, enc in enumerate(encs):
                cache = shared if n == len(encs) - 1 else copy.deepcopy(shared)
                feed = {k: enc[k][:, prefix:] for k in token_keys} | ({} if prefix else vision)
                cap = _Capture(layers, columns)
                steps = runs[0].steps if paired and runs else limit
                tokens = self._greedy(
                    steering, cap, steps, _to(feed, model), cache, cache_kw, extra, prefix, token_keys
                )
                runs.append(self._attention(cap.stacked(), tokens, enc["input_ids"], steps, model))
        return runs, tiles

    def _batch_decode(self, model) -> bool:
        """Decode Q and G as one 2-row batch? On CPU two-row steps enter multi-threaded GEMMs that one-row steps
        (matrix-vector) avoid; on a busy host each such call waits for its threads, so "auto" keeps CPU sequential."""
        if self.capture_decode != "auto":
            return self.capture_decode == "batch"
        return next(model.parameters()).device.type != "cpu"

    def _attention(self, rows: torch.Tensor, tokens: list[int], prompt_ids, limit: int, model) -> Attention:
        cut = rows.shape[0] == limit < self.max_steps and (not tokens or tokens[-1] not in _eos_ids(model))
        return Attention(rows, tokens, prompt_ids, complete=not cut)

    def _greedy(self, steering, cap, limit, feed, cache, cache_kw, extra, prefix, token_keys) -> list[int]:
        eos = _eos_ids(steering.model)
        banned = [steering.adapter.image_token_id]
        generated_type = steering.adapter.generated_token_type
        cap.seq_len = prefix + feed["input_ids"].shape[1]
        tokens: list[int] = []
        self._capture = cap
        try:
            for t in range(limit):
                cap.begin_step()
                cap.stop_after = cap.layers[-1] if t == limit - 1 else None
                try:
                    out = steering.model(**feed, **{cache_kw: cache}, use_cache=True, **extra)
                except _CaptureDone:
                    break
                scores = out.logits[0, -1].float()
                scores[banned] = float("-inf")
                token = int(scores.argmax())
                tokens.append(token)
                if token in eos:
                    break
                ids = torch.tensor([[token]], device=feed["input_ids"].device)
                feed = {"input_ids": ids} | {
                    k: torch.full_like(ids, generated_type) for k in token_keys if k != "input_ids"
                }
                cap.seq_len += 1
        finally:
            self._capture = None
        return tokens

    # -- contrast, mask, refine ---------------------------------------------------------------------------
    def contrast(self, question: torch.Tensor, general: torch.Tensor) -> torch.Tensor:
        """Per image cell: sum over paired steps t (weight t) and layers of A_Q / (A_G + lam)."""
        steps = min(question.shape[0], general.shape[0])
        ratio = question[:steps] / (general[:steps] + self.lam)  # (T, L, N)
        weights = torch.arange(1, steps + 1, dtype=ratio.dtype)  # t - t_start + 1
        return (weights[:, None, None] * ratio).sum(dim=(0, 1))

    def score(self, cells: torch.Tensor, tiles: list, size: tuple[int, int]) -> torch.Tensor:
        """(H, W) pixel score map of per-cell scores laid out on the image's tiles."""
        grids, start = [], 0
        for tile, box in zip(tiles, tile_boxes(tiles), strict=True):
            n = tile.rows * tile.cols
            if box is not None:
                grids.append((cells[start : start + n].reshape(tile.rows, tile.cols), box))
            start += n
        return score_map(grids, size)

    def refine(self, steering, image: Image.Image, question: str) -> Refined:
        """The refined image for ``question`` (with its score map, mask and crop box)."""
        with self._own_forwards():
            return self._refine(steering, image.convert("RGB"), question)

    def _refine(self, steering, image: Image.Image, question: str) -> Refined:
        layers = self.layer_range(steering.info)
        # A_G depends on the model, everything steering it, the image, G and the captured layers
        key = (id(steering.model), steering.describe(), _image_key(image), self.general_prompt, self.max_steps, layers)
        general = self._general.get(key) if self.cache_general else None
        if general is None:  # one shared prefill; G needs no more steps than Q took
            (question_run, general), tiles = self.capture(steering, image, [question, self.general_prompt], paired=True)
        else:
            (question_run,), tiles = self.capture(
                steering, image, [question], limit=general.steps if general.complete else None
            )
            if question_run.steps > general.steps and not general.complete:  # the cached G run was cut too short
                (general,), _ = self.capture(steering, image, [self.general_prompt], limit=question_run.steps)
        if self.cache_general:
            self._general[key] = general
            self._general.move_to_end(key)
            while len(self._general) > GENERAL_CACHE_SIZE:
                self._general.popitem(last=False)
        cells = self.contrast(question_run.rows, general.rows)
        return refine_image(image, self.score(cells, tiles, image.size), self.p, self.k)

    # -- the whole method -----------------------------------------------------------------------------------
    def generate(self, steering, images=None, questions=None, **inputs: Any) -> Any:
        """Refine each row's image for its question, then answer on [original, refined] or the refined image.

        ``images`` (one PIL image per row) and ``questions`` (the user text per row) are required; the returned
        sequences are ``inputs["input_ids"]`` (when given) followed by the final pass's new tokens.
        """
        if images is None or questions is None:
            raise SteeringError(
                "carve refines the image itself, so it needs the raw inputs: call "
                "steering.generate(**inputs, images=[PIL image per row], questions=[question per row])"
            )
        images = [im[0] if isinstance(im, (list, tuple)) else im for im in images]
        questions = [questions] if isinstance(questions, str) else list(questions)
        if len(images) != len(questions) or not images:
            raise SteeringError(f"carve: {len(images)} images for {len(questions)} questions; give one of each per row")
        prompt = {k: v for k, v in inputs.items() if torch.is_tensor(v)}
        options = {k: v for k, v in inputs.items() if not torch.is_tensor(v)}
        start = time.perf_counter()
        self.last_refined = [self.refine(steering, im, q) for im, q in zip(images, questions, strict=True)]
        refined = time.perf_counter()
        both = self.final == "both" or (self.final == "auto" and steering.adapter.multi_image)
        final_images = [
            [im.convert("RGB"), r.image] if both else [r.image] for im, r in zip(images, self.last_refined, strict=True)
        ]
        processor = steering.processor
        texts = [_chat(processor, q, len(ims)) for q, ims in zip(questions, final_images, strict=True)]
        final = dict(processor(images=final_images, text=texts, padding=True, padding_side="left", return_tensors="pt"))
        final.pop("labels", None)
        with self._own_forwards():
            out = steering.model.generate(**_to(final, steering.model), **options)
        self.last_seconds = {"refine": refined - start, "answer": time.perf_counter() - refined}
        if not torch.is_tensor(out) or "input_ids" not in prompt:
            return out
        new = out[:, final["input_ids"].shape[1] :]
        return torch.cat([prompt["input_ids"].to(new.device), new], dim=1)


def tile_boxes(tiles: list) -> list[Box | None]:
    """Where each grid tile sits in its image; None for crops whose place the tokens do not tell (skipped)."""
    placed = [t for t in tiles if t.tile_row is not None and t.tile_col is not None]
    n_rows = max((t.tile_row for t in placed), default=0) + 1
    n_cols = max((t.tile_col for t in placed), default=0) + 1
    unplaced_crops = sum(1 for t in tiles if t.kind == "tile" and t.tile_row is None)
    boxes: list[Box | None] = []
    for t in tiles:
        if t.tile_row is not None and t.tile_col is not None:
            r, c = t.tile_row, t.tile_col
            boxes.append((r / n_rows, c / n_cols, (r + 1) / n_rows, (c + 1) / n_cols))
        elif t.kind == "tile" and unplaced_crops > 1:
            boxes.append(None)
        else:
            boxes.append(WHOLE_IMAGE)
    if all(b is None for b in boxes):
        raise SteeringError("carve: the adapter cannot place this image's crops in the image; no grid to map")
    return boxes


class _Run:
    """Question and general-prompt capture runs decoded side by side, one batch row each.

    After the shared prefix, each prompt's own text is one forward (its own cache copy, so no padding inside
    the prompt); then the two caches are joined into one batch, the shorter left-padded with masked slots, and
    every later step feeds both rows at their true positions (1-D position ids; the adapter says when a model
    needs more). Decoding two rows costs little more than one where the weights dominate.
    """

    def __init__(self, steering, carve: CARVE, layers: range, cache_kw: str, extra: dict, prefix: int, token_keys):
        self.steering, self.carve, self.layers = steering, carve, layers
        self.model = steering.model
        self.cache_kw, self.extra, self.prefix, self.token_keys = cache_kw, extra, prefix, token_keys
        self.eos = _eos_ids(self.model)
        self.banned = [steering.adapter.image_token_id]

    def forward(self, feed: dict[str, Any], cache) -> torch.Tensor:
        out = self.model(**_to(feed, self.model), **{self.cache_kw: cache}, use_cache=True, **self.extra)
        scores = out.logits[:, -1].float()
        scores[:, self.banned] = float("-inf")
        return scores.argmax(-1).cpu()

    def pair(self, encs: list[dict], columns: torch.Tensor, limit: int, shared) -> list[Attention]:
        cap = _Capture(self.layers, columns, runs=2)
        caches = [copy.deepcopy(shared), shared]
        tokens: list[list[int]] = [[], []]
        done = [False, False]
        lengths = []
        self.carve._capture = cap
        try:
            for r, enc in enumerate(encs):  # step 1: each prompt's own text, alone
                feed = {k: enc[k][:, self.prefix :] for k in self.token_keys}
                cap.feeding, cap.seq_len = [r], self.prefix + feed["input_ids"].shape[1]
                lengths.append(cap.seq_len)
                cap.begin_step()
                tokens[r].append(int(self.forward(feed, caches[r])[0]))
                done[r] = tokens[r][-1] in self.eos
            # one spare masked slot: the joined cache is longer than any single-row sequence the steering's
            # per-forward context recorded, so the context starts afresh for the new (two-row) batch
            width = max(lengths) + 1
            pads = [width - n for n in lengths]
            cap.columns = [columns + pad for pad in pads]
            cache = _join_left_padded(caches, pads)
            valid = torch.ones(2, width, dtype=torch.long)
            for r, pad in enumerate(pads):
                valid[r, :pad] = 0
            generated = self.steering.adapter.generated_token_type
            for t in range(1, limit):
                if done[0]:  # paired: the general run needs no more steps than the question run took
                    break
                ids = torch.tensor([[tokens[0][-1]], [tokens[1][-1]]])
                valid = torch.cat([valid, torch.ones(2, 1, dtype=torch.long)], dim=1)
                feed = {
                    "input_ids": ids,
                    "attention_mask": valid,
                    "position_ids": torch.tensor([[lengths[0] + t - 1], [lengths[1] + t - 1]]),
                } | {k: torch.full_like(ids, generated) for k in self.token_keys if k != "input_ids"}
                cap.feeding = [None if d else r for r, d in enumerate(done)]
                cap.seq_len = width + t
                cap.begin_step()
                cap.stop_after = self.layers[-1] if t == limit - 1 else None
                try:
                    step = self.forward(feed, cache)
                except _CaptureDone:
                    break
                for r in range(2):
                    if not done[r]:
                        tokens[r].append(int(step[r]))
                        done[r] = tokens[r][-1] in self.eos
        finally:
            self.carve._capture = None
        question = self.carve._attention(cap.stacked(0), tokens[0], encs[0]["input_ids"], limit, self.model)
        general = self.carve._attention(cap.stacked(1), tokens[1], encs[1]["input_ids"], question.steps, self.model)
        return [question, general]


def _batchable(adapter, cache) -> bool:
    """Rows can be decoded side by side: 1-D position ids, and every cache layer holds all keys (no window)."""
    return adapter.plain_position_ids and all(k is not None and s is None for k, _, s in cache)


def _join_left_padded(caches: list, pads: list[int]):
    """One batch cache from single-row caches, row r left-padded by ``pads[r]`` slots (masked by the caller)."""
    from transformers import DynamicCache

    layers = []
    for per_row in zip(*caches, strict=True):
        keys = [torch.nn.functional.pad(k, (0, 0, pad, 0)) for (k, _, _), pad in zip(per_row, pads, strict=True)]
        values = [torch.nn.functional.pad(v, (0, 0, pad, 0)) for (_, v, _), pad in zip(per_row, pads, strict=True)]
        layers.append((torch.cat(keys), torch.cat(values)))
    return DynamicCache(ddp_cache_data=layers)


def _need_processor(steering):
    if steering.processor is None:
        raise SteeringError("carve builds its own prompts and images: pass steer(model, carve, processor=processor)")
    return steering.processor


def _chat(processor, text: str, n_images: int) -> str:
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _common_prefix(rows: list[torch.Tensor]) -> int:
    """Length of the common prefix of all rows, leaving at least one token of each row to feed."""
    n = min(r.shape[0] for r in rows) - 1
    for r in rows[1:]:
        diff = (rows[0][:n] != r[:n]).nonzero()
        n = int(diff[0]) if diff.numel() else n
    return n


def _eos_ids(model) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _image_key(image: Image.Image) -> str:
    return hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()


def _to(inputs: dict[str, Any], model) -> dict[str, Any]:
    """Tensors onto the model's device; float tensors (pixels) in the model's dtype."""
    param = next(model.parameters())
    dtype = getattr(model, "dtype", param.dtype)
    return {
        k: (v.to(param.device, dtype) if v.is_floating_point() else v.to(param.device)) if torch.is_tensor(v) else v
        for k, v in inputs.items()
    }
