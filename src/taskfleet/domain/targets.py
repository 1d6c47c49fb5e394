"""Target specifications: which computers a request is aimed at (SPEC 7).

Contract: ``parse_target`` turns ``all``, ``group:NAME``, ``tag:KEY=VALUE``,
``computer:ID[,ID...]``, ``package:NAME[OP VERSION]`` (installed, at a version
that satisfies ``OP`` in Debian's order: ``<``, ``<=``, ``=``, ``>=``, ``>``) or
``os:ID[-VERSION]`` (os-release's ID and VERSION_ID: ``os:debian-12``) into a
:class:`Target`, or raises :class:`TargetError` with a message that says what
is wrong. Resolution against the fleet happens in
the store; an unknown group or tag is an error there, never an empty success.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from taskfleet.domain.versions import OPERATORS, valid_version
from taskfleet.settings import MAX_ID, TAG_VALUE_MAX

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_TAG_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,63}$")
_PACKAGE = re.compile(
    r"(?P<name>[a-z0-9][a-z0-9+.\-]{0,127})(?:(?P<op><=|>=|<|>|=)(?P<version>.+))?"
)
_OS = re.compile(
    r"(?P<id>[a-z0-9][a-z0-9._\-]{0,63}?)(?:-(?P<version>[0-9][A-Za-z0-9._~\-]{0,63}))?"
)


class TargetKind(enum.StrEnum):
    ALL = "all"
    GROUP = "group"
    TAG = "tag"
    COMPUTER = "computer"
    PACKAGE = "package"
    OS = "os"


class TargetError(ValueError):
    pass


@dataclass(frozen=True)
class Target:
    kind: TargetKind
    name: str = ""  # group name, tag key, package name or OS id
    value: str = ""  # tag value, package version or OS version ("": any)
    computer_ids: tuple[int, ...] = ()
    op: str = ""  # package: the version comparison ("": installed at any version)

    def __str__(self) -> str:
        if self.kind is TargetKind.ALL:
            return "all"
        if self.kind is TargetKind.GROUP:
            return f"group:{self.name}"
        if self.kind is TargetKind.TAG:
            return f"tag:{self.name}={self.value}"
        if self.kind is TargetKind.PACKAGE:
            return f"package:{self.name}{self.op}{self.value}"
        if self.kind is TargetKind.OS:
            return f"os:{self.name}" + (f"-{self.value}" if self.value else "")
        return "computer:" + ",".join(str(i) for i in self.computer_ids)


def valid_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name))  # fullmatch: "$" alone lets a trailing newline in


def valid_tag_key(key: str) -> bool:
    return bool(_TAG_KEY.fullmatch(key))


def tag_value_problem(value: str) -> str | None:
    """Why ``value`` cannot be a tag value, or None: printable text (no newlines or other
    control characters, which would forge lines in listings and logs), bounded."""
    if len(value) > TAG_VALUE_MAX:
        return f"tag value is longer than {TAG_VALUE_MAX} characters"
    if not value.isprintable():
        bad = next(c for c in value if not c.isprintable())
        return f"tag value must be printable text, it contains {bad!r}"
    return None


def parse_target(spec: str) -> Target:
    spec = spec.strip()
    usage = (
        "expected all, group:NAME, tag:KEY=VALUE, computer:ID[,ID...], "
        "package:NAME[OP VERSION] or os:ID[-VERSION]"
    )
    if spec == "all":
        return Target(TargetKind.ALL)
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise TargetError(f"invalid target {spec!r}: {usage}")
    if kind == "group":
        if not valid_name(rest):
            raise TargetError(f"invalid group name {rest!r}")
        return Target(TargetKind.GROUP, name=rest)
    if kind == "tag":
        key, eq, value = rest.partition("=")
        if not eq or not valid_tag_key(key) or tag_value_problem(value) is not None:
            raise TargetError(f"invalid tag target {spec!r}: expected tag:KEY=VALUE")
        return Target(TargetKind.TAG, name=key, value=value)
    if kind == "computer":
        parts = rest.split(",")
        # ASCII digits only: int() would also take "1_0", " 1" or other scripts' digits.
        if not all(part.isascii() and part.isdigit() for part in parts):
            raise TargetError(f"invalid computer id list {rest!r}: expected integers")
        # Length first: int() refuses texts of thousands of digits with a ValueError.
        too_long = any(len(part) > len(str(MAX_ID)) for part in parts)
        ids = () if too_long else tuple(int(part) for part in parts)
        if too_long or any(not 0 < i <= MAX_ID for i in ids) or len(set(ids)) != len(ids):
            raise TargetError(
                f"invalid computer id list {rest!r}: positive, no repeats, at most {MAX_ID}"
            )
        return Target(TargetKind.COMPUTER, computer_ids=ids)
    if kind == "package":
        return _package_target(rest)
    if kind == "os":
        m = _OS.fullmatch(rest)
        if m is None:
            raise TargetError(
                f"invalid os target {spec!r}: expected os:ID[-VERSION], e.g. os:debian-12"
            )
        return Target(TargetKind.OS, name=m.group("id"), value=m.group("version") or "")
    raise TargetError(f"invalid target kind {kind!r}: {usage}")


def _package_target(rest: str) -> Target:
    m = _PACKAGE.fullmatch(rest.replace(" ", ""))
    if m is None:
        raise TargetError(
            f"invalid package target {rest!r}: expected package:NAME or package:NAME"
            f"OP VERSION with OP one of {' '.join(OPERATORS)}, e.g. package:openssl<3.0.13"
        )
    version = m.group("version") or ""
    if m.group("op") and not valid_version(version):
        raise TargetError(f"invalid package version {version!r}: not a Debian version")
    return Target(TargetKind.PACKAGE, name=m.group("name"), value=version, op=m.group("op") or "")
