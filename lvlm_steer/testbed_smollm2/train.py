"""Train the SmolLM2 testbed's connector: ``python -m lvlm_steer.testbed_smollm2.train --out DIR``.

LLaVA's recipe with both pretrained parts frozen: the language model is SmolLM2-135M-Instruct as released (so its
attention sink and massive activations stay its own), the vision tower is the first testbed's world-pretrained CLIP
tower; only the connector (Llava's two-layer MLP projector) learns. Stage 1 (``--align-steps``) aligns it on
captions alone; stage 2 adds the multi-turn yes/no conversations of `lvlm_steer.testbed.data.make_samples`
(answers carrying the world's annotation noise, captions naming absent partners), so the model learns the
partner prior from its data. Logits are computed only where there are labels (the 49k-word head over every position
would cost a fifth of the step). Deterministic given the seed and thread count; checkpoints every
``--ckpt-every`` steps and resumes from ``DIR/ckpt.pt``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lvlm_steer.testbed.data import make_samples
from lvlm_steer.testbed.train import lr_at, probe_set
from lvlm_steer.testbed.world import DEFAULT_WORLD, WorldConfig

from . import CONFIG_FILE, WEIGHTS_FILE, build_untrained
from .data import collate
from .model import NO, YES, trained_state


def answer_loss(model, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy on the label positions only, averaged per sample, then over samples."""
    labels = data["labels"][:, 1:]
    hidden = model.model(**{k: v for k, v in data.items() if k != "labels"}).last_hidden_state[:, :-1]
    rows, cols = (labels != -100).nonzero(as_tuple=True)
    losses = torch.nn.functional.cross_entropy(model.lm_head(hidden[rows, cols]), labels[rows, cols], reduction="none")
    per_row = torch.zeros(labels.shape[0]).index_add(0, rows, losses)
    counts = torch.zeros(labels.shape[0]).index_add(0, rows, torch.ones_like(losses))
    return (per_row / counts.clamp_min(1)).mean()


@torch.no_grad()
def probe_accuracy(model, processor, probe, batch: int = 32) -> tuple[float, float]:
    """(accuracy, share answered Yes) of the first answer token on the probe set."""
    inputs, labels = probe
    tok = processor.tokenizer
    yes, no = tok.convert_tokens_to_ids(YES), tok.convert_tokens_to_ids(NO)
    was_training = model.training
    model.eval()
    tops = []
    for k in range(0, len(labels), batch):
        chunk = {key: v[k : k + batch] for key, v in inputs.items()}
        hidden = model.model(**chunk).last_hidden_state[:, -1]
        tops.append(model.lm_head(hidden).argmax(-1))
    model.train(was_training)
    top = torch.cat(tops)
    said = torch.where(top == yes, 1, torch.where(top == no, 0, -1))
    return (said == labels).float().mean().item(), (top == yes).float().mean().item()


def save_connector(model, folder: Path, recipe: dict) -> None:
    """What ships: the trained parts (tower, connector) and what is needed to rebuild the model around them."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(trained_state(model), folder / WEIGHTS_FILE)
    config = {"vision_config": model.config.vision_config.to_dict(),
              "projector_hidden_act": model.config.projector_hidden_act, "recipe": recipe}  # fmt: skip
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")


def train(
    out: Path, steps: int = 900, align_steps: int = 100, batch: int = 8, lr: float = 1e-3, warmup: int = 50,
    weight_decay: float = 0.0, seed: int = 0, ckpt_every: int = 25, snapshot_every: int = 100, log_every: int = 50,
    probe_size: int = 128, max_minutes: float | None = None, resume: bool = True, threads: int = 2,
    caption_share: float = 0.25, follow_ups: int = 5, noisy_answers: bool = True, bf16: bool = True,
    pair_probability: float = DEFAULT_WORLD.pair_probability, caption_noise: float = DEFAULT_WORLD.caption_noise,
) -> Path:  # fmt: skip
    """Train (or resume) into ``out``; write the shippable connector to ``out/final``; return that path."""
    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items()}
    torch.set_num_threads(threads)
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    cfg = WorldConfig(pair_probability=pair_probability, caption_noise=caption_noise)
    torch.manual_seed(seed)
    model, processor = build_untrained()
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector
    projector.requires_grad_(True)
    model.train()
    print(f"model ready in {time.time() - started:.0f}s", flush=True)
    trainable = list(projector.parameters())
    opt = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    ckpt, start = out / "ckpt.pt", 0
    if resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        projector.load_state_dict(state["projector"])
        opt.load_state_dict(state["opt"])
        start = int(state["step"])
        print(f"resumed at step {start}", flush=True)
    probe = probe_set(processor, cfg, n=probe_size)
    total = align_steps + steps
    t0, seen, running = time.time(), 0, 0.0
    done = start
    for step in range(start, total):
        rng = random.Random(f"testbed-smollm2-train-{seed}-{step}")
        share = 1.0 if step < align_steps else caption_share  # stage 1: captions only
        samples = make_samples(rng, batch, False, 1.0, cfg, caption_share=share, follow_ups=follow_ups,
                               noisy_answers=noisy_answers)  # fmt: skip
        data = collate(processor, samples)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, lr, warmup)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = answer_loss(model, data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        seen += batch
        running += loss.item()
        done = step + 1
        if done % log_every == 0 or done == total:
            elapsed = time.time() - t0
            acc, yes = probe_accuracy(model, processor, probe)
            print(f"step {done}/{total} loss {running / log_every:.4f} {seen / elapsed:.2f} samples/s "
                  f"{elapsed:.0f}s (wall {time.time() - started:.0f}s) probe-acc {acc:.3f} yes-share {yes:.2f}",
                  flush=True)  # fmt: skip
            running = 0.0
        over = max_minutes is not None and time.time() - started > 60 * max_minutes
        if done % ckpt_every == 0 or done == total or over:
            torch.save({"projector": projector.state_dict(), "opt": opt.state_dict(), "step": done}, ckpt)
        if done % snapshot_every == 0:  # a loadable connector to evaluate while the run goes on
            save_connector(model, out / f"step{done}", recipe | {"trained_steps": done})
        if over:
            print(f"wall-clock cap reached at step {done}", flush=True)
            break
    final = out / "final"
    if start >= total:
        print(f"already trained ({start} steps)", flush=True)
    save_connector(model, final, recipe | {"trained_steps": done})
    print(f"saved {final} after {time.time() - started:.0f}s", flush=True)
    return final


def main(argv: list[str] | None = None) -> None:
    d = {name: p.default for name, p in inspect.signature(train).parameters.items()}
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("testbed_smollm2_run"))
    flag = argparse.BooleanOptionalAction
    for name, default in d.items():
        if name in ("out", "resume"):
            continue
        opt = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            ap.add_argument(opt, action=flag, default=default)
        else:
            ap.add_argument(opt, type=float if name in ("lr", "weight_decay", "caption_share", "max_minutes",
                                                        "pair_probability", "caption_noise") else int,
                            default=default)  # fmt: skip
    ap.add_argument("--no-resume", dest="resume", action="store_false")
    train(**vars(ap.parse_args(argv)))


if __name__ == "__main__":
    main()
