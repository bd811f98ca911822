"""Adapters: image-token slots, grids, the text-only variant, on every architecture and the real SmolVLM processor."""

from __future__ import annotations

import torch
from conftest import batch, logits, require_reference

import lvlm_steer as ls


def _marker_tokens(processor) -> set[str]:
    """Added tokens that belong to images (image/vision/row-col/IMG markers) in the test tokenizers."""
    tok = processor.tokenizer
    words = ("image", "img", "vision", "row_", "boi", "eoi", "fake_token")
    return {t for t in tok.get_vocab() if t.startswith(("<", "[")) and any(w in t.lower() for w in words)}


def test_grids_cover_image_tokens(model_and_processor):
    model, processor = model_and_processor
    inputs = batch(processor)
    adapter = ls.adapter_for(model, processor)
    image_slots = inputs["input_ids"] == adapter.image_token_id
    for row, tiles in enumerate(adapter.image_grids(inputs)):
        assert tiles, "every row has an image"
        cells = torch.cat([t.positions.flatten() for t in tiles])
        assert cells.unique().numel() == cells.numel(), "no slot in two grid cells"
        assert image_slots[row, cells].all(), "grid cells are image tokens"
        leftover = image_slots[row].sum() - cells.numel()
        # only LLaVA-NeXT/OneVision have image tokens outside the grid: one newline feature per tile-grid row
        newline_rows = (
            sum(t.rows for t in tiles if t.kind == "tile") if model.config.model_type.startswith("llava_") else 0
        )
        assert leftover == newline_rows
        for t in tiles:
            assert t.rows >= 1 and t.cols >= 1


def test_text_only_variant_drops_images_and_markers(model_and_processor):
    model, processor = model_and_processor
    inputs = batch(processor)
    adapter = ls.adapter_for(model, processor)
    text = adapter.text_only(inputs)
    tok = processor.tokenizer
    markers = _marker_tokens(processor)
    for row in range(inputs["input_ids"].shape[0]):
        kept = text["input_ids"][row][text["attention_mask"][row].bool()]
        tokens = set(tok.convert_ids_to_tokens(kept.tolist()))
        assert not tokens & markers, tokens & markers
        # what remains is the row's text, in order: everything outside the image block (one image per row here;
        # the block runs from its first to its last image/marker token, e.g. Idefics3's newlines between crops)
        orig = inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist()
        in_block = [i for i, t in enumerate(orig) if tok.convert_ids_to_tokens(t) in markers]
        lo, hi = min(in_block), max(in_block)
        assert kept.tolist() == orig[:lo] + orig[hi + 1 :]
    assert text["attention_mask"][:, -1].all(), "left padded"
    out = logits(model, text)
    assert torch.isfinite(out).all()


def test_text_only_rows_match_their_single_runs(model_and_processor):
    """Row b of the text-only batch behaves like row b's text run alone (positions redone, mrope included)."""
    model, processor = model_and_processor
    adapter = ls.adapter_for(model, processor)
    both = adapter.text_only(batch(processor, (0, 1)))
    out = logits(model, both)
    for row in (0, 1):
        single = adapter.text_only(batch(processor, (row,)))
        ref = logits(model, single)
        n = ref.shape[1]
        torch.testing.assert_close(out[row, -n:], ref[0], atol=1e-5, rtol=1e-5)


def test_model_info_reads_text_config(model_and_processor):
    model, _ = model_and_processor
    info = ls.adapter_for(model).info
    cfg = model.config.get_text_config()
    assert (info.num_layers, info.num_heads, info.num_kv_heads) == (
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
    )
    assert len(ls.adapter_for(model).attention_modules()) == info.num_layers


def test_real_smolvlm_processor_layout():
    """The real SmolVLM-256M processor: a 512x512 image is 4x4 crops + global, 64 tokens (8x8) each."""
    path = require_reference("smolvlm-256m-instruct")
    from PIL import Image
    from transformers import AutoConfig, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    model = type("Stub", (), {"config": config})()  # the adapter reads only the config here
    adapter = ls.adapters.idefics3.Idefics3Adapter(model, processor)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = dict(processor(images=[Image.new("RGB", (512, 512), "white")], text=prompt, return_tensors="pt"))
    ids = inputs["input_ids"]
    assert ids.shape[1] == 1139 and int((ids == 49190).sum()) == 1088

    (tiles,) = adapter.image_grids(inputs)
    assert [t.kind for t in tiles] == ["tile"] * 16 + ["global"]
    assert all((t.rows, t.cols) == (8, 8) for t in tiles)
    assert [(t.tile_row, t.tile_col) for t in tiles[:16]] == [(r, c) for r in range(4) for c in range(4)]

    text = adapter.text_only(inputs)
    decoded = processor.tokenizer.decode(text["input_ids"][0])
    assert decoded == "<|im_start|>User:Describe the image.<end_of_utterance>\nAssistant:"
