"""The checks every wire message's fields go through (``exchange``, ``relay``, ``jobs``).

Contract: each ``*_field`` reads one key of a decoded JSON object and returns it, or
raises :class:`ProtocolError` naming the key and the rule it breaks: integers are
real ints (not bools or floats) within their column's range, numbers finite, text
within its limit and stored as ``clean_text`` makes it (``exchange``'s docstring
says why).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from typing import Any

from taskfleet.settings import INT64_MAX

NUL_SYMBOL = "\u2400"  # what a NUL in remote text is stored as (visible, one character)
_SURROGATE = re.compile("[\ud800-\udfff]")


class ProtocolError(ValueError):
    """A malformed or oversized exchange; the whole request is refused."""


def clean_text(value: str) -> str:
    """Remote text as it can be stored on every database (``exchange``'s docstring)."""
    if "\x00" in value:
        value = value.replace("\x00", NUL_SYMBOL)
    if not value.isascii() and _SURROGATE.search(value):
        value = _SURROGATE.sub("\ufffd", value)
    return value


def int_field(
    obj: dict[str, Any],
    key: str,
    *,
    minimum: int = 0,
    maximum: int = INT64_MAX,
    optional: bool = False,
) -> int | None:
    value = obj.get(key)
    if value is None and optional:
        return None
    if type(value) is not int or value < minimum:
        raise ProtocolError(f"{key!r} must be an integer >= {minimum}")
    if value > maximum:
        raise ProtocolError(f"{key!r} is {value}, the limit is {maximum}")
    return value


def num_field(obj: dict[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if type(value) not in (int, float):
        raise ProtocolError(f"{key!r} must be a number")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any double
        number = math.inf
    if not math.isfinite(number):
        raise ProtocolError(f"{key!r} must be a finite number")
    return number


def choice_field(obj: dict[str, Any], key: str, allowed: Collection[str]) -> str:
    """A text that must be one of ``allowed`` (any other value, a list or an object
    included, is refused: a set lookup of an unhashable value would raise TypeError)."""
    value = obj.get(key)
    if not isinstance(value, str) or value not in allowed:
        raise ProtocolError(f"{key!r} must be one of {sorted(allowed)}")
    return value


def str_field(obj: dict[str, Any], key: str, limit: int, *, clean: bool = True) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise ProtocolError(f"{key!r} must be a string")
    if len(value) > limit:
        raise ProtocolError(f"{key!r} is {len(value)} characters, the limit is {limit}")
    # Signed text is taken exactly as sent: changed, it would not verify.
    return clean_text(value) if clean else value
