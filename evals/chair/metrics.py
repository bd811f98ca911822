"""CHAIR scores of a set of captions: how often they name objects that are not in the image.

* ``chair_i`` (per instance): hallucinated mentions / all mentions; repeated mentions count each time.
* ``chair_s`` (per sentence): captions with at least one hallucinated mention / captions.
* ``recall``: ground-truth categories the captions mention / ground-truth categories, summed over images, so a
  method cannot lower CHAIR just by saying less without it showing here.
* ``mean_length``: words per caption (counted by our tokenizer whatever the rules), because longer captions
  hallucinate more and scores must be read with it.

Ratios with a zero denominator are 0.0, so an empty or object-free run still gives a well-formed report.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lvlm_steer.errors import SteeringError

from .extract import DEFAULT_CHAIR_RULES, check_rules, extract_objects, tokenize


class MissingGroundTruthError(SteeringError, KeyError):
    """A captioned image has no ground-truth entry."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def chair_scores(
    captions: Mapping[int, str], ground_truth: Mapping[int, set[str]], rules: str = DEFAULT_CHAIR_RULES
) -> dict[str, Any]:
    """CHAIR_i, CHAIR_s, recall, mean length and counts, plus per-caption details (JSON-serializable).

    ``rules`` picks the mention extraction: ``"official"`` (as published) or ``"fixed"`` (ours); score the ground
    truth's reference captions with the same rules.
    """
    check_rules(rules)
    n_mentions = n_hallucinated = n_bad_captions = n_words = covered = n_truth = 0
    per_caption = []
    for image_id, caption in captions.items():
        if image_id not in ground_truth:
            raise MissingGroundTruthError(
                f"image_id {image_id!r} has a caption but no ground truth; use the instances file of the split the "
                "images came from (e.g. val2014), and int image ids on both sides"
            )
        if not isinstance(caption, str):
            raise TypeError(f"caption of image_id {image_id!r} is a {type(caption).__name__}; pass the text")
        truth = set(ground_truth[image_id])
        mentions = extract_objects(caption, rules)
        hallucinated = [m.word for m in mentions if m.category not in truth]
        mentioned = list(dict.fromkeys(m.category for m in mentions))
        n_mentions += len(mentions)
        n_hallucinated += len(hallucinated)
        n_bad_captions += bool(hallucinated)
        n_words += len(tokenize(caption))
        covered += len(truth & set(mentioned))
        n_truth += len(truth)
        per_caption.append(
            {
                "image_id": image_id,
                "caption": caption,
                "mentioned": mentioned,
                "hallucinated": hallucinated,
                "ground_truth": sorted(truth),
            }
        )
    n = len(per_caption)
    return {
        "chair_i": _ratio(n_hallucinated, n_mentions),
        "chair_s": _ratio(n_bad_captions, n),
        "recall": _ratio(covered, n_truth),
        "mean_length": _ratio(n_words, n),
        "n_captions": n,
        "n_mentions": n_mentions,
        "n_hallucinated": n_hallucinated,
        "per_caption": per_caption,
    }
