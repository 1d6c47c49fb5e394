"""A computer's inventory as data, and the deltas that carry its changes (issue 13).

Contract:

* A *snapshot* is a dict of sections. The *small* sections (``SMALL``: ``os``,
  ``kernel``, ``cpu``, ``memory``, ``disks``, ``network``, ``missing``) are
  plain JSON values replaced whole when they change; ``missing`` maps a source
  that could not be read to the reason (its section is then absent: unknown,
  not empty). The *keyed* sections (``KEYED``: ``packages`` and ``upgrades``
  keyed ``NAME:ARCH``, ``users`` and ``groups`` keyed by name) are dicts of
  entries, each entry a dict of fields.
* ``delta(old, new)`` is what changed: a small section that differs, as its new
  value (``None``: gone), and a keyed one as ``{"set": {key: entry},
  "remove": [key, ...]}`` with only the entries that changed (a section that
  appears sets every entry; one that goes is ``None``). An empty keyed
  section is known to be empty (no pending upgrades); an absent one is
  unknown. An empty delta means nothing changed.
* ``apply(old, delta)`` gives the new snapshot (removes first, then sets); it
  never changes ``old`` and is idempotent: applying a delta twice gives what
  applying it once gave, so a resent delta changes nothing.
  ``apply(old, delta(old, new)) == new`` for every pair of snapshots.
* ``compose(d1, d2)`` is one delta doing what ``d1`` then ``d2`` do (the server
  folds several reports of one computer into one write); a keyed section that
  went and came back composes to ``{"clear": true, "set": ...}`` (start empty),
  which only ``compose`` makes (never on the wire).
* ``digest(snapshot)`` names a snapshot's content (SHA-256 of its canonical
  JSON, 32 hex digits): a delta says the digest it applies to and the one it
  makes, so the server applies a delta only to the state it was made against.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

SMALL = ("os", "kernel", "cpu", "memory", "disks", "network", "missing")
KEYED = ("packages", "upgrades", "users", "groups")
SECTIONS = SMALL + KEYED

Snapshot = dict[str, Any]
Delta = dict[str, Any]


def delta(old: Snapshot, new: Snapshot) -> Delta:
    out: Delta = {}
    for name in SMALL:
        if old.get(name) != new.get(name):
            out[name] = new.get(name)
    for name in KEYED:
        if name not in new:
            if name in old:
                out[name] = None
            continue
        before: dict[str, Any] = old.get(name) or {}
        after: dict[str, Any] = new[name]
        changed = {k: v for k, v in after.items() if before.get(k) != v}
        gone = sorted(k for k in before if k not in after)
        if changed or gone or name not in old:
            out[name] = {"set": changed, "remove": gone}
    return out


def apply(old: Snapshot, change: Delta) -> Snapshot:
    new = dict(old)
    for name, value in change.items():
        if value is None:
            new.pop(name, None)
        elif name in KEYED:
            entries = {} if value.get("clear") else dict(new.get(name) or {})
            for key in value.get("remove", ()):
                entries.pop(key, None)
            entries.update(value.get("set", {}))
            new[name] = entries
        else:
            new[name] = value
    return new


def compose(first: Delta, then: Delta) -> Delta:
    out = dict(first)
    for name, value in then.items():
        before = first.get(name)
        if name not in KEYED or value is None or value.get("clear") or name not in first:
            out[name] = value
        elif before is None:  # gone, then back: start from nothing
            out[name] = {"set": dict(value.get("set", {})), "remove": [], "clear": True}
        else:
            removed = set(value.get("remove", ()))
            sets = {k: v for k, v in before.get("set", {}).items() if k not in removed}
            sets.update(value.get("set", {}))
            gone = sorted(set(before.get("remove", ())) | removed)
            out[name] = {"set": sets, "remove": gone}
            if before.get("clear"):
                out[name]["clear"] = True
    return out


def digest(snapshot: Snapshot) -> str:
    text = json.dumps(snapshot, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def package_key(name: str, arch: str) -> str:
    return f"{name}:{arch}"


def split_package_key(key: str) -> tuple[str, str]:
    """``NAME:ARCH`` -> (name, arch); a key without ``:`` has arch ``""``."""
    name, _, arch = key.partition(":")
    return name, arch
