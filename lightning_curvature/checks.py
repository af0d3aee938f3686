"""Argument checks shared by every layer: one form of message, raised at the earliest moment.

Every public constructor and engine entry point validates its arguments with these functions, so a
bad value fails where it is given, with a message of one form::

    `step_size` must be a finite number in (0, inf), got '1e-4' (str)

The exception is :class:`ArgumentError`, a subclass of both :class:`ValueError` and
:class:`TypeError`: callers that catch either keep working, and a wrong *type* (a string where a
number belongs, ``seed=1.5``, ``True`` for a count) is reported exactly like a wrong *value*.

This module imports nothing from the package (it sits below every layer) and nothing heavier than
``numbers``/``math``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

__all__ = [
    "ArgumentError",
    "check_bool",
    "check_choice",
    "check_float",
    "check_index_list",
    "check_int",
    "check_seed",
]

T = TypeVar("T")


class ArgumentError(ValueError, TypeError):
    """A public argument has the wrong type or value (message: "`name` must be …, got …")."""


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    if isinstance(value, (bool, int, float)) and not isinstance(value, bool):
        return text
    return f"{text} ({type(value).__name__})"


def _fail(name: str, requirement: str, value: Any) -> ArgumentError:
    return ArgumentError(f"`{name}` must be {requirement}, got {_show(value)}")


def _is_integer(value: Any) -> bool:
    # numbers.Integral covers int and numpy integers; bool is an int subclass but never a count.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    left = "(" if low_open or low == -math.inf else "["
    right = ")" if high_open or high == math.inf else "]"
    return f"{left}{_num(low)}, {_num(high)}{right}"


def _num(x: float) -> str:
    if x == math.inf:
        return "inf"
    if x == -math.inf:
        return "-inf"
    return f"{x:g}"


def check_int(
    name: str,
    value: Any,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    allow_none: bool = False,
) -> int | None:
    """Return ``value`` as ``int`` if it is an integer in ``[minimum, maximum]``.

    ``bool`` and integral floats (``2.0``) are refused: a count is written as an integer.
    """
    if value is None and allow_none:
        return None
    ok = _is_integer(value)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        if minimum is not None and maximum is not None:
            need = f"an integer in [{minimum}, {maximum}]"
        elif minimum is not None:
            need = f"an integer >= {minimum}"
        elif maximum is not None:
            need = f"an integer <= {maximum}"
        else:
            need = "an integer"
        raise _fail(name, need + (" or None" if allow_none else ""), value)
    return int(value)


def check_float(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
    allow_inf: bool = False,
) -> float | None:
    """Return ``value`` as ``float`` if it is a real number in the interval (NaN never is).

    ``allow_inf`` admits ``+inf``/``-inf`` when the interval contains them (e.g. "no limit").
    """
    if value is None and allow_none:
        return None
    ok = _is_real(value)
    if ok:
        v = float(value)
        ok = not math.isnan(v) and (allow_inf or math.isfinite(v))
        ok = ok and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        kind = "a number" if allow_inf else "a finite number"
        need = f"{kind} in {_interval(low, high, low_open, high_open)}"
        raise _fail(name, need + (" or None" if allow_none else ""), value)
    return float(value)


def check_bool(name: str, value: Any, *, allow_none: bool = False) -> bool | None:
    """Return ``value`` if it is a ``bool`` (``0``/``1`` and strings are refused)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        raise _fail(name, "True or False" + (" or None" if allow_none else ""), value)
    return value


def check_choice(name: str, value: Any, choices: Iterable[T]) -> T:
    """Return ``value`` if it is one of ``choices`` (compared with ``==``)."""
    options = list(choices)
    if value not in options:
        raise _fail(name, "one of " + ", ".join(repr(c) for c in options), value)
    return value


def check_seed(name: str, value: Any) -> int:
    """Return ``value`` if it is a non-negative integer usable as a ``torch.Generator`` seed."""
    return check_int(name, value, minimum=0, maximum=2**63 - 1)  # type: ignore[return-value]


def check_index_list(
    name: str,
    value: Any,
    *,
    minimum: int = 0,
    maximum: int | None = None,
    allow_none: bool = False,
    unique: bool = True,
) -> list[int] | None:
    """Return ``value`` as a non-empty list of integers in ``[minimum, maximum]``."""
    if value is None and allow_none:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        raise _fail(name, "a non-empty sequence of integers", value)
    out = [
        check_int(f"{name}[{i}]", v, minimum=minimum, maximum=maximum)
        for i, v in enumerate(value)
    ]
    if unique and len(set(out)) != len(out):
        raise _fail(name, "a sequence of distinct integers", value)
    return out  # type: ignore[return-value]
