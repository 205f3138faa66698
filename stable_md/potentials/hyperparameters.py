"""What each architecture hyperparameter may be, checked before a backbone is built.

Each backbone module declares ``HYPERPARAMETER_RULES`` (name -> rule) next to its
``DEFAULT_HYPERPARAMETERS``; :func:`check_hyperparameters` applies them and names the first bad value
with what was expected. Without it, ``cutoff=-1`` built a model whose forces were exactly zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Number:
    """A finite real number (Å, Å^-2, ... as the backbone documents), above ``minimum`` (or at it, if allowed)."""

    minimum: float = 0.0
    inclusive: bool = False

    def problem(self, value: Any) -> Optional[str]:
        if (not _is_number(value) or not math.isfinite(value) or value < self.minimum
                or (value == self.minimum and not self.inclusive)):
            return f"a finite number {self.expected()}"
        return None

    def expected(self) -> str:
        return f"{'>=' if self.inclusive else '>'} {self.minimum:g}"


@dataclass(frozen=True)
class Integer:
    """A whole number of at least ``minimum`` (a count, an order)."""

    minimum: int = 1

    def problem(self, value: Any) -> Optional[str]:
        if not (isinstance(value, int) and not isinstance(value, bool)) or value < self.minimum:
            return f"a whole number >= {self.minimum}"
        return None


@dataclass(frozen=True)
class Flag:
    def problem(self, value: Any) -> Optional[str]:
        return None if isinstance(value, bool) else "true or false"


@dataclass(frozen=True)
class Choice:
    options: tuple

    def problem(self, value: Any) -> Optional[str]:
        return None if value in self.options else f"one of {list(self.options)}"


@dataclass(frozen=True)
class Text:
    """A non-empty string the backbone's own library parses (e3nn irreps, a class name)."""

    def problem(self, value: Any) -> Optional[str]:
        return None if isinstance(value, str) and value.strip() else "a non-empty string"


@dataclass(frozen=True)
class Widths:
    """A non-empty list of layer widths (whole numbers >= 1)."""

    def problem(self, value: Any) -> Optional[str]:
        good = (isinstance(value, (list, tuple)) and len(value) > 0
                and all(Integer(1).problem(width) is None for width in value))
        return None if good else "a non-empty list of whole numbers >= 1, e.g. [64, 64]"


@dataclass(frozen=True)
class WidthsByElement:
    """``{element symbol: widths}``, e.g. ``{"H": [160, 128, 96]}``."""

    def problem(self, value: Any) -> Optional[str]:
        good = isinstance(value, dict) and all(isinstance(k, str) and Widths().problem(v) is None
                                               for k, v in value.items())
        return None if good else 'a mapping from element symbols to lists of widths, e.g. {"H": [160, 128, 96]}'


POSITIVE = Number()
NON_NEGATIVE = Number(inclusive=True)
COUNT = Integer(1)
ORDER = Integer(0)


def check_hyperparameters(arch: str, values: dict[str, Any], rules: dict[str, Any],
                          names: Sequence[str] = ()) -> None:
    """Raise ValueError naming the first hyperparameter of ``values`` that breaks its rule; ``names`` (those the
    user set) are checked first so that the message points at what they typed."""
    order = list(names) + [name for name in values if name not in names]
    for name in order:
        rule = rules.get(name)
        if rule is None:
            continue
        problem = rule.problem(values[name])
        if problem is not None:
            raise ValueError(f"hyperparameter {name} of architecture {arch!r} must be {problem}; "
                             f"got {values[name]!r}")
