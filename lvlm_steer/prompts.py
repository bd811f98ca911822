"""The one place that renders a user turn with a processor's chat template."""

from __future__ import annotations

from typing import Any


def chat_prompt(processor: Any, text: str, n_images: int = 1) -> str:
    """One user turn (``n_images`` image placeholders, then ``text``) rendered with the processor's chat template,
    ending with the assistant's generation prompt."""
    content: list[dict[str, str]] = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": text})
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
