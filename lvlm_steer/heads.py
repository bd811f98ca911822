"""Shared plumbing for methods that edit per-head attention outputs before ``o_proj``.

The input of ``o_proj`` is (B, q, H * D): head h owns columns ``h*D:(h+1)*D``. Editing there works with
every attention backend (sdpa, eager, flash), because it happens after the attention kernel. Head sets are
written ``layer.head`` on the CLI (``14.3,14.5``) and as ``{layer: [heads]}`` in Python.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from lvlm_steer.errors import MethodConfigError
from lvlm_steer.model_info import ModelInfo

if TYPE_CHECKING:
    from lvlm_steer.method import Host

HeadMap = dict[int, tuple[int, ...]]

# where a head edit applies, by the query token's kind
WHERE_CHOICES = ("all", "image", "text")


def normalize_heads(value: Any) -> HeadMap:
    """Accept ``{14: [3, 5]}``, ``{14: 3}``, ``[(14, 3)]``, ``["14.3"]`` or ``"14.3,14.5"``; return a sorted map."""
    if isinstance(value, str):
        return parse_heads(value)
    pairs: list[tuple[int, int]] = []
    if isinstance(value, Mapping):
        for layer, heads in value.items():
            heads = [heads] if isinstance(heads, (int, str)) else list(heads)
            pairs += [(int(layer), int(h)) for h in heads]
    elif isinstance(value, Iterable):
        for item in value:
            if isinstance(item, str):
                pairs += [(layer, h) for layer, hs in parse_heads(item).items() for h in hs]
            else:
                layer, head = item
                pairs.append((int(layer), int(head)))
    else:
        raise MethodConfigError(f"heads must be a dict {{layer: [heads]}} or 'layer.head,...', got {value!r}")
    out: dict[int, set[int]] = {}
    for layer, head in pairs:
        out.setdefault(layer, set()).add(head)
    return {layer: tuple(sorted(hs)) for layer, hs in sorted(out.items())}


def parse_heads(text: str) -> HeadMap:
    """``"14.3,14.5,20.1"`` -> ``{14: (3, 5), 20: (1,)}``; ``"@heads.json"`` reads ``{"heads": {layer: [heads]}}``."""
    if text.startswith("@"):
        import json
        from pathlib import Path

        data = json.loads(Path(text[1:]).read_text())
        heads = data.get("heads", data) if isinstance(data, dict) else data
        if not heads:
            raise ValueError(f"{text[1:]} lists no heads")
        return normalize_heads(heads)
    pairs = []
    for piece in text.replace(" ", "").split(","):
        if not piece:
            continue
        layer, dot, head = piece.partition(".")
        if not dot or not layer.lstrip("-").isdigit() or not head.lstrip("-").isdigit():
            raise ValueError(f"expected layer.head such as 14.3, got {piece!r}")
        pairs.append((int(layer), int(head)))
    if not pairs:
        raise ValueError("empty head list; write layer.head pairs such as 14.3,14.5")
    return normalize_heads(pairs)


def format_heads(heads: Mapping[int, Iterable[int]]) -> str:
    return ",".join(f"{layer}.{h}" for layer, hs in sorted(heads.items()) for h in hs)


def validate_heads(heads: HeadMap, info: ModelInfo, method: str) -> None:
    """Raise naming the valid range if a layer or head index does not exist in this model."""
    if not heads:
        raise MethodConfigError(f"{method}: no heads given; pass e.g. {{14: [3, 5]}} or heads=14.3,14.5")
    for layer, hs in heads.items():
        if not 0 <= layer < info.num_layers:
            raise MethodConfigError(
                f"{method}: layer {layer} is out of range; this model's text layers are 0..{info.num_layers - 1}"
            )
        for h in hs:
            if not 0 <= h < info.num_heads:
                raise MethodConfigError(
                    f"{method}: head {h} in layer {layer} is out of range; "
                    f"this model has heads 0..{info.num_heads - 1} per layer"
                )


def validate_where(where: str, method: str) -> None:
    if where not in WHERE_CHOICES:
        raise MethodConfigError(f"{method}: where={where!r} is not one of {', '.join(WHERE_CHOICES)}")


def query_rows(host: Host, where: str, device: torch.device) -> torch.Tensor | None:
    """(B, q, 1, 1) bool mask of the query tokens an edit applies to, or None for all of them."""
    if where == "all":
        return None
    image = host.context.query_image_mask().to(device)
    rows = image if where == "image" else ~image
    return rows[:, :, None, None]


HeadEdit = Callable[[torch.Tensor], torch.Tensor]


def add_head_output_hook(host: Host, layer: int, edit: HeadEdit) -> None:
    """Run ``edit`` on layer ``layer``'s (B, q, H, D) head outputs before its ``o_proj`` (not while paused)."""
    info = host.info

    def pre_hook(module: torch.nn.Module, args: tuple[Any, ...]):
        x = args[0]
        b, q, _ = x.shape
        y = edit(x.reshape(b, q, info.num_heads, info.head_dim))
        return (y.reshape(b, q, -1), *args[1:])

    host.add_forward_pre_hook(host.adapter.o_proj(layer), pre_hook)
