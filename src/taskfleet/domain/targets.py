"""Target specifications: which computers a request is aimed at (SPEC 7).

Contract: ``parse_target`` turns ``all``, ``group:NAME``, ``tag:KEY=VALUE`` or
``computer:ID[,ID...]`` into a :class:`Target`, or raises :class:`TargetError`
with a message that says what is wrong. Resolution against the fleet happens in
the store; an unknown group or tag is an error there, never an empty success.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_TAG_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,63}$")


class TargetKind(enum.StrEnum):
    ALL = "all"
    GROUP = "group"
    TAG = "tag"
    COMPUTER = "computer"


class TargetError(ValueError):
    pass


@dataclass(frozen=True)
class Target:
    kind: TargetKind
    name: str = ""  # group name or tag key
    value: str = ""  # tag value
    computer_ids: tuple[int, ...] = ()

    def __str__(self) -> str:
        if self.kind is TargetKind.ALL:
            return "all"
        if self.kind is TargetKind.GROUP:
            return f"group:{self.name}"
        if self.kind is TargetKind.TAG:
            return f"tag:{self.name}={self.value}"
        return "computer:" + ",".join(str(i) for i in self.computer_ids)


def valid_name(name: str) -> bool:
    return bool(_NAME.match(name))


def valid_tag_key(key: str) -> bool:
    return bool(_TAG_KEY.match(key))


def parse_target(spec: str) -> Target:
    spec = spec.strip()
    usage = "expected all, group:NAME, tag:KEY=VALUE or computer:ID[,ID...]"
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
        if not eq or not valid_tag_key(key) or len(value) > 256:
            raise TargetError(f"invalid tag target {spec!r}: expected tag:KEY=VALUE")
        return Target(TargetKind.TAG, name=key, value=value)
    if kind == "computer":
        try:
            ids = tuple(int(part) for part in rest.split(","))
        except ValueError:
            raise TargetError(f"invalid computer id list {rest!r}: expected integers") from None
        if any(i <= 0 for i in ids) or len(set(ids)) != len(ids):
            raise TargetError(f"invalid computer id list {rest!r}: positive, no repeats")
        return Target(TargetKind.COMPUTER, computer_ids=ids)
    raise TargetError(f"invalid target kind {kind!r}: {usage}")
