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

The capture runs are core's (`lvlm_steer.capture_runs`, on the attention-capture service `lvlm_steer.capture`),
so CARVE edits no attention and composes with attention editors on the same layers (VAR, PAI, ...): at a layer
that another method edits it reads the attention before that edit, at later layers the edited model's. The pixel
geometry (tile boxes, score maps, regions, crops) is `lvlm_steer.image_regions`.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from PIL import Image

from lvlm_steer.capture_runs import Attention, CaptureRunner, to_model
from lvlm_steer.errors import MethodConfigError, MissingImagesError, SteeringError
from lvlm_steer.image_regions import Refined, refine_image, tile_boxes, tile_score_map
from lvlm_steer.method import Method
from lvlm_steer.model_info import ModelInfo
from lvlm_steer.registry import register_method

__all__ = ["CARVE", "Attention", "default_layers", "tile_boxes"]


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
        self._runner: CaptureRunner | None = None
        self._general: OrderedDict[tuple, Attention] = OrderedDict()
        self._running = 0  # > 0 inside refine/generate: the forwards are CARVE's own
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

    def attach(self, steering) -> list[Any]:
        """Subscribe to the captured layers' attention (the core capture service: no editor slot taken)."""
        self._runner = CaptureRunner(steering, self.layer_range(steering.info), self.max_steps)
        return [self._runner.subscription]

    def needs_steered_generate(self) -> bool:
        """A plain ``model(...)`` / ``model.generate`` would run on the unrefined image: refused (the core's error
        names ``steered.generate``); CARVE's own forwards (`refine`, `capture`, the final pass) are allowed."""
        return not self._running

    @contextlib.contextmanager
    def _own_forwards(self):
        self._running += 1
        try:
            yield
        finally:
            self._running -= 1

    # -- capture: greedy runs with the captured layers' last-row attention (lvlm_steer.capture_runs) -------------
    def capture(
        self, steering, image: Image.Image, prompts: list[str], limit: int | None = None, paired: bool = False
    ) -> tuple[list[Attention], list]:
        """Greedy capture runs of ``prompts`` about one image, sharing the prefill of their common prefix.

        Each run stops at EOS or after ``limit`` (default `max_steps`) steps; with ``paired``, the runs after the
        first stop after as many steps as the first took (the contrast pairs step t with step t, so later steps
        would never be used). Returns one `Attention` per prompt and the image's grid tiles (the columns of
        ``rows``, in tile order).
        """
        runner = self._runner
        if runner is None or runner.steering is not steering:
            raise SteeringError("carve.capture needs the steering carve is attached to: ls.steer(model, carve, ...)")
        limit = self.max_steps if limit is None else min(limit, self.max_steps)
        processor = _need_processor(steering)
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
        columns = torch.cat([t.positions.flatten() for t in tiles])
        with self._own_forwards():
            runs = runner.run(encs, columns, limit, paired=paired, batch_decode=self._batch_decode(steering.model))
        return runs, tiles

    def _batch_decode(self, model) -> bool:
        """Decode Q and G as one 2-row batch? On CPU two-row steps enter multi-threaded GEMMs that one-row steps
        (matrix-vector) avoid; on a busy host each such call waits for its threads, so "auto" keeps CPU sequential."""
        if self.capture_decode != "auto":
            return self.capture_decode == "batch"
        return next(model.parameters()).device.type != "cpu"

    # -- contrast, mask, refine ---------------------------------------------------------------------------
    def contrast(self, question: torch.Tensor, general: torch.Tensor) -> torch.Tensor:
        """Per image cell: sum over paired steps t (weight t) and layers of A_Q / (A_G + lam)."""
        steps = min(question.shape[0], general.shape[0])
        ratio = question[:steps] / (general[:steps] + self.lam)  # (T, L, N)
        weights = torch.arange(1, steps + 1, dtype=ratio.dtype)  # t - t_start + 1
        return (weights[:, None, None] * ratio).sum(dim=(0, 1))

    def score(self, cells: torch.Tensor, tiles: list, size: tuple[int, int]) -> torch.Tensor:
        """(H, W) pixel score map of per-cell scores laid out on the image's tiles."""
        return tile_score_map(cells, tiles, size)

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
            out = steering.model.generate(**to_model(final, steering.model), **options)
        self.last_seconds = {"refine": refined - start, "answer": time.perf_counter() - refined}
        if not torch.is_tensor(out) or "input_ids" not in prompt:
            return out
        new = out[:, final["input_ids"].shape[1] :]
        return torch.cat([prompt["input_ids"].to(new.device), new], dim=1)


def _need_processor(steering):
    if steering.processor is None:
        raise SteeringError("carve builds its own prompts and images: pass steer(model, carve, processor=processor)")
    return steering.processor


def _chat(processor, text: str, n_images: int) -> str:
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _image_key(image: Image.Image) -> str:
    return hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()
