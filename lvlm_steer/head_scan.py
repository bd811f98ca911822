"""Head scans: which attention heads look at the image, and which change when the image is removed.

For each text layer x head, averaged over the images given:
- VHD (vision-aware head divergence, He et al., ACL 2025): ``|| A(with image) - A(without image) ||_2`` where A is
  the head's output before ``o_proj`` at the last position, and "without image" is the same prompt with the image
  removed (the adapter's text-only variant);
- image-attention share: the attention mass the last query row puts on image tokens.
Both come from one forward of the image batch and one of its text-only variant; the share uses a probe of the last
row only (O(keys) per head), and the forwards' outputs are untouched.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from lvlm_steer.attention import AttentionCall
from lvlm_steer.attention_rows import masked_softmax, row_logits, rows_mask
from lvlm_steer.method import Method
from lvlm_steer.model_info import ModelInfo


@dataclass
class HeadProbe(Method):
    """Records, without changing anything, each layer's last-row image share and last-position head outputs."""

    name: ClassVar[str] = "head-probe"

    def __post_init__(self) -> None:
        self.recording = "image"
        self.share: dict[int, torch.Tensor] = {}
        self.outputs: dict[str, dict[int, torch.Tensor]] = {"image": {}, "text": {}}

    def attention_layers(self, info: ModelInfo) -> frozenset[int]:
        return frozenset(range(info.num_layers))

    def edit_attention(self, call: AttentionCall) -> torch.Tensor:
        out = call.base()
        if self.recording == "image":
            last = call.query.shape[2] - 1
            probs = masked_softmax(row_logits(call, last), rows_mask(call, last))[:, :, 0]  # (B, H, K)
            image = call.context.keys_image_mask(call.key.shape[2]).to(probs.device)
            self.share[call.layer_idx] = (probs * image[:, None, :]).sum(-1).cpu()
        return out

    def attach(self, steering) -> list:
        info = steering.info

        def recorder(layer: int):
            def hook(module, args):
                x = args[0][:, -1].reshape(args[0].shape[0], info.num_heads, info.head_dim)
                self.outputs[self.recording][layer] = x.detach().float().cpu()

            return hook

        return [steering.adapter.o_proj(i).register_forward_pre_hook(recorder(i)) for i in range(info.num_layers)]


@dataclass
class HeadScores:
    """Per layer x head scores from `scan_heads`; rows are layers, columns heads."""

    model: str
    prompt: str
    n_images: int
    vhd: list[list[float]]
    image_share: list[list[float]]

    METRICS: ClassVar[tuple[str, ...]] = ("vhd", "image_share")

    def top(self, k: int = 10, by: str = "vhd") -> list[tuple[int, int, float]]:
        """The ``k`` highest-scoring heads as (layer, head, score)."""
        if by not in self.METRICS:
            raise ValueError(f"by must be one of {', '.join(self.METRICS)}, got {by!r}")
        values = getattr(self, by)
        ranked = sorted(((v, layer, h) for layer, row in enumerate(values) for h, v in enumerate(row)), reverse=True)
        return [(layer, h, v) for v, layer, h in ranked[:k]]

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2)

    @classmethod
    def from_json(cls, text: str) -> HeadScores:
        return cls(**json.loads(text))

    def to_csv(self, path: str | Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["layer", "head", "vhd", "image_share"])
            for layer, (vhd_row, share_row) in enumerate(zip(self.vhd, self.image_share, strict=True)):
                for head, (v, s) in enumerate(zip(vhd_row, share_row, strict=True)):
                    writer.writerow([layer, head, f"{v:.6g}", f"{s:.6g}"])

    def plot(self, path: str | Path) -> Path:
        """Two heatmaps (VHD, image share): layers on the y axis, heads on the x axis, each with a colour bar."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n_layers, n_heads = len(self.vhd), len(self.vhd[0])
        fig, axes = plt.subplots(1, 2, figsize=(4 + 0.35 * n_heads * 2, 2 + 0.22 * n_layers), squeeze=False)
        for ax, (title, values, cmap) in zip(
            axes[0],
            (("VHD (last position)", self.vhd, "viridis"), ("image-attention share", self.image_share, "magma")),
            strict=True,
        ):
            image = ax.imshow(values, aspect="auto", origin="lower", cmap=cmap, interpolation="nearest")
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_title(title, fontsize=10)
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        prompt = self.prompt if len(self.prompt) <= 60 else self.prompt[:57] + "..."
        plural = "s" if self.n_images != 1 else ""
        fig.suptitle(f"{self.model}: '{prompt}' ({self.n_images} image{plural})", fontsize=10)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def scan_heads(
    model: Any, processor: Any, images: Sequence[Any], prompt: str, batch_size: int = 4, model_name: str = ""
) -> HeadScores:
    """VHD and last-row image-attention share of every text head, averaged over ``images`` (PIL images)."""
    import lvlm_steer as ls
    from lvlm_steer.evals.runner import chat_text

    if not images:
        raise ValueError("scan_heads needs at least one image")
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    text = chat_text(processor, prompt)
    vhd_sum, share_sum = None, None
    for k in range(0, len(images), batch_size):
        chunk = images[k : k + batch_size]
        inputs = dict(
            processor(images=[[img] for img in chunk], text=[text] * len(chunk), padding=True, return_tensors="pt")
        )
        probe = HeadProbe()
        with torch.no_grad(), ls.steer(model, probe, processor=processor) as steering:
            model(**inputs)
            probe.recording = "text"
            model(**steering.adapter.text_only(inputs))
        layers = range(steering.info.num_layers)
        vhd = torch.stack([(probe.outputs["image"][i] - probe.outputs["text"][i]).norm(dim=-1) for i in layers], 1)
        share = torch.stack([probe.share[i] for i in layers], 1)  # (B, L, H)
        vhd_sum = vhd.sum(0) if vhd_sum is None else vhd_sum + vhd.sum(0)
        share_sum = share.sum(0) if share_sum is None else share_sum + share.sum(0)
    n = len(images)
    name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    return HeadScores(name, prompt, n, (vhd_sum / n).tolist(), (share_sum / n).tolist())
