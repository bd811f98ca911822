"""Train the testbed model: ``python -m lvlm_steer.testbed.train --out DIR``.

Stage 0 (vision, ``--vision-steps``): the vision tower learns to recognise the world's objects (`vision_pretrain`),
as a pretrained CLIP would have; ``--freeze-vision`` then keeps it fixed, as LLaVA does. Stage 1 (text only): the
language model learns the captions' language and their co-occurrence prior, as a pretrained LLM would. Stage 2
(multimodal): captions plus multi-turn yes/no conversations (`data.make_samples`), the question wording moving from
the class word last to the exact POPE prompt (the exact wording alone sits on an always-"yes" plateau for thousands
of steps). Deterministic given the seed and thread count; checkpoints every ``--ckpt-every`` steps and resumes.
"""

from __future__ import annotations

import argparse
import inspect
import math
import random
import time
from pathlib import Path

import torch

from lvlm_steer.prompts import chat_prompt

from .build import PATCH, TEXT_LAYERS, build_model, build_processor, question_formats
from .data import collate, make_samples
from .vision_pretrain import pretrain_vision
from .world import DEFAULT_WORLD, IMAGE_SIZE, NAMES, WorldConfig, render, sample_scene


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def sample_mean_loss(model, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy averaged per sample, then over samples: a one-token yes/no answer weighs as much as a caption
    (a token average would give the yes/no decision a few percent of the gradient, which prolongs the plateau)."""
    labels = data["labels"][:, 1:]
    logits = model(**{k: v for k, v in data.items() if k != "labels"}).logits[:, :-1]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    mask = labels != -100
    return ((losses * mask).sum(1) / mask.sum(1).clamp_min(1)).mean()


def probe_set(processor, cfg: WorldConfig, n: int = 128, seed: int = 99) -> tuple[dict, torch.Tensor]:
    """Held-out exact-POPE-wording questions (half yes) about scenes of the trained world, for progress logs:
    (inputs, labels 1=yes)."""
    rng = random.Random(f"testbed-probe-{seed}")
    names = list(NAMES.values())
    images, texts, labels = [], [], []
    for i in range(n):
        scene = sample_scene(rng, cfg)
        yes = i % 2 == 0
        name = rng.choice(scene.objects if yes else [x for x in names if x not in scene.objects])
        pope_wording = question_formats(name)[-1]
        texts.append(chat_prompt(processor, pope_wording))
        images.append([render(scene, cfg)])
        labels.append(int(yes))
    return dict(processor(images=images, text=texts, padding=True, return_tensors="pt")), torch.tensor(labels)


@torch.no_grad()
def probe_accuracy(model, processor, probe) -> tuple[float, float]:
    """(accuracy, share answered yes) of the first generated token on the probe set."""
    inputs, labels = probe
    model.eval()
    logits = model(**inputs).logits[:, -1]
    model.train()
    tok = processor.tokenizer
    yes_id, no_id = tok.convert_tokens_to_ids("ĠYes"), tok.convert_tokens_to_ids("ĠNo")
    top = logits.argmax(-1)
    said_yes = top == yes_id
    said = torch.where(said_yes, 1, torch.where(top == no_id, 0, -1))
    return (said == labels).float().mean().item(), said_yes.float().mean().item()


def train(
    out: Path, steps: int = 2000, text_steps: int = 300, batch: int = 32, lr: float = 1.5e-3, warmup: int = 300,
    weight_decay: float = 0.01, seed: int = 2, ckpt_every: int = 500, log_every: int = 100,
    max_minutes: float | None = None, resume: bool = True, threads: int = 2, image_size: int = IMAGE_SIZE,
    patch: int = PATCH, text_layers: int = TEXT_LAYERS, vision_steps: int = 300, freeze_vision: bool = True,
    class_balanced: bool = False, noisy_answers: bool = True,
    pair_probability: float = DEFAULT_WORLD.pair_probability, caption_noise: float = DEFAULT_WORLD.caption_noise,
) -> Path:  # fmt: skip
    """Train (or resume) into ``out``; save the final model + processor to ``out/final``; return that path.

    The defaults are the shipped weights' recipe (MODEL_CARD.md); the CLI takes its defaults from here."""
    torch.set_num_threads(threads)
    started = time.time()  # the wall-clock cap and the final report count every stage
    out.mkdir(parents=True, exist_ok=True)
    cfg = WorldConfig(pair_probability=pair_probability, caption_noise=caption_noise)
    processor = build_processor(image_size, patch)
    model = build_model(processor.tokenizer, seed, image_size, patch, text_layers)
    model.train()
    ckpt, start, state = out / "ckpt.pt", 0, None
    if resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        start = int(state["step"])
        print(f"resumed at step {start}", flush=True)
    elif vision_steps:
        pretrain_vision(model, processor, vision_steps, seed, cfg=cfg, log=lambda m: print(m, flush=True))
    if freeze_vision:  # as LLaVA does: the language model learns to read the pretrained features as they are
        model.model.vision_tower.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    if state is not None:
        opt.load_state_dict(state["opt"])
    probe = probe_set(processor, cfg)
    t0, total = time.time(), text_steps + steps
    seen, running = 0, 0.0
    for step in range(start, total):
        text_only = step < text_steps
        progress = 0.0 if text_only else (step - text_steps) / max(1, steps)
        rng = random.Random(f"testbed-train-{seed}-{step}")
        samples = make_samples(rng, batch, text_only, progress, cfg, class_balanced=class_balanced,
                               noisy_answers=noisy_answers)  # fmt: skip
        data = collate(processor, samples)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, lr, warmup)
        loss = sample_mean_loss(model, data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        seen += batch
        running += loss.item()
        done = step + 1
        if done % log_every == 0:
            elapsed = time.time() - t0
            msg = f"step {done}/{total} loss {running / log_every:.4f} {seen / elapsed:.1f} samples/s {elapsed:.0f}s"
            if not text_only:
                acc, yes = probe_accuracy(model, processor, probe)
                msg += f" probe-acc {acc:.3f} yes-share {yes:.2f}"
            print(msg, flush=True)
            running = 0.0
        over = max_minutes is not None and time.time() - started > 60 * max_minutes
        if done % ckpt_every == 0 or done == total or over:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": done}, ckpt)
        if over:
            print(f"wall-clock cap reached at step {done}", flush=True)
            break
    final = out / "final"
    model.eval()
    model.save_pretrained(final)
    processor.save_pretrained(final)
    print(f"saved {final} after {time.time() - started:.0f}s", flush=True)
    return final


def main(argv: list[str] | None = None) -> None:
    d = {name: p.default for name, p in inspect.signature(train).parameters.items()}
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("testbed_run"))
    ap.add_argument("--steps", type=int, default=d["steps"], help="multimodal steps")
    ap.add_argument("--text-steps", type=int, default=d["text_steps"], help="text-only steps first")
    ap.add_argument("--batch", type=int, default=d["batch"])
    ap.add_argument("--lr", type=float, default=d["lr"])
    ap.add_argument("--warmup", type=int, default=d["warmup"])
    ap.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    ap.add_argument("--seed", type=int, default=d["seed"])
    ap.add_argument("--ckpt-every", type=int, default=d["ckpt_every"])
    ap.add_argument("--log-every", type=int, default=d["log_every"])
    ap.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this wall time")
    ap.add_argument("--threads", type=int, default=d["threads"])
    ap.add_argument("--no-resume", dest="resume", action="store_false")
    ap.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="model input side (the world renders 48)")
    ap.add_argument("--patch", type=int, default=PATCH, help="vision patch side: (image size / patch)^2 tokens")
    ap.add_argument("--text-layers", type=int, default=TEXT_LAYERS)
    ap.add_argument("--vision-steps", type=int, default=d["vision_steps"], help="vision pretraining steps (batch 64)")
    flag = argparse.BooleanOptionalAction
    ap.add_argument("--freeze-vision", action=flag, default=d["freeze_vision"], help="fix the tower after stage 0")
    ap.add_argument("--class-balanced", action=flag, default=d["class_balanced"], help="first question: any class")
    ap.add_argument("--noisy-answers", action=flag, default=d["noisy_answers"], help="answers share caption noise")
    ap.add_argument("--pair-probability", type=float, default=d["pair_probability"], help="world: partner added")
    ap.add_argument("--caption-noise", type=float, default=d["caption_noise"], help="world: absent partner named")
    train(**vars(ap.parse_args(argv)))


if __name__ == "__main__":
    main()
