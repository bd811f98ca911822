"""CHAIR (Rohrbach et al., 2018): object hallucination in image captions, scored against COCO annotations.

``extract_objects`` reads the COCO objects a caption mentions, ``load_ground_truth`` says which ones each image
holds, and ``chair_scores`` compares the two (CHAIR_i, CHAIR_s, recall, mean caption length). Each takes
``rules``: ``"official"`` (default) reproduces the official CHAIR code's mentions, quirks included, so scores compare
with papers; ``"fixed"`` is our corrected reading (bus, ties, hyphens, baby + any animal, motor bike, cheesecake,
iPhone, hair dryer, stove top oven).
"""

from __future__ import annotations

from .extract import CHAIR_RULES, DEFAULT_CHAIR_RULES, Mention, extract_objects, singularize, tokenize
from .groundtruth import ChairDataError, image_files, load_ground_truth
from .metrics import MissingGroundTruthError, chair_scores
from .vocab import COCO_CATEGORIES, SURFACE_FORMS

# the usual CHAIR captioning instruction in LVLM hallucination papers
DEFAULT_CHAIR_PROMPT = "Please describe this image in detail."

__all__ = [
    "CHAIR_RULES",
    "COCO_CATEGORIES",
    "DEFAULT_CHAIR_RULES",
    "DEFAULT_CHAIR_PROMPT",
    "SURFACE_FORMS",
    "ChairDataError",
    "Mention",
    "MissingGroundTruthError",
    "chair_scores",
    "extract_objects",
    "image_files",
    "load_ground_truth",
    "singularize",
    "tokenize",
]
