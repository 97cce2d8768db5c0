"""Typed fields: the valid range of a number, a field's doc, and reading a mapping into a dataclass.

A dataclass field says all about its key in one place: its type (`Literal[...]` for choices), its
range (`Annotated[int, Range(...)]`), its default and its doc (the string right below it). `from_mapping`
checks every key and value against them, so a typo or a value out of range is one ConfigError that
names the key.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import math
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pretrain.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric field: finite, at least `low` and at most `high` (or below them when open)."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # true: the value must be > low, not >= low
    high_open: bool = False  # true: the value must be < high, not <= high

    def check(self, dotted: str, value: int | float) -> None:
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if not math.isfinite(value):
            raise ConfigError(f"{dotted}: must be a finite number {self.describe()}".rstrip() + f", got {value!r}")
        if too_low or too_high:
            raise ConfigError(f"{dotted}: must be {self.describe()}, got {value!r}")

    def describe(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high == INT64_MAX:  # the cap every integer has: said only as an aside
            return f"{'>' if self.low_open else '>='} {low} (and at most 2**63 - 1)"
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {high}"
        return ""


def _number(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else f"{x:g}" if x is not None else ""


@dataclass(frozen=True)
class NotEmpty:
    """A text field that must not be empty (a path, a name)."""

    def check(self, dotted: str, value: str) -> None:
        if not value.strip():
            raise ConfigError(f"{dotted}: must not be empty")


INT64_MAX = 2**63 - 1  # every integer ends up in a torch or numpy int64 somewhere
FINITE = Range()  # any finite number
POSITIVE = Range(low=0, low_open=True)  # finite and > 0
NON_NEGATIVE = Range(low=0)
AT_LEAST_1 = Range(low=1, high=INT64_MAX)
COUNT = Range(low=0, high=INT64_MAX)  # an integer >= 0
FRACTION = Range(low=0, high=1)
BETA = Range(low=0, high=1, high_open=True)  # torch.optim.AdamW accepts 0 <= beta < 1
SEED = Range(low=0, high=2**32 - 1)  # numpy's and Python's seeds (set_seed seeds both)

Text = Annotated[str, NotEmpty()]


def field_docs(cls: type) -> dict[str, str]:
    """{field name: its doc} of dataclass `cls`: the string right below each field, on one line."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {node.target.id: " ".join(doc.value.value.split()) for node, doc in itertools.pairwise(body)
            if isinstance(node, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
            and isinstance(doc.value.value, str)}


def from_mapping(cls: type, raw: Any, prefix: str) -> Any:
    """Turn a mapping into dataclass `cls`, checking every key, value type and annotated range (and, in the
    dataclass's `__post_init__`, the checks beyond one value)."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls, include_extras=True)  # with the Annotated checks
    names = {f.name for f in dataclasses.fields(cls)}
    extra = getattr(cls, "EXTRA_KEYS", None)  # an open section: its keys that are not fields go into this one
    if extra is not None:
        named = names - {extra}
        raw = {**{k: v for k, v in raw.items() if k in named}, extra: {k: v for k, v in raw.items() if k not in named}}
    replaced = getattr(cls, "REPLACED_KEYS", {})  # keys of earlier versions: say what to write instead
    kwargs = {}
    for key, value in raw.items():
        if isinstance(key, str) and key in replaced:
            raise ConfigError(f"{prefix}{key}: {replaced[key]}")
        if not isinstance(key, str) or key not in names:
            valid = ", ".join(sorted(names))
            raise ConfigError(f"{prefix}{key}: unknown key in {where}; valid keys are: {valid}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_mapping(hint, value, f"{prefix}{key}.")
        elif _list_item_class(hint) is not None and isinstance(value, list):
            item_cls = _list_item_class(hint)
            kwargs[key] = [from_mapping(item_cls, item, f"{prefix}{key}[{i}].") for i, item in enumerate(value)]
        else:
            kwargs[key] = _check_type(f"{prefix}{key}", value, hint)
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{f.name}: required in {where}")
    return cls(**kwargs)


def _list_item_class(hint: Any) -> type | None:
    """The dataclass X of a `list[X] | None` field, else None."""
    for kind in typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,):
        if typing.get_origin(kind) is list and dataclasses.is_dataclass(typing.get_args(kind)[0]):
            return typing.get_args(kind)[0]
    return None


def _check_type(dotted: str, value: Any, hint: Any) -> Any:
    """Return `value` if it fits `hint` (int, float, bool, str, dict, Literal choices, or X | None; ints pass as
    floats) and the checks annotated on it (Range, NotEmpty)."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    mixed = len([k for k in allowed if k is not type(None)]) > 1  # e.g. an int or "auto"
    for annotated in allowed:
        kind, checks = annotated, ()
        if typing.get_origin(annotated) is Annotated:
            kind, *checks = typing.get_args(annotated)
        if typing.get_origin(kind) is list and isinstance(value, list):  # e.g. a list of choices: each item checked
            return [_check_type(f"{dotted}[{i}]", item, typing.get_args(kind)[0]) for i, item in enumerate(value)]
        checked = _as_kind(value, kind)
        if checked is _NO_MATCH:
            continue
        if typing.get_origin(kind) is Literal and checked not in typing.get_args(kind):
            if mixed:  # said below, with the other kinds
                continue
            raise ConfigError(f"{dotted}: {checked!r} is not one of {', '.join(typing.get_args(kind))}")
        for check in checks if checked is not None else ():
            check.check(dotted, checked)
        return checked
    names = " or ".join(_kind_name(kind, choices=mixed) for kind in allowed)
    hint = ' (YAML reads bare no/yes/on/off as booleans: quote it, e.g. "no")' if isinstance(value, bool) else ""
    raise ConfigError(f"{dotted}: expected {names}, got {type(value).__name__} {value!r}{hint}")


def _kind_name(kind: Any, *, choices: bool) -> str:
    """'null', 'int', ... ; a Literal's choices ('auto') when `choices`, else their type ('str')."""
    if kind is type(None):
        return "null"
    if choices and typing.get_origin(kind) is Literal:
        return " or ".join(typing.get_args(kind))
    return getattr(_base(kind), "__name__", str(kind))


_NO_MATCH = object()


def _as_kind(value: Any, kind: Any) -> Any:
    """`value` as `kind` (an int passes as a float; a Literal's choice as the choices' type), or _NO_MATCH."""
    if typing.get_origin(kind) is Literal:  # which choice is checked by the caller, to name the choices
        return _as_kind(value, _base(kind))
    if kind is type(None) and value is None:
        return None
    if typing.get_origin(kind) is dict and isinstance(value, dict):
        return value
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer too large for a float
            return math.inf
    if kind is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is str and isinstance(value, str):
        return value
    return _NO_MATCH


def _base(kind: Any) -> Any:
    """The plain type of an `Annotated[X, ...]` (X) or of a `Literal` of choices (their type)."""
    if typing.get_origin(kind) is Literal:
        return type(typing.get_args(kind)[0])
    return typing.get_args(kind)[0] if typing.get_origin(kind) is Annotated else kind
