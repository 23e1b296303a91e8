"""Registry of attention kinds: a new kind is one module with a `@register`ed class.

`softmax` is not a class: it means the layer keeps its original attention.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from ..errors import PlanError
from ..plan import SOFTMAX, LayerSpec

KINDS: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator adding a `LinearizedAttention` subclass under its `kind` name."""
    KINDS[cls.kind] = cls
    return cls


def kind_names() -> list[str]:
    return [SOFTMAX, *sorted(KINDS)]


def kind_class(name: str) -> type:
    if name not in KINDS:
        raise PlanError(f"unknown attention kind {name!r}; known kinds: {', '.join(kind_names())}")
    return KINDS[name]


def _type_ok(value: Any, hint: Any) -> bool:
    if typing.get_origin(hint) is tuple:  # tuple[int, ...]: a list of whole numbers
        return isinstance(value, (list, tuple)) and all(_type_ok(x, typing.get_args(hint)[0]) for x in value)
    allowed = typing.get_args(hint) or (hint,)
    for t in allowed:
        if t is type(None) and value is None:
            return True
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t in (str, bool) and isinstance(value, t):
            return True
    return False


def _type_name(hint: Any) -> str:
    """'int', 'int or None', 'a list of int': how a user reads a type hint."""
    if typing.get_origin(hint) is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return " or ".join("None" if t is type(None) else t.__name__ for t in (typing.get_args(hint) or (hint,)))


def build_options(kind: str, options: dict[str, Any]) -> Any:
    """The kind's Options dataclass from user options; unknown names and bad values are PlanErrors."""
    cls = kind_class(kind).Options
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in options.items():
        if key not in names:
            raise PlanError(f"unknown option {key!r} for kind {kind!r}; valid options: {', '.join(names)}")
        if not _type_ok(value, hints[key]):
            raise PlanError(f"option {key}={value!r} of kind {kind!r} must be {_type_name(hints[key])}")
    opts = cls(**{k: float(v) if hints[k] is float else tuple(sorted(v)) if isinstance(v, (list, tuple)) else v
                  for k, v in options.items()})
    opts.check()
    return opts


def validate_spec(spec: LayerSpec) -> LayerSpec:
    """Check a spec's kind and options; returns it unchanged."""
    if spec.kind == SOFTMAX:
        if spec.options:
            raise PlanError(f"kind 'softmax' keeps the original layer and takes no options, got {dict(spec.options)}")
        return spec
    build_options(spec.kind, dict(spec.options))
    return spec


def full_options(spec: LayerSpec) -> dict[str, Any]:
    """Every option of a spec, defaults included: what a converted model's config records."""
    if spec.kind == SOFTMAX:
        return {}
    return dataclasses.asdict(build_options(spec.kind, dict(spec.options)))


# the kinds register themselves on import
from .gla import GLAAttention  # noqa: E402,F401
from .hedgehog import HedgehogAttention  # noqa: E402,F401
from .lizard import LizardAttention  # noqa: E402,F401
from .lolcats import LolcatsAttention  # noqa: E402,F401
from .mamba2 import Mamba2Attention  # noqa: E402,F401
from .streaming import StreamingAttention  # noqa: E402,F401
