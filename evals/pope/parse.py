"""Turn a model's free-text answer into ``"yes"``, ``"no"`` or ``"unknown"``.

Published POPE numbers differ partly because papers parse answers differently, so each convention is a named
parser and reports say which one they used. ``pope`` (the official rule) is the default.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable

from lvlm_steer.errors import closest_first

_WORD = re.compile(r"[a-z]+")


def parse_pope(text: str) -> str:
    """The official POPE rule: keep the text before the first ".", drop commas, split on single spaces; "no" if a
    word is exactly "No", "no" or "not", else "yes". Never "unknown"; case-sensitive, so "NO" or "Nope" read as yes.
    """
    first = text.split(".", 1)[0].replace(",", "")
    words = first.split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


def parse_vcd(text: str) -> str:
    """VCD-repo style, label-free: lowercase, split into runs of letters a-z, "no" if a word is "no" or "not",
    else "yes". Unlike `parse_pope` this reads the whole answer (not just its first sentence) and ignores case;
    matching is by word, so "nothing", "cannot" or "know" do not count as no, and "isn't" splits into "isn", "t".
    """
    words = set(_WORD.findall(text.lower()))
    return "no" if words & {"no", "not"} else "yes"


def parse_lmms(text: str) -> str:
    """lmms-eval style exact match: lowercase, strip spaces and one trailing "."; "yes"/"no" exactly, else unknown."""
    answer = text.strip().lower()
    answer = answer[:-1].strip() if answer.endswith(".") else answer
    return answer if answer in ("yes", "no") else "unknown"


def parse_vlmeval(text: str) -> str:
    """VLMEvalKit style: lowercase, split on whitespace, strip punctuation from each word; exactly one of "yes" and
    "no" among the words gives that answer, both or neither give unknown.
    """
    words = {w.strip(string.punctuation) for w in text.lower().split()}
    has_yes, has_no = "yes" in words, "no" in words
    if has_yes != has_no:
        return "yes" if has_yes else "no"
    return "unknown"


PARSERS: dict[str, Callable[[str], str]] = {
    "pope": parse_pope,
    "vcd": parse_vcd,
    "lmms": parse_lmms,
    "vlmeval": parse_vlmeval,
}
DEFAULT_PARSER = "pope"


def parse_answer(text: str, parser: str = DEFAULT_PARSER) -> str:
    """``"yes"`` / ``"no"`` / ``"unknown"`` for one generated answer, with the named parser from `PARSERS`."""
    if parser not in PARSERS:
        raise ValueError(f"unknown POPE answer parser {parser!r}; choose one of {closest_first(parser, PARSERS)}")
    if not isinstance(text, str):
        raise TypeError(f"answer must be a str (the decoded generation), got {type(text).__name__}")
    return PARSERS[parser](text)
