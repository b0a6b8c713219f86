"""One validator for the YAML files civetta reads: a parsed mapping checked into a dataclass.

Experiment configs (`launch.config`) and hardware profiles (`launch.profiles`) are dataclasses
filled from YAML mappings. `Schema.build(cls, raw)` checks every key against the class's fields
and every value against its field's annotation (`bool`, `int`, `float`, `str`, `X | None`, or a
nested dataclass, read as a section whose keys are shown dotted) and against the schema's
constraints, and raises the schema's error class with one line: the dotted key, what was
expected and what was given.

The two kinds of file word a few errors differently (a config says "a positive number", a
profile "a number > 0"); that wording is part of each schema, so each keeps its messages.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")

# A check of its own for one key: (dotted key, value as written) → the value to store.
Check = Callable[[str, Any], Any]

# YAML 1.1 (PyYAML) reads 1e-3, which has no dot, as a string; accept what is plainly a number.
FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def describe(value: Any) -> str:
    """A value as an error message quotes it: `'ten' (str)`."""
    return f"{value!r} ({type(value).__name__})"


def did_you_mean(name: str, options: Collection[str], prefix: str = "") -> str:
    """` (did you mean 'train.steps'?)` for the closest option, or nothing."""
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # Annotations are strings under `from __future__ import annotations`; resolve them once.
    return typing.get_type_hints(cls)


def _split_optional(annotation: Any) -> tuple[Any, bool]:
    """`X | None` → (X, True); anything else → (it, False)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


@dataclass(frozen=True)
class Schema:
    """The rules of one kind of file and the words of its errors. Constraints are by dotted key
    (`train.lr`, `device.memory_gib`); keys without one are checked by type alone."""

    error: type[Exception]
    positive: Collection[str] = frozenset()
    non_negative: Collection[str] = frozenset()
    at_most: Mapping[str, float] = field(default_factory=dict)
    choices: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    # Keys checked by a function of their own instead of by their annotation's type.
    checks: Mapping[str, Check] = field(default_factory=dict)
    # What an absent key reads as (then checked like a given value), for fields without a
    # default that a file may leave out, or whose absence has a message of its own.
    absent: Mapping[str, Any] = field(default_factory=dict)
    # ---- wording
    unknown_in: str = ""  # after "unknown key 'k'": where, e.g. " in hardware profile"
    missing: str = "{key} is missing"  # a field without a default that is absent
    type_names: Mapping[str, str] = field(default_factory=dict)  # e.g. float → "a number"
    null: str | None = "null"  # how a null is quoted in "got ..."; None: like any other value
    positive_words: str = "a positive number"
    # Whether a constraint error quotes the value converted (0 → 0.0) or as it was written.
    quote_converted: bool = True

    def fail(self, message: str) -> NoReturn:
        raise self.error(message)

    def build(self, cls: type[T], raw: Any, prefix: str = "", origin: str = "") -> T:
        """`raw` checked into a `cls`. `prefix` (`train.`) is shown before every key; `origin`
        names the mapping in an error when there is no prefix (a file's path)."""
        if not isinstance(raw, dict):
            self.fail(f"{prefix.rstrip('.') or origin} expected a mapping, got {describe(raw)}")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        for name in raw:
            if name not in fields:
                hint = did_you_mean(str(name), list(fields), prefix)
                self.fail(f"unknown key '{prefix}{name}'{self.unknown_in}{hint}")
        values: dict[str, Any] = {}
        for name, f in fields.items():
            key = f"{prefix}{name}"
            if name in raw:
                values[name] = self.value(key, raw[name], _hints(cls)[name])
            elif key in self.absent:
                values[name] = self.value(key, self.absent[key], _hints(cls)[name])
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                self.fail(self.missing.format(key=key))
        return cls(**values)

    def value(self, key: str, value: Any, annotation: Any) -> Any:
        """One value checked by its key's check or annotation, then by its constraints."""
        if key in self.checks:
            converted = self.checks[key](key, value)
        else:
            converted = self._convert(key, value, annotation)
        if converted is not None:
            self._constrain(key, converted if self.quote_converted else value, converted)
        return converted

    def _convert(self, key: str, value: Any, annotation: Any) -> Any:
        base, optional = _split_optional(annotation)
        if value is None and optional:
            return None
        if isinstance(base, type) and dataclasses.is_dataclass(base):
            return self.build(base, value, prefix=f"{key}.")
        if base is bool:
            if isinstance(value, bool):
                return value
        elif base is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif base is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str) and FLOAT_TEXT.fullmatch(value.strip()):
                return float(value)
        elif base is str:
            if isinstance(value, str):
                return value
        else:
            raise TypeError(f"{key}: no rule for values of type {annotation!r}; give it a check")
        expected = self.type_names.get(base.__name__, base.__name__)
        given = self.null if value is None and self.null else describe(value)
        self.fail(f"{key} expected {expected}, got {given}")

    def _constrain(self, key: str, shown: Any, value: Any) -> None:
        if key in self.choices and value not in self.choices[key]:
            options = " | ".join(map(str, self.choices[key]))
            self.fail(f"{key} expected one of {options}, got {shown!r}")
        if key in self.positive and value <= 0:
            self.fail(f"{key} expected {self.positive_words}, got {shown!r}")
        if key in self.non_negative and value < 0:
            self.fail(f"{key} expected a number >= 0, got {shown!r}")
        if key in self.at_most and value > self.at_most[key]:
            self.fail(f"{key} expected a number <= {self.at_most[key]}, got {shown!r}")
