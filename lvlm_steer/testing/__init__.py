"""Tiny, offline, deterministic VLMs (real transformers classes) and inputs for tests.

``tiny_model(arch)`` gives a random model plus its working processor for each architecture in ``ARCHITECTURES``;
``make_image``, ``chat_prompt`` and ``tiny_batch`` make matching inputs. Nothing touches the network or the disk.
"""

from lvlm_steer.prompts import chat_prompt

from .coco import make_coco
from .configs import ARCHITECTURES
from .inputs import make_image, tiny_batch
from .models import tiny_model
from .processors import tiny_processor

__all__ = ["ARCHITECTURES", "chat_prompt", "make_coco", "make_image", "tiny_batch", "tiny_model", "tiny_processor"]
