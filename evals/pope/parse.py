"""Turn a model's free-text answer into ``"yes"``, ``"no"`` or ``"unknown"``.

Published POPE numbers differ partly because papers parse answers differently, so each convention is a named
parser and reports say which one they used. A parser named after a peer gives exactly that peer's decisions (each
rule below was re-derived from the peer's evaluation code; ``tests/data/pope_peer_decisions.json`` holds the
hand-derived decision table the tests check); ``pope`` (the official rule) is the default. ``words`` is ours.

A parser also carries the metric convention of its peer (`MetricConvention`), so that ``lmms`` reproduces
lmms-eval's recall, which leaves unreadable answers out.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from lvlm_steer.errors import closest_first

_WORD = re.compile(r"[a-z]+")


def parse_pope(text: str) -> str:
    """The official POPE rule: keep the text before the first ".", drop commas, split on single spaces; "no" if a
    word is exactly "No", "no" or "not", else "yes". Never "unknown"; case-sensitive, so "NO" or "Nope" read as yes.
    """
    first = text.split(".", 1)[0].replace(",", "")
    words = first.split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


def parse_vcd(text: str, label: str) -> str:
    """VCD's eval_pope.py: lowercase and strip, then a substring test that depends on the label. A "yes" question
    is answered yes when "yes" occurs anywhere in the answer, else no; a "no" question is answered no when "no"
    occurs anywhere (so "know", "not", "snow", "cannot", "unknown" all count), else yes. Never "unknown".
    """
    answer = text.lower().strip()
    if label == "yes":
        return "yes" if "yes" in answer else "no"
    return "no" if "no" in answer else "yes"


def parse_words(text: str) -> str:
    """Ours, a label-free repair of VCD's rule: lowercase, split into runs of letters a-z, "no" if a word is "no"
    or "not", else "yes". Reads the whole answer; matching is by word, so "nothing", "cannot" or "know" do not
    count as no, and "isn't" splits into "isn", "t" (so it is not a no either).
    """
    words = set(_WORD.findall(text.lower()))
    return "no" if words & {"no", "not"} else "yes"


def parse_lmms(text: str) -> str:
    """lmms-eval's pope task: lowercase, strip whitespace, then exact match. Only "yes" and "no" are read; anything
    else, "yes." and "no," included, is unknown (lmms-eval keeps it as a prediction that matches no label).
    """
    answer = text.lower().strip()
    return answer if answer in ("yes", "no") else "unknown"


# VLMEvalKit's punctuation handling: these characters are deleted when any of them touches a space in the answer
# (or the answer holds a digit-comma-digit), else each becomes a space; "*", "'", ":" and "." are not among them
_VLMEVAL_PUNCT = tuple(';/[]"{}()=+\\_-><@`,?!')
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_IN_NUMBER = re.compile(r"(?<!\d)\.(?!\d)")
# VLMEvalKit passes re.UNICODE positionally to Pattern.sub, where it lands on ``count``: at most 32 periods go
_VLMEVAL_PERIODS_REMOVED = 32


def _vlmeval_punctuation(text: str) -> str:
    """VLMEvalKit's punctuation step: per listed character, delete it if that character is next to a space in the
    text (or the text holds a digit-comma-digit), else turn it into a space; then drop periods outside numbers.
    """
    digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _VLMEVAL_PUNCT:
        delete = digit_comma or f"{p} " in text or f" {p}" in text
        out = out.replace(p, "" if delete else " ")
    return _PERIOD_NOT_IN_NUMBER.sub("", out, count=_VLMEVAL_PERIODS_REMOVED)


def parse_vlmeval(text: str) -> str:
    """VLMEvalKit's exact-matching yes/no extraction (no judge model): lowercase, its punctuation step, split on
    whitespace; exactly one of the words "yes" and "no" gives that answer, both or neither give unknown. Markdown
    and quotes stay attached ("**yes**", "'yes'", "yes:" are unknown), while "-" and "," become spaces when they
    touch no space ("no-one" reads as "no one", "yes,there" as "yes there").
    """
    words = _vlmeval_punctuation(text.lower()).split()
    has_yes, has_no = "yes" in words, "no" in words
    if has_yes != has_no:
        return "yes" if has_yes else "no"
    return "unknown"


@dataclass(frozen=True)
class MetricConvention:
    """How a peer turns parsed answers into metrics, where peers disagree.

    ``unknown_on_yes``: ``"miss"`` counts an unknown answer to a "yes" question as a false negative (official POPE,
    VLMEvalKit, ours); ``"left_out"`` leaves it out of recall (lmms-eval counts only answers that are exactly "no").
    ``label_yes_ratio``: also report the peer's yes ratio computed from labels (lmms-eval's, a bug: it is the share
    of "yes" questions, 0.5 on POPE whatever the model says) as ``yes_ratio_labels``, beside our ``yes_ratio``.
    """

    unknown_on_yes: str = "miss"
    label_yes_ratio: bool = False

    def __post_init__(self) -> None:
        if self.unknown_on_yes not in ("miss", "left_out"):
            raise ValueError(f"unknown_on_yes is {self.unknown_on_yes!r}; use 'miss' or 'left_out'")


OWN_CONVENTION = MetricConvention()


@dataclass(frozen=True)
class PopeParser:
    """A named answer parser: its rule, whether the rule reads the label, and its peer's metric convention."""

    rule: Callable[..., str]
    needs_label: bool = False
    convention: MetricConvention = OWN_CONVENTION

    def __call__(self, text: str, label: str | None = None) -> str:
        return self.rule(text, label) if self.needs_label else self.rule(text)


PARSERS: dict[str, PopeParser] = {
    "pope": PopeParser(parse_pope),
    "vcd": PopeParser(parse_vcd, needs_label=True),
    "lmms": PopeParser(parse_lmms, convention=MetricConvention(unknown_on_yes="left_out", label_yes_ratio=True)),
    "vlmeval": PopeParser(parse_vlmeval),
    "words": PopeParser(parse_words),
}
DEFAULT_PARSER = "pope"


def get_parser(parser: str) -> PopeParser:
    """The `PopeParser` named ``parser``, or a ValueError that lists the names."""
    if parser not in PARSERS:
        raise ValueError(f"unknown POPE answer parser {parser!r}; choose one of {closest_first(parser, PARSERS)}")
    return PARSERS[parser]


def parse_answer(text: str, parser: str = DEFAULT_PARSER, label: str | None = None) -> str:
    """``"yes"`` / ``"no"`` / ``"unknown"`` for one generated answer, with the named parser from `PARSERS`.

    ``label`` (the question's "yes"/"no") is needed only by parsers whose peer decides by it (``vcd``).
    """
    spec = get_parser(parser)
    if not isinstance(text, str):
        raise TypeError(f"answer must be a str (the decoded generation), got {type(text).__name__}")
    if spec.needs_label and label not in ("yes", "no"):
        raise ValueError(
            f"the {parser!r} parser decides by the question's label (as its peer does); pass label='yes' or 'no', "
            f"got {label!r}"
        )
    return spec(text, label)
