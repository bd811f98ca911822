"""The method registry and the CLI spec parser.

Methods register under a short name so that ``ablate:heads=14.3,14.5,mode=mean`` parses into
``AblateHeads({14: [3, 5]}, mode="mean")``. Values may contain commas (head lists): a comma-separated
piece without ``=`` continues the previous parameter's value.
"""

from __future__ import annotations

from lvlm_steer.errors import MethodSpecError, closest_first
from lvlm_steer.method import Method

_METHODS: dict[str, type[Method]] = {}

NO_METHOD = "none"


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` reachable by ``cls.name`` from specs and the CLI."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a class attribute 'name' to be registered")
    other = _METHODS.get(cls.name)
    if other is not None and other is not cls:
        raise TypeError(f"method name {cls.name!r} is taken by {other.__name__}")
    _METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    try:
        return _METHODS[name]
    except KeyError:
        valid = closest_first(name, [*_METHODS, NO_METHOD])
        raise MethodSpecError(
            f"unknown method {name!r}; valid methods: {', '.join(valid)} (see `lvlm-steer methods`)"
        ) from None


def split_params(text: str) -> dict[str, str]:
    """``"heads=14.3,14.5,mode=mean"`` -> ``{"heads": "14.3,14.5", "mode": "mean"}``."""
    params: dict[str, str] = {}
    last: str | None = None
    for piece in text.split(","):
        if not piece.strip():
            continue
        if "=" in piece:
            key, _, value = piece.partition("=")
            key = key.strip()
            if key in params:
                raise MethodSpecError(f"parameter {key!r} given twice in {text!r}")
            params[key] = value.strip()
            last = key
        elif last is None:
            raise MethodSpecError(f"expected key=value in {text!r}, got {piece!r}")
        else:
            params[last] += "," + piece.strip()
    return params


def parse_spec(spec: str) -> Method | None:
    """Build a method from its CLI spec; ``"none"`` means no method and returns None."""
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if name == NO_METHOD:
        if rest.strip():
            raise MethodSpecError(f"'none' takes no parameters, got {spec!r}")
        return None
    return method_class(name).from_params(split_params(rest))


def parse_specs(specs: list[str]) -> list[Method]:
    """Parse several specs, dropping ``none``."""
    return [m for m in (parse_spec(s) for s in specs) if m is not None]
