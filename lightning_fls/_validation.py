"""Small argument checks that raise errors naming the argument and the accepted values."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def check_positive(name: str, value: Any) -> float:
    """Return ``value`` as a float after checking it is a finite number > 0.

    Args:
        name: Argument name used in the error message.
        value: The value to check.

    Returns:
        ``float(value)``.

    Raises:
        TypeError: If ``value`` is not a real number.
        ValueError: If ``value`` is not finite and strictly positive.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a positive number, got {value!r}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")
    return float(value)


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` after checking it is an integer >= 1.

    Args:
        name: Argument name used in the error message.
        value: The value to check.

    Returns:
        ``value`` as an ``int``.

    Raises:
        TypeError: If ``value`` is not an integer.
        ValueError: If ``value`` < 1.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an integer >= 1, got {value!r}.")
    if value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """Return ``value`` after checking it is one of ``choices``.

    Args:
        name: Argument name used in the error message.
        value: The value to check.
        choices: The accepted values.

    Returns:
        ``value``.

    Raises:
        ValueError: If ``value`` is not one of ``choices``.
    """
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"`{name}` must be one of {options}, got {value!r}.")
    return str(value)


def check_non_negative_int(name: str, value: Any) -> int:
    """Return ``value`` after checking it is an integer >= 0 (not a bool).

    Raises:
        ValueError: Naming ``name`` otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}.")
    return value


def check_sparsity(name: str, value: Any) -> float:
    """Return a sparsity in ``[0, 1)`` as float.

    Raises:
        TypeError: If ``value`` is not a number.
        ValueError: If it is outside ``[0, 1)``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number in [0, 1), got {value!r}.")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1), got {value!r}.")
    return float(value)


def check_patterns(name: str, value: Any) -> list[str] | None:
    """Return glob patterns as a list after checking they are a sequence of strings (or None).

    Args:
        name: Argument name used in the error message.
        value: None, or a list/tuple of strings.

    Returns:
        ``None`` or ``list(value)``.

    Raises:
        TypeError: If ``value`` is a bare string or holds something other than strings.
    """
    if value is None:
        return None
    if isinstance(value, str):
        raise TypeError(
            f"`{name}` must be a list of glob patterns, got the string {value!r} "
            f"(write [{value!r}])."
        )
    if not isinstance(value, Iterable) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"`{name}` must be a list of glob patterns (strings), got {value!r}.")
    return list(value)


def check_fraction(name: str, value: Any) -> float:
    """Return a fraction in ``(0, 1]`` as float.

    Raises:
        TypeError: If ``value`` is not a number.
        ValueError: If it is outside ``(0, 1]``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number in (0, 1], got {value!r}.")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"`{name}` must be in (0, 1], got {value!r}.")
    return float(value)
