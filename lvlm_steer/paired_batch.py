"""A batch and its text-only variant in one left-padded batch, and keeping only the first rows afterwards.

Contrast methods that compare each row with the same prompt minus its image, layer by layer inside one
forward (VHR), need both in lockstep: the with-image rows come first, the text-only rows (the adapter's
`text_only`) after them, all left-padded to one width. The with-image rows keep their exact layout (the
text-only rows are never longer), so their positions, cache slots and recorded image keys are those of
the batch alone. After that shared prefill only the with-image rows go on: `keep_rows` selects their
cache rows, the model-level state a forward cached (Qwen2-VL's ``rope_deltas``) and the per-forward
context, so cached decoding continues exactly as if the text-only rows had never been there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lvlm_steer.adapters import Adapter
    from lvlm_steer.steering import Steering


def paired_batch(adapter: Adapter, inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` with the text-only variant of each row appended as rows B..2B-1 (left-padded to one width).

    Vision inputs (pixel values, grids, sizes) stay as they are: they belong to the image tokens of the
    first B rows, and the text-only rows have none.
    """
    ids = inputs["input_ids"]
    text = adapter.text_only(inputs)
    width = max(ids.shape[1], text["input_ids"].shape[1])
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    out = dict(inputs)
    out["input_ids"] = torch.cat(
        [_pad_left(ids, width, adapter.pad_token_id), _pad_left(text["input_ids"], width, adapter.pad_token_id)]
    )
    out["attention_mask"] = torch.cat(
        [_pad_left(mask, width, 0), _pad_left(text["attention_mask"].to(mask.dtype), width, 0)]
    )
    for key in adapter.token_inputs:
        if key in text:
            value = inputs[key]
            out[key] = torch.cat([_pad_left(value, width, 0), _pad_left(text[key].to(value.dtype), width, 0)])
    return out


def keep_rows(steering: Steering, n: int, cache: Any = None) -> None:
    """After a paired prefill of 2n rows: keep rows 0..n-1 of ``cache``, of model-level state and of the context."""
    rows = torch.arange(n)
    if cache is not None:
        cache.batch_select_indices(rows)
    steering.adapter.select_state_rows(rows)
    context = steering.context
    for name in ("key_image_mask", "key_valid_mask"):
        value = getattr(context, name)
        if value is not None and value.shape[0] > n:
            setattr(context, name, value[:n])


def _pad_left(values: torch.Tensor, width: int, pad: int) -> torch.Tensor:
    missing = width - values.shape[1]
    if missing == 0:
        return values
    filler = torch.full((values.shape[0], missing), pad, dtype=values.dtype, device=values.device)
    return torch.cat([filler, values], dim=1)
