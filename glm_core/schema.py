"""Type and range of every configuration value, declared once beside its field.

A configuration dataclass (``GLMConfig``, the training sections) declares each field
with :func:`spec` and a :class:`Rule`; :func:`check_fields` (called from the class's
``__post_init__``) checks every value against its rule, and :func:`from_mapping` builds
the class from a file's mapping. So a value is checked where it enters, however it got
there (a file, a converter, a preset override, Python code), and every refusal has the
same shape: the field, the value and what was expected::

    config.json: max_position_embeddings=0: expected an integer >= 1

The command line uses the same rules for its options (``glm_runtime.cli.common.arg``).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import reprlib
from dataclasses import MISSING, dataclass

from .errors import GLMError

INT64 = (-(2**63), 2**63 - 1)  # what a torch.long, a seed or a token id can hold


@dataclass(frozen=True)
class Rule:
    """What a value must be: its kind (``int``, ``float``, ``bool``, ``str`` or ``ids``, a
    list of integers), an optional range (``lo``/``hi``, each inclusive unless ``*_open``)
    or set of ``choices``, and whether ``None`` is allowed. Numbers must be finite."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple | None = None
    optional: bool = False

    def expected(self) -> str:
        """The rule in words, as error messages state it."""
        if self.choices is not None:
            words = "one of " + ", ".join(map(str, self.choices))
        else:
            words = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string",
                     "ids": "a list of integers"}[self.kind]
            if self.kind == "ids":
                words += f", each {self._range_words()}" if self._range_words() else ""
            else:
                words += f" {self._range_words()}" if self._range_words() else ""
        return words + (" (or null)" if self.optional else "")

    def _range_words(self) -> str:
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            if self.kind in ("int", "ids") and not self.lo_open and not self.hi_open:
                return f"in [{lo}, {hi}]"
            return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if lo is not None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        if hi is not None:
            return f"{'<' if self.hi_open else '<='} {hi}"
        return ""

    def _in_range(self, v) -> bool:
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return not (self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)))

    def check(self, name: str, value, source=None, what: str | None = None):
        """``value`` in its normal form (an int given for a float becomes a float; a single
        integer given for ``ids`` becomes a one-element list), or a one-line GLMError."""
        def bad():
            raise GLMError(f"{what + ': ' if what else ''}{name}={shown(value)}: expected {self.expected()}", source)

        if value is None:
            if not self.optional:
                bad()
            return None
        if self.choices is not None:
            typed = _is_int(value) if self.kind == "int" else isinstance(value, str)
            if not typed or value not in self.choices:
                bad()
            return value
        if self.kind == "bool":
            if not isinstance(value, bool):
                bad()
            return value
        if self.kind == "str":
            if not isinstance(value, str) or not value:
                bad()
            return value
        if self.kind == "ids":
            items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
            if not isinstance(items, (list, tuple)) or not all(_is_int(i) and self._in_range(i) for i in items):
                bad()
            return list(items)
        if self.kind == "int":
            if not _is_int(value) or not self._in_range(value):
                bad()
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            bad()
        try:
            v = float(value)
        except OverflowError:  # an int beyond a float's range
            bad()
        if not math.isfinite(v) or not self._in_range(v):
            bad()
        return v


_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 2, 60, 60, 40
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 4


def shown(value) -> str:
    """A user's value as a message quotes it: bounded, whatever its size or nesting (a YAML
    alias bomb's repr would never finish)."""
    return _SHOWN.repr(value)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and INT64[0] <= v <= INT64[1]


def arg_type(rule: Rule):
    """An argparse ``type=`` that reads a command-line word as ``rule``'s kind and checks it
    (``--top-p 1.5`` -> ``argument --top-p: 1.5: expected a finite number in (0, 1]``)."""
    def parse(text: str):
        try:
            value = {"int": int, "float": float, "str": str}[rule.kind](text)
            return rule.check("", value)
        except (ValueError, GLMError):
            raise argparse.ArgumentTypeError(f"{text}: expected {rule.expected()}") from None

    return parse


def integer(lo: int | None = None, hi: int | None = None, optional: bool = False) -> Rule:
    return Rule("int", lo, hi, optional=optional)


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
           optional: bool = False) -> Rule:
    return Rule("float", lo, hi, lo_open, hi_open, optional=optional)


def one_of(*choices, optional: bool = False) -> Rule:
    return Rule("str", choices=tuple(choices), optional=optional)


FLAG = Rule("bool")
TEXT = Rule("str")
OPTIONAL_TEXT = Rule("str", optional=True)


def spec(rule: Rule, default=MISSING, default_factory=MISSING):
    """A dataclass field checked by ``rule`` (see :func:`check_fields`)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"rule": rule})


def rule_of(cls, name: str) -> Rule:
    """The rule a dataclass declares for its field ``name``."""
    return next(f.metadata["rule"] for f in dataclasses.fields(cls) if f.name == name)


def check_fields(obj, what: str, source=None) -> None:
    """Check (and normalise) every field of ``obj`` that has a rule; call it from
    ``__post_init__`` before the cross-field rules."""
    for f in dataclasses.fields(obj):
        rule = f.metadata.get("rule")
        if rule is not None:
            object.__setattr__(obj, f.name, rule.check(f.name, getattr(obj, f.name), source, what))


def from_mapping(cls, d, what: str, source=None):
    """``cls(**d)`` for a mapping read from a file: unknown and missing fields are one-line
    errors naming them (an unknown one with the nearest known name), as is a value that is
    not a mapping."""
    if not isinstance(d, dict):
        raise GLMError(f"{what} must be a mapping of names to values, got {type(d).__name__}", source)
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    unknown = sorted(str(k)[:60] for k in d if k not in names)
    if unknown:
        near = difflib.get_close_matches(unknown[0], names, n=1)
        raise GLMError(f"unknown {what} field(s): {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
                       f"{f' (did you mean {near[0]}?)' if near else ''}", source)
    missing = [f.name for f in fields if f.default is MISSING and f.default_factory is MISSING and f.name not in d]
    if missing:
        raise GLMError(f"{what} lacks required field(s): {', '.join(missing)}", source)
    try:
        return cls(**d)
    except GLMError as e:
        if e.path is not None or source is None:
            raise
        raise GLMError(str(e), source) from None  # the class's own checks do not know the file
