"""Offline processors for the tiny test models: the real processor classes with tiny image settings.

Image sizes are chosen so every architecture's image splitting / tiling path actually runs on small images
(a 64x48 image becomes several tiles), while the vision towers stay 28x28 / patch 7. Without torchvision, a few
processor classes cannot be built as-is; thin subclasses drop the video processor (or relax PaliGemma's
"images required" check) and otherwise run the library's own code.
"""

from __future__ import annotations

import importlib
import sys
import types

from transformers import (
    CLIPImageProcessorPil,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    GotOcr2ImageProcessorPil,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    InternVLProcessor,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    PaliGemmaProcessor,
    PixtralImageProcessorPil,
    ProcessorMixin,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    SiglipImageProcessorPil,
    SmolVLMImageProcessorPil,
    SmolVLMProcessor,
)

from .tokenizer import tiny_tokenizer

VISION_SIZE = 28  # side of one vision-tower input (tile), pixels
PATCH = 7  # vision patch size -> 4x4 patches per 28x28 tile
GRID_PINPOINTS = [[28, 56], [56, 28], [56, 56]]  # LLaVA-NeXT/OneVision anyres: base image + up to 2x2 tiles
QWEN_MERGE = 2  # Qwen2-VL spatial merge (2x2 patches -> 1 token)
SPLIT_SIZE = 56  # Idefics3/SmolVLM: resize longest edge to this, then cut 28x28 tiles (+ a global image)
PIXTRAL_LONGEST = 56  # Mistral3: longest image edge; 7px patches merged 2x2 -> one token per 14x14 pixels
INTERNVL_MAX_TILES = 4
TOKENS_PER_TILE = {  # image tokens per 28x28 tile after each projector's pooling / pixel shuffle
    "idefics3": 4,
    "smolvlm": 4,
    "gemma3": 4,
    "internvl": 4,
    "paligemma": (VISION_SIZE // PATCH) ** 2,
    "llava_onevision": (VISION_SIZE // PATCH) ** 2,
}

# Text the chat template puts where an image goes: each processor expands its own placeholder.
IMAGE_PLACEHOLDER = {
    "llava": "<image>\n",
    "llava_next": "<image>\n",
    "llava_onevision": "<image>\n",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "idefics3": "<image>",
    "smolvlm": "<image>",
    "gemma3": "<start_of_image>",
    "paligemma": "<image>",
    "internvl": "<IMG_CONTEXT>\n",
    "mistral3": "[IMG]",
}


def chat_template(placeholder: str, *, bos: bool = True, images_first: bool = False) -> str:
    """``<s>USER: <image>\\nquestion\\nASSISTANT:``-style jinja template.

    ``images_first`` puts every image before the turns (PaliGemma wants an image prefix, then its processor inserts
    BOS after the last image); ``bos=False`` leaves BOS to the processor.
    """
    image = "{{ " + repr(placeholder) + " }}"
    parts = ["{{ bos_token }}" if bos else ""]
    if images_first:
        parts += [
            "{%- for m in messages if m['content'] is not string -%}",
            "{%- for c in m['content'] if c['type'] == 'image' -%}" + image + "{%- endfor -%}",
            "{%- endfor -%}",
        ]
        image = ""
    parts += [
        "{%- for m in messages -%}",
        "{{ m['role'] | upper }}{{ ': ' }}",
        "{%- if m['content'] is string -%}{{ m['content'] }}",
        "{%- else -%}{%- for c in m['content'] -%}",
        "{%- if c['type'] == 'image' -%}" + image + "{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}",
        "{%- endfor -%}{%- endif -%}",
        "{{ '\\n' }}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}",
    ]
    return "".join(parts)


# --- image-only subclasses: without torchvision there is no video processor to hand over -----------------------------
# ProcessorMixin takes its sub-processor list from the ``__init__`` signature, so dropping ``video_processor`` from the
# signature makes the parent's positional ``None`` video processor fall away.


class ImageOnlyLlavaOnevisionProcessor(LlavaOnevisionProcessor):
    """LlavaOnevisionProcessor without a video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without a video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without a video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyInternVLProcessor(InternVLProcessor):
    """InternVLProcessor without a video processor."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length=256, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, image_seq_length, chat_template=chat_template, **kwargs)


class ImageOnlySmolVLMProcessor(SmolVLMProcessor):
    """SmolVLMProcessor without a video processor (and so without its ``num2words`` dependency)."""

    def __init__(self, image_processor, tokenizer, image_seq_len: int = 169, chat_template=None, **kwargs):
        self.fake_image_token = tokenizer.fake_image_token
        self.image_token = tokenizer.image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = tokenizer.end_of_utterance_token
        self.global_image_token = tokenizer.global_image_token
        self.image_seq_len = image_seq_len
        self.video_token = tokenizer.video_token
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """Skip SmolVLM's override, which reads video-processor defaults."""
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)


class TextCapablePaliGemmaProcessor(PaliGemmaProcessor):
    """PaliGemmaProcessor that also accepts text-only prompts, formatted like image prompts (``<s>text\\n``)."""

    def validate_inputs(self, images=None, text=None, **kwargs):
        if images is None:
            return ProcessorMixin.validate_inputs(self, images=images, text=text, **kwargs)
        return super().validate_inputs(images=images, text=text, **kwargs)

    def prepare_inputs_layout(self, images=None, text=None, **kwargs):
        images, text, videos, audio = super().prepare_inputs_layout(images=images, text=text, **kwargs)
        if images is None and text is not None:
            text = [f"{self.tokenizer.bos_token}{sample}\n" for sample in text]
        return images, text, videos, audio


def _pixtral_processor_class() -> type[ProcessorMixin]:
    """Import ``PixtralProcessor``, whose module imports a torchvision-only helper when torchvision is missing.

    The helper (``get_resize_output_image_size``) has an identical PIL twin, provided by a temporary shim module
    that is removed again right after the import.
    """
    name = "transformers.models.pixtral.image_processing_pixtral"
    try:
        return importlib.import_module("transformers.models.pixtral.processing_pixtral").PixtralProcessor
    except ImportError:
        pass
    from transformers.models.pixtral import image_processing_pil_pixtral as pil

    shim = types.ModuleType(name)
    shim.get_resize_output_image_size = pil.get_resize_output_image_size
    sys.modules[name] = shim
    sys.modules.pop("transformers.models.pixtral.processing_pixtral", None)
    try:
        return importlib.import_module("transformers.models.pixtral.processing_pixtral").PixtralProcessor
    finally:
        del sys.modules[name]


def _square(side: int) -> dict[str, int]:
    return {"height": side, "width": side}


def tiny_processor(arch: str) -> ProcessorMixin:
    """The working offline processor of ``arch`` (a fresh object each call; deterministic)."""
    tok = tiny_tokenizer(arch)
    tmpl = chat_template(IMAGE_PLACEHOLDER[arch], bos=arch != "paligemma", images_first=arch == "paligemma")
    s = VISION_SIZE
    if arch == "llava":
        ip = CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size=_square(s))
        return LlavaProcessor(
            ip, tok, patch_size=PATCH, vision_feature_select_strategy="default",
            num_additional_image_tokens=1, chat_template=tmpl,
        )  # fmt: skip
    if arch == "llava_next":
        ip = LlavaNextImageProcessorPil(
            size={"shortest_edge": s}, crop_size=_square(s), image_grid_pinpoints=GRID_PINPOINTS
        )
        return LlavaNextProcessor(
            ip, tok, patch_size=PATCH, vision_feature_select_strategy="default",
            num_additional_image_tokens=1, chat_template=tmpl,
        )  # fmt: skip
    if arch == "llava_onevision":
        ip = LlavaOnevisionImageProcessorPil(size=_square(s), image_grid_pinpoints=GRID_PINPOINTS)
        return ImageOnlyLlavaOnevisionProcessor(
            ip, tok, num_image_tokens=TOKENS_PER_TILE[arch], vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9", chat_template=tmpl,
        )  # fmt: skip
    if arch in ("qwen2_vl", "qwen2_5_vl"):
        unit = PATCH * QWEN_MERGE  # images are resized to multiples of 14 px
        ip = Qwen2VLImageProcessorPil(
            min_pixels=4 * unit * unit, max_pixels=64 * unit * unit, patch_size=PATCH,
            merge_size=QWEN_MERGE, temporal_patch_size=2,
        )  # fmt: skip
        cls = ImageOnlyQwen2VLProcessor if arch == "qwen2_vl" else ImageOnlyQwen2_5_VLProcessor
        return cls(ip, tok, chat_template=tmpl)
    if arch in ("idefics3", "smolvlm"):
        ip_cls, cls = (
            (Idefics3ImageProcessorPil, Idefics3Processor)
            if arch == "idefics3"
            else (SmolVLMImageProcessorPil, ImageOnlySmolVLMProcessor)
        )
        ip = ip_cls(size={"longest_edge": SPLIT_SIZE}, max_image_size={"longest_edge": s}, do_image_splitting=True)
        return cls(ip, tok, image_seq_len=TOKENS_PER_TILE[arch], chat_template=tmpl)
    if arch == "gemma3":
        ip = Gemma3ImageProcessorPil(size=_square(s))
        return Gemma3Processor(ip, tok, chat_template=tmpl, image_seq_length=TOKENS_PER_TILE[arch])
    if arch == "paligemma":
        ip = SiglipImageProcessorPil(size=_square(s))
        ip.image_seq_length = TOKENS_PER_TILE[arch]  # PaliGemmaProcessor reads the count from the image processor
        return TextCapablePaliGemmaProcessor(ip, tok, chat_template=tmpl)
    if arch == "internvl":
        ip = GotOcr2ImageProcessorPil(
            size=_square(s), crop_to_patches=True, min_patches=1, max_patches=INTERNVL_MAX_TILES
        )
        return ImageOnlyInternVLProcessor(ip, tok, image_seq_length=TOKENS_PER_TILE[arch], chat_template=tmpl)
    if arch == "mistral3":
        ip = PixtralImageProcessorPil(size={"longest_edge": PIXTRAL_LONGEST}, patch_size=_square(PATCH))
        return _pixtral_processor_class()(ip, tok, patch_size=PATCH, spatial_merge_size=2, chat_template=tmpl)
    raise ValueError(f"unknown architecture {arch!r}")
