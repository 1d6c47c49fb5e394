"""The ``inventory`` message (agent -> server) and the server's ask for a full one (issue 13).

Contract:

* ``inventory_message(full, base, digest, sections)`` builds the message:
  ``{"type": "inventory", "full": bool, "base": DIGEST, "digest": DIGEST,
  "sections": {...}}`` (no ``seq``: the agent's state numbers it, and like
  every agent message it is resent until the server acks it and applied once,
  in order). ``full``: ``sections`` is the whole snapshot; else it is a delta
  (``domain/inventory.py``) against the snapshot whose digest is ``base``;
  ``digest`` names the snapshot it makes.
* ``parse_inventory`` (in ``exchange._AGENT_PARSERS``) never refuses the whole
  exchange for what is inside a readable message: a message that breaks a rule
  (a section of the wrong shape, a package name or version that is not a
  Debian one, a text or an entry count over its limit, over
  ``MAX_INVENTORY_BYTES`` in all) parses as an :class:`InventoryReport` with
  ``problem`` set; the server acknowledges it, applies nothing of it, records
  the problem and asks for a full inventory. Only an unreadable ``seq`` refuses
  the exchange, as for every message. Every text is cleaned as
  ``fields.clean_text`` does (NUL, lone surrogates).
* The server's reply says ``"inventory": "full"`` while it wants the whole
  inventory (it has none for this computer, or a delta did not apply to what it
  has); ``exchange.parse_server_reply`` reads it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from taskfleet.domain.inventory import KEYED, SMALL, split_package_key
from taskfleet.domain.versions import valid_version
from taskfleet.protocol.fields import ProtocolError, clean_text, int_field
from taskfleet.settings import INT64_MAX, INT64_MIN

MAX_INVENTORY_BYTES = 1024 * 1024  # one inventory message, about (a desktop's 5,000 packages fit)
MAX_ENTRIES = 50_000  # entries of one keyed section
MAX_KEY_CHARS = 256  # a package key (NAME:ARCH), a user or group name
MAX_TEXT_CHARS = 1024  # any other text (a CPU model, a home folder, a reason)
MAX_DEPTH = 4  # nesting in a small section (network: list > interface > addresses)
ASK_FULL = "full"  # the reply's "inventory" when the server wants the whole inventory

_DIGEST = re.compile(r"[0-9a-f]{32}")
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.\-]{0,127}")
_ARCH = re.compile(r"[a-z0-9][a-z0-9\-]{0,31}")


@dataclass(frozen=True)
class InventoryReport:
    seq: int
    full: bool = False
    base: str = ""
    digest: str = ""
    sections: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None  # why it cannot be applied (then nothing of it is)


def inventory_message(
    full: bool, base: str, digest: str, sections: dict[str, Any]
) -> dict[str, Any]:
    return {"type": "inventory", "full": full, "base": base, "digest": digest, "sections": sections}


class _Budget:
    """Counts what a message holds, roughly as its JSON bytes; over the limit: refused."""

    def __init__(self) -> None:
        self.used = 0

    def text(self, value: Any, limit: int, what: str) -> str:
        if not isinstance(value, str):
            raise ProtocolError(f"{what} must be a string")
        if len(value) > limit:
            raise ProtocolError(f"{what} is {len(value)} characters, the limit is {limit}")
        self.spend(len(value) + 3)
        return clean_text(value)

    def spend(self, n: int) -> None:
        self.used += n
        if self.used > MAX_INVENTORY_BYTES:
            raise ProtocolError(f"the message is over {MAX_INVENTORY_BYTES} bytes")


def _scalar(value: Any, budget: _Budget, what: str) -> Any:
    if isinstance(value, str):
        return budget.text(value, MAX_TEXT_CHARS, what)
    if value is None or isinstance(value, bool):
        budget.spend(5)
        return value
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise ProtocolError(f"{what} is out of range")
        budget.spend(20)
        return value
    if isinstance(value, float) and math.isfinite(value):
        budget.spend(24)
        return value
    raise ProtocolError(f"{what} must be text, a finite number, true, false or null")


def _value(value: Any, budget: _Budget, what: str, depth: int = 0) -> Any:
    """A small section's JSON value: nested lists and objects of scalars, bounded."""
    if isinstance(value, dict | list) and depth >= MAX_DEPTH:
        raise ProtocolError(f"{what} nests deeper than {MAX_DEPTH}")
    if isinstance(value, dict):
        return {
            budget.text(k, MAX_KEY_CHARS, f"a key in {what}"): _value(v, budget, what, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list):
        budget.spend(2 * len(value))
        return [_value(v, budget, what, depth + 1) for v in value]
    return _scalar(value, budget, what)


def _entry(section: str, key: Any, value: Any, budget: _Budget) -> tuple[str, dict[str, Any]]:
    what = f"{section} entry {str(key)[:60]!r}"
    key = budget.text(key, MAX_KEY_CHARS, f"a key of {section}")
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be an object")
    if section in ("packages", "upgrades"):
        name, arch = split_package_key(key)
        if not _PACKAGE.fullmatch(name) or (arch and not _ARCH.fullmatch(arch)):
            raise ProtocolError(f"{what}: not a Debian package NAME:ARCH")
        version = value.get("version")
        if not isinstance(version, str) or not valid_version(version):
            raise ProtocolError(f"{what}: 'version' is not a Debian version")
    fields = {}
    for k, v in value.items():
        if isinstance(v, list):  # a group's members
            budget.spend(2 * len(v))
            if len(v) > MAX_ENTRIES:
                raise ProtocolError(f"{what}: {len(v)} items, the limit is {MAX_ENTRIES}")
            v = [budget.text(m, MAX_KEY_CHARS, what) for m in v]
        else:
            v = _scalar(v, budget, what)
        fields[budget.text(k, MAX_KEY_CHARS, what)] = v
    return key, fields


def _entries(section: str, value: Any, budget: _Budget) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{section!r} must map keys to entries")
    if len(value) > MAX_ENTRIES:
        raise ProtocolError(f"{section!r} has {len(value)} entries, the limit is {MAX_ENTRIES}")
    return dict(_entry(section, k, v, budget) for k, v in value.items())


def _sections(raw: Any, full: bool, budget: _Budget) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ProtocolError("'sections' must be an object")
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if name in SMALL:
            out[name] = None if value is None and not full else _value(value, budget, name)
        elif name not in KEYED:
            raise ProtocolError(f"unknown section {str(name)[:40]!r}")
        elif full:
            out[name] = _entries(name, value, budget)
        elif value is None:
            out[name] = None
        else:
            if not isinstance(value, dict) or set(value) - {"set", "remove"}:
                raise ProtocolError(f"{name!r} must be {{'set': {{...}}, 'remove': [...]}}")
            remove = value.get("remove", [])
            if not isinstance(remove, list) or len(remove) > MAX_ENTRIES:
                raise ProtocolError(f"{name!r} 'remove' must be a list of keys")
            out[name] = {
                "set": _entries(name, value.get("set", {}), budget),
                "remove": [budget.text(k, MAX_KEY_CHARS, f"a key of {name}") for k in remove],
            }
    return out


def parse_inventory(msg: dict[str, Any]) -> InventoryReport:
    seq = int_field(msg, "seq", minimum=1) or 0  # unreadable: the exchange is refused
    try:
        full = msg.get("full")
        if not isinstance(full, bool):
            raise ProtocolError("'full' must be true or false")
        base, digest = msg.get("base", ""), msg.get("digest")
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise ProtocolError("'digest' must be 32 hex digits")
        if not full and (not isinstance(base, str) or not _DIGEST.fullmatch(base)):
            raise ProtocolError("'base' must be 32 hex digits")
        sections = _sections(msg.get("sections"), full, _Budget())
    except ProtocolError as exc:
        return InventoryReport(seq, problem=str(exc))
    return InventoryReport(seq, full, base if not full else "", digest, sections)
