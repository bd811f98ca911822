"""Head scans: VHD and image-attention share against independent computations; files and the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import _model

import lvlm_steer as ls
from lvlm_steer.cli import main
from lvlm_steer.evals.runner import chat_text
from lvlm_steer.testing import make_image

PROMPT = "What is in the image?"


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def scanned(request):
    model, processor = _model(request.param)
    images = [make_image(0), make_image(1, (40, 56)), make_image(2)]
    return model, processor, images, ls.scan_heads(model, processor, images, PROMPT, batch_size=2)


def _inputs(processor, images):
    processor.tokenizer.padding_side = "left"
    text = chat_text(processor, PROMPT)
    return dict(processor(images=[[i] for i in images], text=[text] * len(images), padding=True, return_tensors="pt"))


def test_vhd_matches_plain_hooks(scanned):
    model, processor, images, scores = scanned
    adapter = ls.adapter_for(model, processor)
    info = adapter.info
    captured: dict[int, torch.Tensor] = {}
    handles = [
        adapter.o_proj(i).register_forward_pre_hook(
            lambda m, a, i=i: captured.__setitem__(i, a[0][:, -1].reshape(-1, info.num_heads, info.head_dim))
        )
        for i in range(info.num_layers)
    ]
    try:
        vhd = torch.zeros(info.num_layers, info.num_heads)
        for image in images:  # one image at a time: no padding at all in this reference
            inputs = _inputs(processor, [image])
            with torch.no_grad():
                model(**inputs)
                with_image = dict(captured)
                model(**adapter.text_only(inputs))
            for i in range(info.num_layers):
                vhd[i] += (with_image[i] - captured[i]).norm(dim=-1)[0] / len(images)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(torch.tensor(scores.vhd), vhd, atol=1e-4, rtol=1e-4)
    assert vhd.min() >= 0 and vhd.max() > 0


def test_image_share_matches_eager_attentions(scanned):
    model, processor, images, scores = scanned
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    share = torch.zeros_like(torch.tensor(scores.image_share))
    for image in images:
        inputs = _inputs(processor, [image])
        with torch.no_grad():
            attentions = eager(**inputs, output_attentions=True).attentions
        image_keys = inputs["input_ids"][0] == model.config.image_token_id
        for layer, probs in enumerate(attentions):
            share[layer] += probs[0, :, -1, image_keys].sum(-1) / len(images)
    torch.testing.assert_close(torch.tensor(scores.image_share), share, atol=1e-5, rtol=1e-5)


def test_scores_api_and_files(scanned, tmp_path):
    _, _, _, scores = scanned
    top = scores.top(3)
    assert len(top) == 3 and top[0][2] >= top[1][2] >= top[2][2]
    assert top[0][2] == max(max(row) for row in scores.vhd)
    assert ls.HeadScores.from_json(scores.to_json()) == scores
    scores.to_csv(tmp_path / "h.csv")
    lines = (tmp_path / "h.csv").read_text().splitlines()
    assert lines[0] == "layer,head,vhd,image_share" and len(lines) == 1 + len(scores.vhd) * len(scores.vhd[0])
    from PIL import Image

    png = scores.plot(tmp_path / "h.png")
    assert Image.open(png).size[0] > 400
    with pytest.raises(ValueError, match="by must be one of"):
        scores.top(3, by="entropy")


def test_heads_cli(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for seed in (0, 1):
        make_image(seed).save(folder / f"{seed}.png")
    out = tmp_path / "scan"
    assert (
        main(
            [
                "heads",
                "scan",
                "--model",
                "tiny:idefics3",
                "--images",
                str(folder),
                "--prompt",
                PROMPT,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "top heads by VHD" in capsys.readouterr().out
    assert json.loads((out / "heads.json").read_text())["n_images"] == 2
    assert (out / "heads.png").exists() and (out / "heads.csv").exists()
    assert (
        main(
            [
                "heads",
                "ablate",
                "--model",
                "tiny:llava",
                "--heads",
                "0.1,1.2",
                "--image",
                str(folder / "0.png"),
                "--prompt",
                PROMPT,
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "[ablated]" in printed and "log p(unablated answer)" in printed
    assert (
        main(
            [
                "heads",
                "scan",
                "--model",
                "tiny:llava",
                "--images",
                str(tmp_path / "none"),
                "--prompt",
                "x",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "neither an image file nor a folder" in capsys.readouterr().err
