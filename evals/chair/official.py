"""CHAIR mentions exactly as the official code finds them (Rohrbach et al., 2018, ``utils/chair.py``), for
``--chair-rules official``: published CHAIR numbers come from these rules, quirks and all.

The official steps: lowercase; ``nltk.word_tokenize`` (`official_tokens`); ``pattern.en.singularize`` on every
token (`pattern_singularize`); merge listed word *pairs*, greedily left to right; drop every "seat" when the
caption has a "toilet"; keep the words that are in the synonyms list. What that means, next to our ``fixed`` rules:

* "bus" singularizes to "bu" and "ties" to "ty", so neither is ever a mention ("buses" -> "bus" is one; so is
  "tie");
* hyphenated words stay whole tokens, so "man-made" is not a person and "vase-like" not a vase;
* baby/adult make one word only with the listed animals (bird, cat, dog, horse, sheep, cow, elephant, bear, zebra,
  giraffe, animal, cub): "baby elephant" is one elephant, "baby duck" is a person and a bird, "baby animal" nothing;
* listed pairs are matched on singularized words: "sports ball" (-> "sport ball") and "tennis racket" (-> "tenni
  racket") never merge, so they count through "ball" and "racket"; "wine glass" merges through the listed
  "wine glas"; "bow tie" is a tie, "toilet seat" a toilet, "passenger jet"/"passenger train" a jet/train;
  "home plate" and "train track" are merged and then dropped, so their "train" does not count; "motor bike" is
  merged but its synonym is listed as " motor bike" (leading space), so it yields nothing at all;
* " cheesecake" (leading space) and "iPhone" (capital) can never match lowercased tokens; "stove top oven" has three
  words and pairs have two, so "stove top oven" counts "stove" and "oven" (two ovens);
* plural "-ie" words stay plural ("collies", "doggies" are not dogs), and "glass", "tennis" lose their final "s".
"""

from __future__ import annotations

from .mention import Mention
from .nltk_tokens import official_tokens
from .pattern_singular import pattern_singularize
from .vocab import OFFICIAL_FORMS

# the pairs the official code merges (keys are singularized words) and the word each pair becomes
_LISTED_PAIRS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
    "potted plant", "bow tie", "laptop computer", "home plate", "train track",
)  # fmt: skip
OFFICIAL_BABY_ADULT_WORDS = (
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub",
)  # fmt: skip
OFFICIAL_PAIRS: dict[str, str] = {
    **{pair: pair for pair in _LISTED_PAIRS},
    **{f"{age} {animal}": animal for animal in OFFICIAL_BABY_ADULT_WORDS for age in ("baby", "adult")},
    "passenger jet": "jet",
    "passenger train": "train",
    "bow tie": "tie",
    "toilet seat": "toilet",
    "wine glas": "wine glass",
}


def official_mentions(caption: str) -> list[Mention]:
    """The COCO object mentions the official CHAIR code finds in ``caption``, in caption order."""
    words = [pattern_singularize(token) for token in official_tokens(caption.lower())]
    merged: list[tuple[str, int]] = []
    i = 0
    while i < len(words):
        pair = " ".join(words[i : i + 2])
        if pair in OFFICIAL_PAIRS:
            merged.append((OFFICIAL_PAIRS[pair], i))
            i += 2
        else:
            merged.append((words[i], i))
            i += 1
    seen = {word for word, _ in merged}
    if "toilet" in seen and "seat" in seen:
        merged = [(word, i) for word, i in merged if word != "seat"]
    return [Mention(word, OFFICIAL_FORMS[word], i) for word, i in merged if word in OFFICIAL_FORMS]
