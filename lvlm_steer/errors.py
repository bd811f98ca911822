"""Exceptions with messages that name the fix.

Every error a user can trigger by passing bad input derives from `SteeringError`, so a caller can catch
them all, and each message says what was wrong, what is allowed, and what to do next.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SteeringError(Exception):
    """Base class of every error this package raises on bad input."""


class UnsupportedModelError(SteeringError, TypeError):
    """The model's architecture has no adapter."""


class MethodConfigError(SteeringError, ValueError):
    """A method parameter is out of range for the method or for this model."""


class MethodSpecError(SteeringError, ValueError):
    """A CLI method spec such as ``ablate:heads=14.3`` could not be parsed."""


class ConflictError(SteeringError, ValueError):
    """Two methods would edit the same thing, or the model is already steered."""


class MissingImagesError(SteeringError, ValueError):
    """A method that acts on image tokens got a batch row without any."""


def closest_first(choice: str, valid: Iterable[str]) -> list[str]:
    """Order ``valid`` so that the entries closest to ``choice`` come first (for 'did you mean' lists)."""
    valid = list(valid)
    close = difflib.get_close_matches(choice, valid, n=len(valid), cutoff=0.0)
    return close + [v for v in valid if v not in close]
