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
    # per text layer, its attention kind as transformers names it ("full_attention", "sliding_attention", ...)
    layer_types: tuple[str, ...] = ()
    # a sliding window that every text layer applies (a config without per-layer types), else None
    sliding_window: int | None = None

    @property
    def full_attention_only(self) -> bool:
        """True when every text layer attends to the whole sequence (no sliding-window or other layer kinds)."""
        return set(self.layer_types) <= {"full_attention"}

    @classmethod
    def from_text_config(cls, architecture: str, cfg) -> ModelInfo:
        num_heads = int(cfg.num_attention_heads)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        layer_types = tuple(getattr(cfg, "layer_types", None) or ())
        window = getattr(cfg, "sliding_window", None)
        uniform_window = not layer_types and getattr(cfg, "use_sliding_window", True) and window
        return cls(
            architecture=architecture,
            num_layers=int(cfg.num_hidden_layers),
            num_heads=num_heads,
            num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or num_heads),
            head_dim=int(head_dim),
            hidden_size=int(cfg.hidden_size),
            intermediate_size=getattr(cfg, "intermediate_size", None),
            layer_types=layer_types or ("full_attention",) * int(cfg.num_hidden_layers),
            sliding_window=int(window) if uniform_window else None,
        )
