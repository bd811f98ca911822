"""VHR, vision-aware head reinforcement (He et al., Cracking the Code of Hallucination in LVLMs with
Vision-aware Head Divergence, ACL 2025).

At the first generation step, for each target layer in order, head i's output before ``o_proj`` at the last
position is compared with and without the image: ``VHD_i = ||A_i(image) - A_i(no image)||_2``. Heads whose
VHD and whose text-only energy ``TA_i = ||A_i(no image)||^2`` both exceed the layer's mean + std are treated as
outliers (VHD set to 0); the heads with VHD above the layer's median are multiplied by ``alpha`` before
``o_proj``, in both streams, before the next target layer is scored. The chosen heads stay fixed for the rest
of the generation (every position, every step), so the KV cache stays consistent.

The two streams run in lockstep without padding the short text-only prompt to the long image prompt: at each
prefill a text-only forward (a `lvlm_steer.streams` text-only stream: the adapter's `text_only`, one
`stream_forward` with the steering paused) records what the model hands each decoder layer (its input hidden states
at layer 0, the masks and position embeddings at every layer). Then, inside the image forward, each decoder layer
up to the last target layer is also run on the text-only hidden states, at the moment the image rows reach that
layer's ``o_proj``: both last-position head outputs are there, the heads are chosen, both streams are scaled, and
both go on. The model's own layers do all the work, with the arguments the model itself built; the extra cost is
two text-only passes at prefill (a few percent of an image prompt), nothing at decode, and it works inside plain
``model(...)`` and ``model.generate(...)``. The text stream runs with the steering paused: other methods' edits
apply to the image stream only. A chunked prefill (``prefill_chunk_size``) would choose the heads at the end of its
first chunk, so leave it off.
Statistics: ``std`` is the sample standard deviation (torch's default); ``median`` is the lower middle value,
so "above the median" keeps the top half of an even number of heads.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lvlm_steer.errors import MethodConfigError
from lvlm_steer.layer_sets import format_layer_set, parse_layer_set
from lvlm_steer.method import Method
from lvlm_steer.model_info import ModelInfo
from lvlm_steer.registry import register_method
from lvlm_steer.streams import AuxStream, TextOnly, stream_forward

TEXT_STREAM = AuxStream("text", TextOnly())  # the no-image view whose head outputs VHD compares against
LAST_SHARE = 0.44  # paper: layer 1 plus the last 14 of 32 layers; other depths keep the same share


def parse_layers(text: str) -> tuple[int, ...]:
    """``"1,18-31"`` -> ``(1, 18, 19, ..., 31)`` (the one layer-set grammar, `lvlm_steer.layer_sets`)."""
    return parse_layer_set(text)


def format_layers(layers: tuple[int, ...] | None) -> str:
    """Inverse of `parse_layers` (``1,18-31``); None is the paper's default."""
    return "1 and the last 44%" if layers is None else format_layer_set(layers)


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
            "help": "target layers, e.g. 1,18-31 (default: layer 1 plus the last 44% of layers)",
        },
    )

    def __post_init__(self) -> None:
        if not self.alpha > 0 or not torch.isfinite(torch.tensor(float(self.alpha))):
            raise MethodConfigError(f"vhr: alpha must be a finite number > 0 (paper: 2, 1 = off), got {self.alpha}")
        if self.layers is not None:
            if isinstance(self.layers, str):
                try:
                    self.layers = parse_layers(self.layers)
                except ValueError as exc:
                    raise MethodConfigError(f"vhr: {exc}") from exc
            self.layers = tuple(sorted({int(layer) for layer in self.layers}))
            if not self.layers:
                raise MethodConfigError(
                    "vhr: the target-layer set is empty; pass e.g. layers=1,18-31, or leave layers out for the "
                    "paper's default (layer 1 plus the last 44% of layers)"
                )
        self.gains: dict[int, torch.Tensor] = {}  # layer -> (B, H) gains chosen at the last prefill
        self.vhd: dict[int, torch.Tensor] = {}  # layer -> (B, H) VHD after outlier zeroing, for inspection
        self._text: _TextStream | None = None  # the text-only stream while a prefill is choosing heads

    @property
    def neutral(self) -> bool:
        return self.alpha == 1.0

    def target_layers(self, info: ModelInfo) -> tuple[int, ...]:
        return default_layers(info.num_layers) if self.layers is None else self.layers

    def validate(self, info: ModelInfo) -> None:
        layers = self.target_layers(info)
        if not layers:
            raise MethodConfigError("vhr: no target layers; pass e.g. layers=1,18-31, or leave layers out")
        bad = [layer for layer in layers if not 0 <= layer < info.num_layers]
        if bad:
            raise MethodConfigError(
                f"vhr: layers {bad} are out of range; this model's text layers are 0..{info.num_layers - 1} "
                f"(default for it: {format_layers(default_layers(info.num_layers))})"
            )

    def requires_images(self) -> bool:
        return True

    def claims(self, info: ModelInfo) -> set:
        return {("head", layer, h) for layer in self.target_layers(info) for h in range(info.num_heads)}

    def attach(self, steering) -> list:
        if self.neutral:
            return []
        targets = frozenset(self.target_layers(steering.info))
        layers = steering.adapter.layers()[: max(targets) + 1]
        handles = []
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(self._recorder(i), with_kwargs=True))
            handles.append(
                steering.adapter.o_proj(i).register_forward_pre_hook(self._o_proj_hook(steering, i, targets))
            )
        return handles

    def reset(self) -> None:
        self.gains, self.vhd, self._text = {}, {}, None

    def prepare(self, steering, forward_kwargs: dict[str, Any]) -> None:
        """At each prefill: record the text-only stream's layer inputs (one paused text-only forward)."""
        if self.neutral:
            return
        text = TEXT_STREAM.build(steering.adapter, forward_kwargs)
        stream = _TextStream(last_layer=max(self.target_layers(steering.info)))
        self._text = stream
        stream.recording = True
        try:
            stream_forward(steering, text, use_cache=False)
        finally:
            stream.recording = False

    def heads(self) -> list[dict[int, tuple[int, ...]]]:
        """Per batch row, the heads chosen at the last prefill: ``{layer: (heads...)}``."""
        if not self.gains:
            return []
        rows = next(iter(self.gains.values())).shape[0]
        return [
            {layer: tuple((g[b] != 1).nonzero().flatten().tolist()) for layer, g in sorted(self.gains.items())}
            for b in range(rows)
        ]

    # -- hooks --------------------------------------------------------------------------------------------
    def _recorder(self, index: int):
        """Decoder-layer pre-hook: during the text-only forward, keep what the model hands this layer."""

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            stream = self._text
            if stream is not None and stream.recording:
                stream.calls[index] = (args, dict(kwargs))
                if index == 0:
                    stream.hidden = args[0] if args else kwargs["hidden_states"]

        return hook

    def _o_proj_hook(self, steering, index: int, targets: frozenset[int]):
        info = steering.info
        layer_module = steering.adapter.layers()[index]

        def hook(module: torch.nn.Module, args: tuple):
            x = args[0]
            heads = x.reshape(x.shape[0], x.shape[1], info.num_heads, info.head_dim)
            stream = self._text
            if stream is not None and stream.replaying == index:  # the text-only stream's own call
                if index not in targets:
                    return None
                gains, vhd = select_heads(stream.image_heads, heads[:, -1], self.alpha)
                self.gains[index], self.vhd[index] = gains.to(x.dtype), vhd
                return (_scale(heads, self.gains[index]).reshape(x.shape), *args[1:])
            if steering.paused or (stream is not None and stream.recording):
                return None
            if stream is not None and stream.hidden is not None:  # a prefill choosing heads: advance the text stream
                stream.image_heads = heads[:, -1]
                stream.advance(steering, layer_module, index)
                if index >= stream.last_layer:
                    self._text = None
            gains = self.gains.get(index)
            if gains is None:
                if index in targets:
                    raise RuntimeError(f"vhr: no heads chosen for layer {index}; a prefill with the image chooses them")
                return None
            if gains.shape[0] != x.shape[0]:
                raise RuntimeError(
                    f"vhr: heads were chosen for {gains.shape[0]} rows but this forward has {x.shape[0]}; "
                    "start a new prefill for a new batch"
                )
            return (_scale(heads, gains).reshape(x.shape), *args[1:])

        return hook


class _TextStream:
    """The text-only stream of one prefill: its recorded layer inputs and its hidden states so far."""

    def __init__(self, last_layer: int) -> None:
        self.last_layer = last_layer
        self.recording = False
        self.calls: dict[int, tuple[tuple, dict]] = {}
        self.hidden: torch.Tensor | None = None
        self.image_heads: torch.Tensor | None = None
        self.replaying: int | None = None

    def advance(self, steering, layer: torch.nn.Module, index: int) -> None:
        """Run decoder layer ``index`` on the text-only hidden states (steering paused but for VHR's own hook).

        The call runs in an empty `contextvars.Context`, so context-local collectors of the forward in flight
        (transformers' ``output_hidden_states`` / ``output_attentions`` recorders) never see the text stream.
        """
        args, kwargs = self.calls[index]
        if args:
            args = (self.hidden, *args[1:])
        else:
            kwargs = {**kwargs, "hidden_states": self.hidden}

        def run() -> Any:
            with steering.pause():
                return layer(*args, **kwargs)

        self.replaying = index
        try:
            out = contextvars.Context().run(run)
        finally:
            self.replaying = None
        self.hidden = out[0] if isinstance(out, tuple) else out


def _scale(heads: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    return heads * gains.to(heads.device, heads.dtype)[:, None, :, None]
