"""Shape facts about a model's language model that methods validate against (layers, heads, sizes)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    """What a method may check its parameters against, read once from the text config."""

    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int | None

    @classmethod
    def from_text_config(cls, architecture: str, cfg) -> ModelInfo:
        num_heads = int(cfg.num_attention_heads)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        return cls(
            architecture=architecture,
            num_layers=int(cfg.num_hidden_layers),
            num_heads=num_heads,
            num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or num_heads),
            head_dim=int(head_dim),
            hidden_size=int(cfg.hidden_size),
            intermediate_size=getattr(cfg, "intermediate_size", None),
        )
