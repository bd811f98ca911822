"""Stage 0 of the testbed's training: pretrain the vision tower to recognise the world's objects.

Real LVLMs start from a pretrained vision encoder (CLIP, SigLIP) whose patch features already name what they show;
the language model only has to learn to read them. Trained from scratch through the one-token yes/no loss, our
tower learned little: the model answered from class popularity instead of the image. Here every patch feature
of the layer Llava reads (``vision_feature_layer``) gets a linear score per category, pooled over patches with a
smooth maximum, and trained against the scene's true categories (multi-label). The head is thrown away afterwards,
like CLIP's text tower.
"""

from __future__ import annotations

import random

import torch

from .world import IDS, NAMES, WorldConfig, render, sample_scene

CATEGORY_INDEX = {name: i for i, name in enumerate(NAMES.values())}


def patch_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, patches, D): the vision features Llava hands its projector (CLS dropped), from the same layer."""
    tower = model.model.vision_tower
    out = tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def presence_batch(rng: random.Random, processor, n: int, cfg: WorldConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values, multi-hot presence targets) of ``n`` fresh scenes."""
    scenes = [sample_scene(rng, cfg) for _ in range(n)]
    pixels = processor.image_processor([render(s, cfg) for s in scenes], return_tensors="pt")["pixel_values"]
    targets = torch.zeros(n, len(IDS))
    for row, scene in enumerate(scenes):
        targets[row, [CATEGORY_INDEX[name] for name in scene.objects]] = 1.0
    return pixels, targets


class PresenceHead(torch.nn.Module):
    """Per-patch category scores, pooled by log-sum-exp (a smooth max: one patch showing the object suffices)."""

    def __init__(self, width: int, categories: int) -> None:
        super().__init__()
        self.score = torch.nn.Linear(width, categories)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        scores = self.score(features)  # (B, P, C)
        return torch.logsumexp(scores, dim=1) - torch.log(torch.tensor(float(features.shape[1])))


def pretrain_vision(
    model, processor, steps: int, seed: int = 0, batch: int = 64, lr: float = 3e-3, cfg: WorldConfig | None = None,
    log_every: int = 100, log=print,
) -> float:  # fmt: skip
    """Train the vision tower for ``steps`` steps; return the balanced presence accuracy
    (mean of recall and specificity over scene x category) on 512 fresh scenes."""
    cfg = cfg or WorldConfig()
    tower = model.model.vision_tower
    torch.manual_seed(seed)
    head = PresenceHead(tower.config.hidden_size, len(IDS))
    params = [*tower.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for step in range(steps):
        for group in opt.param_groups:  # linear warmup over the first 10%, then constant
            group["lr"] = lr * min(1.0, (step + 1) / max(1, steps // 10))
        pixels, targets = presence_batch(random.Random(f"testbed-vision-{seed}-{step}"), processor, batch, cfg)
        loss = loss_fn(head(patch_features(model, pixels)), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % log_every == 0:
            log(f"vision step {step + 1}/{steps} loss {loss.item():.4f}")
    with torch.no_grad():
        pixels, targets = presence_batch(random.Random(f"testbed-vision-heldout-{seed}"), processor, 512, cfg)
        said = (head(patch_features(model, pixels)) > 0).float()
    recall = (said * targets).sum() / targets.sum()
    specificity = ((1 - said) * (1 - targets)).sum() / (1 - targets).sum()
    balanced = 0.5 * (recall + specificity).item()
    log(f"vision pretraining on 512 held-out scenes: recall {recall:.3f}, specificity {specificity:.3f}")
    return balanced
