"""VHR, vision-aware head reinforcement (He et al., Cracking the Code of Hallucination in LVLMs with
Vision-aware Head Divergence, ACL 2025).

At the first generation step, for each target layer in order, head i's output before ``o_proj`` at the last
position is compared with and without the image: ``VHD_i = ||A_i(image) - A_i(no image)||_2``. Heads whose
VHD and whose text-only energy ``TA_i = ||A_i(no image)||^2`` both exceed the layer's mean + std are treated as
outliers (VHD set to 0); the heads with VHD above the layer's median are multiplied by ``alpha`` before
``o_proj``, in both streams, before the next target layer is scored. The chosen heads stay fixed for the rest
of the generation (every position, every step), so the KV cache stays consistent.

Both streams run as one batch (`lvlm_steer.paired_batch`): the with-image rows, then their text-only
variants. The text-only rows cost extra only at prefill: afterwards their cache rows are dropped and
decoding continues with the with-image rows alone (one extra `generate` call that resumes from the cache).
Statistics: ``std`` is the sample standard deviation (torch's default); ``median`` is the lower middle value,
so "above the median" keeps the top half of an even number of heads.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lvlm_steer.errors import MethodConfigError, MissingImagesError, SteeringError
from lvlm_steer.heads import add_head_output_hook
from lvlm_steer.method import Method
from lvlm_steer.model_info import ModelInfo
from lvlm_steer.paired_batch import keep_rows, paired_batch
from lvlm_steer.registry import register_method

LAST_SHARE = 0.44  # paper: layer 1 plus the last 14 of 32 layers; other depths keep the same share
STEP_FIELDS = ("scores", "logits", "attentions", "hidden_states")  # per-step tuples in generate's output


def parse_layers(text: str) -> tuple[int, ...]:
    """``"1+18-31"`` or ``"1,18-31"`` -> ``(1, 18, 19, ..., 31)``; ranges are inclusive."""
    layers: set[int] = set()
    for piece in text.replace("+", ",").replace(" ", "").split(","):
        if not piece:
            continue
        first, dash, last = piece.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"expected a layer or an inclusive range such as 1+18-31, got {piece!r}")
        stop = int(last) if dash else int(first)
        if stop < int(first):
            raise ValueError(f"range {piece!r} runs backwards; write low-high")
        layers.update(range(int(first), stop + 1))
    return tuple(sorted(layers))


def format_layers(layers: tuple[int, ...] | None) -> str:
    """Inverse of `parse_layers`: consecutive layers become ranges (``1+18-31``); None is the paper's default."""
    if layers is None:
        return "1+last 44%"
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return "+".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def default_layers(num_layers: int) -> tuple[int, ...]:
    """Layer 1 plus the last 44% of the layers (18-31 of 32), as in the paper."""
    last = max(1, round(LAST_SHARE * num_layers))
    first = {1} if num_layers > 1 else set()
    return tuple(sorted(first | set(range(num_layers - last, num_layers))))


def select_heads(with_image: torch.Tensor, text_only: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row head gains (alpha for chosen heads, else 1) and the VHD after outlier zeroing.

    ``with_image`` and ``text_only`` are one layer's last-position head outputs, (B, H, D).
    """
    a, t = with_image.float(), text_only.float()
    vhd = (a - t).norm(dim=-1)  # (B, H)
    ta = t.pow(2).sum(dim=-1)
    outlier = (vhd > vhd.mean(-1, keepdim=True) + vhd.std(-1, keepdim=True)) & (
        ta > ta.mean(-1, keepdim=True) + ta.std(-1, keepdim=True)
    )
    vhd = vhd.masked_fill(outlier, 0.0)
    chosen = vhd > vhd.median(dim=-1, keepdim=True).values
    return torch.where(chosen, alpha, 1.0), vhd


@register_method
@dataclass
class VHR(Method):
    """Reinforce (x alpha before o_proj) the heads whose output changes most when the image is removed."""

    name: ClassVar[str] = "vhr"
    summary: ClassVar[str] = "per sample, heads with VHD above the layer median x alpha before o_proj (layer by layer)"
    paper: ClassVar[str] = (
        "He et al., Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence, ACL 2025"
    )

    alpha: float = field(default=2.0, metadata={"help": "gain of the chosen heads, > 0 (1 = off)"})
    layers: tuple[int, ...] | None = field(
        default=None,
        metadata={
            "parse": parse_layers,
            "format": format_layers,
            "help": "target layers, e.g. 1+18-31 (default: layer 1 plus the last 44% of layers)",
        },
    )

    def __post_init__(self) -> None:
        if not self.alpha > 0 or not torch.isfinite(torch.tensor(float(self.alpha))):
            raise MethodConfigError(f"vhr: alpha must be a finite number > 0 (paper: 2, 1 = off), got {self.alpha}")
        if self.layers is not None:
            if isinstance(self.layers, str):
                self.layers = parse_layers(self.layers)
            self.layers = tuple(sorted({int(layer) for layer in self.layers}))
            if not self.layers:
                raise MethodConfigError(
                    "vhr: the target-layer set is empty; pass e.g. layers=1+18-31, or leave layers out for the "
                    "paper's default (layer 1 plus the last 44% of layers)"
                )
        self.gains: dict[int, torch.Tensor] = {}  # layer -> (B, H) gains of the current generation
        self.vhd: dict[int, torch.Tensor] = {}  # layer -> (B, H) VHD after outlier zeroing, for inspection
        self._pair_rows: int | None = None  # B while a paired (with-image + text-only) prefill runs

    @property
    def neutral(self) -> bool:
        return self.alpha == 1.0

    def target_layers(self, info: ModelInfo) -> tuple[int, ...]:
        return default_layers(info.num_layers) if self.layers is None else self.layers

    def validate(self, info: ModelInfo) -> None:
        layers = self.target_layers(info)
        if not layers:
            raise MethodConfigError("vhr: no target layers; pass e.g. layers=1+18-31, or leave layers empty")
        bad = [layer for layer in layers if not 0 <= layer < info.num_layers]
        if bad:
            raise MethodConfigError(
                f"vhr: layers {bad} are out of range; this model's text layers are 0..{info.num_layers - 1} "
                f"(default for it: {format_layers(default_layers(info.num_layers))})"
            )

    def claims(self, info: ModelInfo) -> set:
        return {("head", layer, h) for layer in self.target_layers(info) for h in range(info.num_heads)}

    def attach(self, steering) -> list:
        if self.neutral:
            return []
        return [
            add_head_output_hook(steering, layer, self._editor(layer)) for layer in self.target_layers(steering.info)
        ]

    def reset(self) -> None:
        self.gains, self.vhd = {}, {}

    def prepare(self, steering, forward_kwargs: dict[str, Any]) -> None:
        if self._pair_rows is None and not self.neutral:
            raise SteeringError(
                "vhr chooses its heads in a prefill that pairs each row with its text-only variant; call "
                "steered.generate(**inputs) (or VHR.prefill_logits(steered, **inputs)) instead of the model directly"
            )

    def heads(self) -> list[dict[int, tuple[int, ...]]]:
        """Per batch row, the heads chosen at the last prefill: ``{layer: (heads...)}``."""
        if not self.gains:
            return []
        rows = next(iter(self.gains.values())).shape[0]
        return [
            {layer: tuple((g[b] != 1).nonzero().flatten().tolist()) for layer, g in sorted(self.gains.items())}
            for b in range(rows)
        ]

    # -- the hook -----------------------------------------------------------------------------------------
    def _editor(self, layer: int):
        def edit(x: torch.Tensor) -> torch.Tensor:  # (B', q, H, D)
            n = self._pair_rows
            if n is not None and layer not in self.gains:  # paired prefill: score, choose, then scale both streams
                if x.shape[0] != 2 * n:
                    raise RuntimeError(f"vhr: expected {2 * n} paired rows at layer {layer}, got {x.shape[0]}")
                gains, vhd = select_heads(x[:n, -1], x[n:, -1], self.alpha)
                self.gains[layer], self.vhd[layer] = gains.to(x.dtype), vhd
            gains = self.gains.get(layer)
            if gains is None:
                raise RuntimeError(f"vhr: no heads were chosen for layer {layer}; run steered.generate(**inputs)")
            if x.shape[0] != gains.shape[0]:
                if x.shape[0] % gains.shape[0]:
                    raise RuntimeError(f"vhr: heads were chosen for {gains.shape[0]} rows, got {x.shape[0]}")
                gains = gains.repeat(x.shape[0] // gains.shape[0], 1)  # the paired prefill: both streams
            return x * gains.to(x.device, x.dtype)[:, None, :, None]

        return edit

    # -- running ------------------------------------------------------------------------------------------
    def prefill_logits(self, steering, **inputs: Any) -> torch.Tensor:
        """Logits (B, L, V) of one forward over the prompt with the heads chosen in it (the first step's logits)."""
        model = steering.model
        if self.neutral:
            return model(**inputs).logits
        rows = self._check_batch(steering, inputs)
        paired = paired_batch(steering.adapter, inputs)
        self._pair_rows = rows
        try:
            out = model(**paired, use_cache=False)
        finally:
            self._pair_rows = None
        keep_rows(steering, rows)
        return out.logits[:rows]

    def generate(self, steering, **kwargs: Any) -> Any:
        """Greedy or sampled generation: a paired prefill (heads chosen, first token), then the image rows alone."""
        model = steering.model
        if self.neutral:
            return model.generate(**kwargs)
        rows = self._check_batch(steering, kwargs)
        for key in ("num_beams", "num_return_sequences"):
            if int(kwargs.get(key) or 1) != 1:
                raise MethodConfigError(f"vhr: {key}={kwargs[key]} is not supported; generate one sequence per row")
        if kwargs.get("streamer") is not None or kwargs.get("past_key_values") is not None:
            raise MethodConfigError("vhr: streamer and past_key_values are not supported; it runs its own prefill")
        config = kwargs.get("generation_config") or model.generation_config
        prompt_len = kwargs["input_ids"].shape[1]
        max_length = kwargs.pop("max_length", None)
        max_new = kwargs.pop("max_new_tokens", None) or (
            max_length - prompt_len if max_length else config.max_new_tokens or config.max_length - prompt_len
        )
        min_new = kwargs.pop("min_new_tokens", None) or config.min_new_tokens or 0
        want_dict = kwargs.pop("return_dict_in_generate", None) or config.return_dict_in_generate

        self._pair_rows = rows
        try:
            first = model.generate(
                **paired_batch(steering.adapter, kwargs),
                max_new_tokens=1,
                min_new_tokens=min(1, min_new),
                return_dict_in_generate=True,
            )
        finally:
            self._pair_rows = None
        cache = first.past_key_values
        keep_rows(steering, rows, cache)
        sequences = first.sequences[:rows]
        eos = kwargs.get("eos_token_id", config.eos_token_id)
        eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos))
        done = torch.isin(sequences[:, -1].cpu(), eos)
        if max_new <= 1 or bool(done.all()):
            return _assemble(first, None, sequences, rows) if want_dict else sequences

        forward_params = inspect.signature(model.forward).parameters
        carried = {k: v for k, v in kwargs.items() if k not in forward_params or not _is_tensor_input(v)}
        carried.pop("mm_encoder_outputs", None)
        second = model.generate(
            **carried,
            **self._continuation(steering, kwargs, sequences),
            past_key_values=cache,
            max_new_tokens=max_new - 1,
            min_new_tokens=max(0, min_new - 1),
            return_dict_in_generate=True,
        )
        sequences = second.sequences
        if bool(done.any()):  # rows that ended at the first step: padded like generate pads finished rows
            pad = kwargs.get("pad_token_id", config.pad_token_id)
            pad = int(eos[0]) if pad is None else int(pad)
            sequences[done.to(sequences.device), prompt_len + 1 :] = pad
        return _assemble(first, second, sequences, rows) if want_dict else sequences

    # -- helpers ------------------------------------------------------------------------------------------
    def _check_batch(self, steering, inputs: dict[str, Any]) -> int:
        ids = inputs.get("input_ids")
        problem = None
        if ids is None:
            problem = "the batch has no input_ids (inputs_embeds alone hide where the image tokens are); pass input_ids"
        else:
            mask = inputs.get("attention_mask")
            has = steering.adapter.image_mask(ids) & (
                torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
            )
            missing = [b for b, ok in enumerate(has.any(dim=1).tolist()) if not ok]
            if missing:
                problem = f"batch rows {missing} contain no image tokens; give every row an image"
        if problem is None:
            return int(ids.shape[0])
        steering.remove()
        raise MissingImagesError(
            f"vhr compares each row with and without its image: {problem}. "
            "The steering was removed; call steer() again with a valid batch."
        )

    @staticmethod
    def _continuation(steering, inputs: dict[str, Any], sequences: torch.Tensor) -> dict[str, Any]:
        """Text inputs for resuming from the cache: the prompt plus the first token, no vision inputs."""
        extended = steering.adapter.extend_inputs(inputs, sequences)
        keys = ("input_ids", "attention_mask", *steering.adapter.token_inputs)
        return {k: extended[k] for k in keys if isinstance(extended.get(k), torch.Tensor)}


def _is_tensor_input(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, list, tuple, dict)) or hasattr(value, "keys")


def _assemble(first: Any, second: Any, sequences: torch.Tensor, rows: int) -> Any:
    """One generate output from the paired first step (its first ``rows`` rows) and the continuation."""
    out = second if second is not None else first
    for name in STEP_FIELDS:
        head = getattr(first, name, None)
        if head is None:
            continue
        tail = tuple(getattr(second, name, None) or ()) if second is not None else ()
        setattr(out, name, (_rows(head[0], rows), *tail))
    out.sequences = sequences
    return out


def _rows(value: Any, rows: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[:rows]
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, rows) for v in value)
    return value
