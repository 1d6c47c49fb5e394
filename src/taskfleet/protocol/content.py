"""Content by hash on the wire: what the server, relays and agents agree on (pure).

Contract:

* A content hash is the SHA-256 of the bytes in 64 lowercase hex digits
  (``valid_sha256``); paths are ``protocol.jobs.CONTENT_PATH`` (agents) and
  ``RELAY_CONTENT_PATH`` (relays) + the hash.
* An upload may state the hash it expects in ``SHA256_HEADER``; the server refuses
  (400, nothing stored) bytes whose hash differs.
* Fetches answer ``Range: bytes=N-`` (and ``bytes=N-M``) with 206 and
  ``Content-Range: bytes N-M/SIZE``; a first byte at or beyond the size is 416 with
  ``Content-Range: bytes */SIZE``. Any other Range (several ranges, suffixes,
  another unit, garbage) is ignored and the whole content is sent (200), as RFC 9110
  allows: a client that resumes checks the status before it appends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SHA256_HEADER = "X-Content-SHA256"
_HEX = frozenset("0123456789abcdef")


def valid_sha256(value: Any) -> bool:
    """Whether ``value`` is a content hash as the wire carries it (64 lowercase hex)."""
    return isinstance(value, str) and len(value) == 64 and not set(value) - _HEX


@dataclass(frozen=True)
class Span:
    """What a fetch answers: bytes ``start``..``end`` (inclusive) of ``size``, and
    whether that is a part (206) or all of it (200). ``unsatisfiable``: 416."""

    start: int
    end: int
    size: int
    partial: bool
    unsatisfiable: bool = False

    @property
    def length(self) -> int:
        return max(0, self.end - self.start + 1)

    @property
    def status(self) -> int:
        return 416 if self.unsatisfiable else 206 if self.partial else 200

    def headers(self) -> dict[str, str]:
        """The response headers that describe this span (besides the content type)."""
        if self.unsatisfiable:
            return {"content-range": f"bytes */{self.size}", "content-length": "0"}
        out = {"accept-ranges": "bytes", "content-length": str(self.length)}
        if self.partial:
            out["content-range"] = f"bytes {self.start}-{self.end}/{self.size}"
        return out


def span(range_header: str | None, size: int) -> Span:
    """The span a request's ``Range`` header asks of content of ``size`` bytes."""
    whole = Span(0, size - 1, size, partial=False)
    if not range_header:
        return whole
    unit, _, spec = range_header.strip().partition("=")
    first, dash, last = spec.strip().partition("-")
    if unit.strip().lower() != "bytes" or not dash or not first.isdigit() or "," in spec:
        return whole
    if last and not last.isdigit():
        return whole
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size:
        return Span(start, start - 1, size, partial=True, unsatisfiable=True)
    if end < start:
        return whole
    return Span(start, end, size, partial=True)
