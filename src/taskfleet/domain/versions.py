"""Debian package versions: their syntax and their order, as dpkg defines them.

Contract: ``valid_version(text)`` says whether ``text`` is a Debian version
(``[EPOCH:]UPSTREAM[-REVISION]``, deb-version(7)); ``compare(a, b)`` orders two
valid versions exactly as ``dpkg --compare-versions`` does (negative, zero or
positive): epochs numerically, then upstream and revision each by dpkg's
algorithm, where runs of non-digits compare letter before non-letter, ``~``
before anything (even the end), and runs of digits compare numerically.

Pure Python (no python-debian: it is not installed here and the algorithm is
thirty lines); tests check it against dpkg's own rules and, where dpkg is
present, against ``dpkg --compare-versions``.
"""

from __future__ import annotations

import re

# deb-version(7): upstream starts with a digit; may hold . + ~ - (- only with a
# revision) and : (only with an epoch). Revision: alphanumerics and + . ~
_VERSION = re.compile(
    r"(?:(?P<epoch>[0-9]+):)?"
    r"(?P<upstream>[0-9][A-Za-z0-9.+~:-]*?)"
    r"(?:-(?P<revision>[A-Za-z0-9.+~]+))?"
)
MAX_VERSION_CHARS = 256  # longest version taken (the longest in Debian is about 80)


def _split(version: str) -> tuple[int, str, str]:
    epoch, sep, rest = version.partition(":")
    if not sep:
        epoch, rest = "0", version
    upstream, dash, revision = rest.rpartition("-")
    if not dash:
        upstream, revision = rest, ""
    return int(epoch), upstream, revision


def valid_version(version: str) -> bool:
    """Whether ``version`` is a Debian version (the syntax of deb-version(7))."""
    if not 0 < len(version) <= MAX_VERSION_CHARS or not version.isascii():
        return False
    m = _VERSION.fullmatch(version)
    if m is None:
        return False
    upstream = m.group("upstream")
    if ":" in upstream and m.group("epoch") is None:
        return False
    return not ("-" in upstream and m.group("revision") is None)


def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isdigit():
        return 0
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _compare_part(a: str, b: str) -> int:
    """dpkg's verrevcmp: alternate non-digit and digit runs."""
    i = j = 0
    while i < len(a) or j < len(b):
        first_diff = 0
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _order(a[i]) if i < len(a) else 0
            bc = _order(b[j]) if j < len(b) else 0
            if ac != bc:
                return ac - bc
            i += 1
            j += 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        while i < len(a) and a[i].isdigit() and j < len(b) and b[j].isdigit():
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if i < len(a) and a[i].isdigit():
            return 1
        if j < len(b) and b[j].isdigit():
            return -1
        if first_diff:
            return first_diff
    return 0


def compare(a: str, b: str) -> int:
    """Negative if ``a`` sorts before ``b``, zero if equal, positive after (dpkg's order)."""
    ea, ua, ra = _split(a)
    eb, ub, rb = _split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _compare_part(ua, ub) or _compare_part(ra, rb)


OPERATORS = ("<=", ">=", "<", ">", "=")


def satisfies(version: str, op: str, wanted: str) -> bool:
    """Whether ``version OP wanted`` holds (OP one of ``OPERATORS``)."""
    c = compare(version, wanted)
    return {"<": c < 0, "<=": c <= 0, "=": c == 0, ">=": c >= 0, ">": c > 0}[op]
