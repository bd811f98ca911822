"""POPE (Li et al., EMNLP 2023): yes/no object-existence questions, answer parsers and metrics.

``load_questions`` reads the official files (or ``build_pope`` makes new ones from COCO annotations), a model answers
each question with `DEFAULT_PROMPT_SUFFIX` appended, ``parse_answer`` maps each answer to yes/no/unknown with a named
parser (``pope``, or the peers' rules ``vcd`` (which needs the question's label), ``lmms``, ``vlmeval``; ``words``
is ours), and ``pope_metrics`` / ``pope_report`` score them with that parser's metric convention.
"""

from .build import build_pope, question_text
from .data import (
    DEFAULT_PROMPT_SUFFIX,
    SPLITS,
    PopeDataError,
    PopeQuestion,
    PopeSet,
    file_sha256,
    load_questions,
    write_questions,
)
from .metrics import pope_metrics, pope_report
from .parse import DEFAULT_PARSER, PARSERS, MetricConvention, PopeParser, get_parser, parse_answer

__all__ = [
    "DEFAULT_PARSER",
    "DEFAULT_PROMPT_SUFFIX",
    "MetricConvention",
    "PARSERS",
    "SPLITS",
    "PopeDataError",
    "PopeParser",
    "PopeQuestion",
    "PopeSet",
    "build_pope",
    "file_sha256",
    "get_parser",
    "load_questions",
    "parse_answer",
    "pope_metrics",
    "pope_report",
    "question_text",
    "write_questions",
]
