"""The audit log's pure rules: outcomes, filter values, the export formats, the bound on
entries by unknown callers (docs/audit.md).

Contract: :func:`parse_when` turns epoch seconds or an ISO 8601 time (no zone: UTC)
into epoch seconds, or raises ValueError saying what it takes; :func:`filter_text`
refuses a filter value with control characters or over its length. :func:`csv_header`
and :func:`csv_line` write one RFC 4180 line each, every text cell that a spreadsheet
would run as a formula (starting with ``= + - @``, a tab or a carriage return)
prefixed with a single quote, ``detail`` as a JSON column; :func:`jsonl_line` writes
one JSON object per line. Both write valid UTF-8 whatever the text holds (a lone
surrogate becomes U+FFFD). :class:`UnknownLimiter` lets at most ``limit`` entries by
an unknown caller through per window and counts the rest. No I/O here.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

OUTCOMES = ("ok", "refused", "failed")
# The columns of an export, in order (the API's rows have the same keys).
COLUMNS = ("id", "at", "actor", "address", "action", "object", "outcome", "detail")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def parse_when(text: str, lo: float, hi: float) -> float:
    """Epoch seconds or an ISO 8601 time (``2026-11-30T15:00``, no zone: UTC) within
    ``[lo, hi]``; ValueError otherwise."""
    value = text.strip()
    at: float | None = None
    try:
        at = float(value)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(
                f"{text!r} is not a time: give epoch seconds or an ISO 8601 time "
                "such as 2026-11-30T15:00:00Z"
            ) from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        try:
            at = parsed.timestamp()
        except (OverflowError, OSError, ValueError):
            at = math.nan
    if not lo <= at <= hi:  # False for NaN too
        raise ValueError(f"{text!r} is out of range: a time between 1970 and 2100")
    return at


def filter_text(name: str, value: str, max_len: int) -> str:
    """``value`` as a filter, or ValueError: no control characters (NUL ...), bounded."""
    if len(value) > max_len:
        raise ValueError(f"{name}: at most {max_len} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError(f"{name}: must not contain control characters")
    return value


def clean_text(text: str) -> str:
    """``text`` encodable as UTF-8: each lone surrogate becomes U+FFFD."""
    try:
        text.encode()
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def csv_cell(value: Any) -> str:
    """One CSV cell: text a spreadsheet would run as a formula gets a leading quote."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        text = str(int(value)) if abs(value) < 2**53 else repr(value)
    else:
        text = clean_text(str(value))
    if text.startswith(_FORMULA_START):
        return "'" + text
    return text


def iso(at: float) -> str:
    """``at`` as ISO 8601 in UTC with milliseconds (``2026-11-30T15:00:00.123Z``)."""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _line(cells: list[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow(cells)
    return out.getvalue()


def csv_header() -> str:
    return _line(list(COLUMNS))


def csv_line(row: dict[str, Any]) -> str:
    """One entry as a CSV line: ``at`` as ISO 8601 UTC, ``detail`` as JSON."""
    cells = []
    for name in COLUMNS:
        value = row.get(name)
        if name == "at" and isinstance(value, (int, float)):
            value = iso(float(value))
        elif name == "detail":
            value = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
        cells.append(csv_cell(value))
    return _line(cells)


def jsonl_line(row: dict[str, Any]) -> str:
    """One entry as one line of JSON (every key of :data:`COLUMNS`)."""
    text = json.dumps({k: row.get(k) for k in COLUMNS}, ensure_ascii=False, default=str)
    return clean_text(text) + "\n"


class UnknownLimiter:
    """At most ``limit`` entries per ``window`` seconds; the rest are counted."""

    def __init__(self, clock: Callable[[], float], limit: int, window: float) -> None:
        self._clock = clock
        self._limit = limit
        self._window = window
        self._start = -math.inf
        self._used = 0
        self.dropped = 0  # entries not written since the last one that was

    def take(self) -> int | None:
        """None: do not write this one (counted). Else how many were dropped before it."""
        now = self._clock()
        if now - self._start >= self._window:
            self._start, self._used = now, 0
        if self._used >= self._limit:
            self.dropped += 1
            return None
        self._used += 1
        dropped, self.dropped = self.dropped, 0
        return dropped
