"""Training batches for the SmolLM2 testbed: the first testbed's samples (`lvlm_steer.testbed.data.make_samples`),
rendered in SmolLM2's ChatML with the processor's image-token expansion, so training sees exactly the token layout
that the POPE/CHAIR runners build at test time. Labels cover only the answers (and the ``<|im_end|>`` closing each).
"""

from __future__ import annotations

import torch

from lvlm_steer.testbed.data import Sample, image_tokens


def first_turn(processor, prompt: str, with_image: bool) -> str:
    """The first user turn up to the generation prompt, image token expanded as the processor does."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return text.replace(processor.image_token, processor.image_token * image_tokens(processor))


def follow_up(prompt: str) -> str:
    """A later turn, as the ChatML template renders it after the previous answer's ``<|im_end|>``."""
    return f"\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def collate(processor, samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` (-100 outside answers) and ``pixel_values``."""
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    rows = []
    for sample in samples:
        ids = tok(first_turn(processor, sample.prompt, sample.image is not None), add_special_tokens=False)["input_ids"]
        labels = [-100] * len(ids)
        for k, (prompt, answer) in enumerate([(sample.prompt, sample.answer), *sample.follow_ups]):
            if k:
                turn = tok(follow_up(prompt), add_special_tokens=False)["input_ids"]
                ids, labels = ids + turn, labels + [-100] * len(turn)
            reply = tok(answer.strip(), add_special_tokens=False)["input_ids"] + [end]
            ids, labels = ids + reply, labels + reply
        rows.append((ids, labels))
    length = max(len(ids) for ids, _ in rows)
    batch = {
        "input_ids": torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), length), dtype=torch.long),
        "labels": torch.full((len(rows), length), -100, dtype=torch.long),
    }
    for i, (ids, labels) in enumerate(rows):
        batch["input_ids"][i, : len(ids)] = torch.tensor(ids)
        batch["labels"][i, : len(ids)] = torch.tensor(labels)
        batch["attention_mask"][i, : len(ids)] = 1
    images = [s.image for s in samples if s.image is not None]
    if images:
        batch["pixel_values"] = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return batch
