"""The per-forward context: what methods may read about the forward in flight.

A top-level forward pre-hook calls `ForwardContext.begin` before every forward of the wrapped model. At
prefill (an empty cache) it records, per batch row, which key slots hold image tokens and which are
padding; at each later step it appends the new tokens. Key slots never move after prefill (new tokens are
appended), so the positions recorded at prefill stay valid during cached decoding, left padding included.
"""

from __future__ import annotations

from typing import Literal

import torch

from lvlm_steer.model_info import ModelInfo

Phase = Literal["prefill", "decode"]


class ForwardContext:
    """Layout of the current batch plus the phase (prefill or decode) of the forward in flight."""

    def __init__(self, info: ModelInfo) -> None:
        self.info = info
        self.phase: Phase = "prefill"
        self.query_len = 0
        self.key_image_mask: torch.Tensor | None = None  # (B, K) bool, True at image tokens
        self.key_valid_mask: torch.Tensor | None = None  # (B, K) bool, False at padding
        self.forwards = 0  # forwards seen since the last prefill (0 during prefill)
        self.image_positions_known = False
        self.layer_idx: int | None = None  # the text layer whose attention ran last (set by the dispatcher)

    # -- recording ---------------------------------------------------------------------------------------
    def begin(
        self,
        image_mask: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        past_len: int,
        query_len: int,
        batch_size: int,
        device: torch.device,
    ) -> None:
        """Record the layout for a forward of ``query_len`` new tokens after ``past_len`` cached ones.

        ``image_mask`` is (B, q) over the new tokens, or None when only embeddings were given (then image
        positions are unknown and methods that need them refuse to run).
        """
        # a new sequence: an empty cache, a cache we did not follow, or another batch size (another generate call)
        prefill = (
            past_len == 0
            or self.key_image_mask is None
            or self.key_image_mask.shape[1] != past_len
            or self.key_image_mask.shape[0] != batch_size
        )
        self.phase = "prefill" if past_len == 0 else "decode"
        self.query_len = query_len
        new_image = (
            image_mask.bool()
            if image_mask is not None
            else torch.zeros(batch_size, query_len, dtype=torch.bool, device=device)
        )
        if prefill:
            self.forwards = 0
            # a cache we never saw the start of: its slots are unknown, so mark them as text
            past = torch.zeros(batch_size, past_len, dtype=torch.bool, device=device)
            self.key_image_mask = torch.cat([past, new_image], dim=1)
            self.image_positions_known = image_mask is not None and past_len == 0
        else:
            self.forwards += 1
            self.key_image_mask = torch.cat([self.key_image_mask, new_image.to(self.key_image_mask.device)], 1)
            self.image_positions_known = self.image_positions_known and image_mask is not None
        total = self.key_image_mask.shape[1]
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] == total:
            self.key_valid_mask = attention_mask.bool()
        elif prefill or self.key_valid_mask is None:
            self.key_valid_mask = torch.ones(batch_size, total, dtype=torch.bool, device=device)
        else:
            ones = torch.ones(batch_size, query_len, dtype=torch.bool, device=self.key_valid_mask.device)
            self.key_valid_mask = torch.cat([self.key_valid_mask, ones], dim=1)

    # -- reading ---------------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return 0 if self.key_image_mask is None else self.key_image_mask.shape[0]

    @property
    def key_len(self) -> int:
        return 0 if self.key_image_mask is None else self.key_image_mask.shape[1]

    def keys_image_mask(self, key_len: int | None = None) -> torch.Tensor:
        """(B, key_len) image-token mask over the keys an attention call sees.

        Keys are right-aligned with the full sequence: a sliding-window layer that holds only the last
        ``key_len`` keys gets the last ``key_len`` columns.
        """
        return _last_columns(self._need(self.key_image_mask), key_len)

    def keys_valid_mask(self, key_len: int | None = None) -> torch.Tensor:
        """(B, key_len) False at padding keys, right-aligned like `keys_image_mask`."""
        return _last_columns(self._need(self.key_valid_mask), key_len)

    def query_image_mask(self) -> torch.Tensor:
        """(B, q) True where the current forward's tokens are image tokens."""
        return self.keys_image_mask(self.query_len)

    def query_valid_mask(self) -> torch.Tensor:
        """(B, q) False where the current forward's tokens are padding."""
        return self.keys_valid_mask(self.query_len)

    def image_positions(self) -> list[torch.Tensor]:
        """Per row, the key slots of image tokens (absolute indices in the padded sequence)."""
        mask = self._need(self.key_image_mask)
        return [row.nonzero().flatten() for row in mask]

    def rows_without_images(self) -> list[int]:
        mask = self._need(self.key_image_mask)
        return [i for i, has in enumerate(mask.any(dim=1).tolist()) if not has]

    def _need(self, tensor: torch.Tensor | None) -> torch.Tensor:
        if tensor is None:
            raise RuntimeError("no forward has started yet; the context is filled by the model's forward")
        return tensor


def _last_columns(mask: torch.Tensor, key_len: int | None) -> torch.Tensor:
    if key_len is None or key_len == mask.shape[1]:
        return mask
    if key_len > mask.shape[1]:
        raise RuntimeError(f"attention sees {key_len} keys but the context recorded {mask.shape[1]}")
    return mask[:, mask.shape[1] - key_len :]
