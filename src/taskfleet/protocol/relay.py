"""The relay <-> server exchange (SPEC 3.2, 3.3; docs/relays.md). Read this before changing it.

A *relay* sits near its computers. Agents speak to it the agent exchange of
``protocol/exchange.py``, unchanged, so an agent does not care whether it talks to
a relay or to the server. The relay speaks to the server one *relay exchange* for
ALL its computers: one authenticated ``POST /relay/v1/exchange`` whose body
multiplexes per-computer agent exchanges, so the server's transport cost follows
the number of relays, not of computers.

Contract:

* A relay enrolls once (``POST /relay/v1/enroll`` with a relay enrollment token)
  and gets an id, a secret (sent as ``Authorization: Bearer`` with
  ``X-Taskfleet-Relay: ID``), its tickle key and the server's public key. Agents
  enroll through it: the relay forwards the agent's enrollment body unchanged to
  ``POST /relay/v1/enroll-computer``; the server enrolls the computer behind this
  relay (same tenant as the relay, or refused) and the relay passes the answer on.
* Request body (:func:`parse_relay_request`)::

      {"roster": "VERSION",          # the roster version the relay holds ("" = none)
       "resync": false,              # true after an exchange whose reply was lost
       "wait": 0,                    # long poll seconds (a relay that gets no UDP)
       "stats": {...},               # spool depth, cached messages, lag (relay show)
       "computers": [                # only computers with something to say
         {"id": 12, "ack": 7, "have": 9, "address": "10.0.0.5", "seen": 1764480000.0,
          "messages": [...], "agent": {...}, "conflict": "..."}]}

  ``ack``, ``messages`` and ``agent`` are the agent's own, verbatim (the relay
  forwards agent messages with the agent's sequence numbers, so a replay from the
  relay records nothing twice); ``have`` is the highest server message the relay
  holds for the computer (the server does not send those again); ``address`` and
  ``seen`` are where and when the relay last heard the agent; ``conflict`` (only
  while the relay has not seen the server flag it) says the relay caught two agents
  using this computer's identity, and why: the server flags the computer (only a
  computer behind this relay: any other is refused 403). ``stats`` are
  numbers the server shows as they are; ``relay list`` shows ``spool`` (agent
  messages not yet acked by the server), ``cached`` (server messages held for
  agents) and ``lag`` (seconds the oldest spooled message has waited), built by
  :func:`relay_stats` (which adds ``computers``, the relay's roster size).
* Reply body (:func:`parse_relay_reply`)::

      {"computers": [{"id": 12, "ack": 8, "messages": [...], "more": false,
                      "inventory": "full"}],
       "errors": [{"id": 13, "status": 403, "error": "..."}],
       "roster": {"version": "...", "computers": [{"id", "generation",
                  "secret_hash", "tickle_key", "tickle_port", "flagged"}]} | null,
       "server_time": 1764480000.0, "settings": {...}, "relay_settings": {...},
       "more": false}

  The reply names every computer the relay asked about (in ``computers`` or in
  ``errors``) and every other computer of the relay for which the server holds
  messages above ``have`` (new work, a cancel). ``ack`` is the server's
  acknowledgement of the computer's agent messages (the relay drops them from its
  spool and tells the agent, as ``server_ack``, so the agent keeps its own copies
  until the server has them: failing over to the server directly loses nothing).
  One bad entry fails alone (``errors``); the others are applied.
* ``"inventory": "full"`` on a computer's entry: the server wants that agent's
  whole inventory (its last report could not be applied); the relay says so in
  its replies to that agent until an entry for it comes without it.
* ``roster`` comes when the relay's version is stale: the computers behind this
  relay with what the relay needs to authenticate their agents (``secret_hash``,
  the SHA-256 of the agent's secret: it lets the relay check a secret, not present
  one) and to tickle them (``tickle_key``). It holds nothing that lets the relay
  run code on an agent: operations and cancels stay signed by the server and
  verified by the agent against the key it pinned at enrollment. ``flagged``
  (absent: false): the server flags the computer's identity; the relay refuses its
  agent (409 ``identity-conflict``), and when a later roster clears it (an
  administrator's reset) starts the computer's relay lineage afresh.
* Agent replies from a relay carry ``server_ack`` beside ``ack`` (``ack``: what
  the relay's spool holds durably; ``server_ack``: what the server acknowledged).
* Limits are checked before anything is applied; bodies that break them are
  refused whole with a clear error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from taskfleet.protocol.exchange import (
    MAX_LONG_POLL,
    AgentRequest,
    ProtocolError,
    parse_agent_request,
)
from taskfleet.settings import INT64_MAX

RELAY_ENROLL_PATH = "/relay/v1/enroll"
RELAY_ENROLL_COMPUTER_PATH = "/relay/v1/enroll-computer"
RELAY_EXCHANGE_PATH = "/relay/v1/exchange"

MAX_RELAY_BODY_BYTES = 64 * 1024 * 1024  # a relay request (16 full agent exchanges' worth)
MAX_RELAY_COMPUTERS = 20_000  # entries in one relay request; a relay sends more in several
MAX_ROSTER_VERSION_CHARS = 64
MAX_ADDRESS_CHARS = 64  # an IPv6 text address with zone fits
MAX_STATS = 16  # numeric fields in ``stats``
MAX_CONFLICT_CHARS = 500  # why a relay reports an identity conflict
_HASH = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class RelayEntry:
    """One computer's part of a relay request: its agent's exchange, as forwarded."""

    id: int
    request: AgentRequest  # ack, messages and agent info, the agent's own
    have: int  # highest server message the relay holds for this computer
    address: str | None
    seen: float | None
    # The relay found two agents using this computer's identity (why): the server
    # flags it, as for a direct conflict (docs/relays.md "Copies behind a relay").
    conflict: str | None = None


@dataclass(frozen=True)
class EntryError:
    """A refused entry (request side: malformed; reply side: refused by the server)."""

    id: int
    status: int  # HTTP-like: 400 malformed, 401/403 not this relay's, 500 retry later
    error: str


@dataclass(frozen=True)
class RelayRequest:
    roster: str
    resync: bool
    wait: float
    stats: dict[str, float]
    entries: list[RelayEntry] = field(default_factory=list)
    errors: list[EntryError] = field(default_factory=list)  # entries refused at parse


@dataclass(frozen=True)
class RosterEntry:
    id: int
    generation: int
    secret_hash: str  # hex SHA-256 of the agent's secret
    tickle_key: str  # hex
    tickle_port: int | None
    flagged: bool = False  # the server flags its identity: the relay refuses its agent


@dataclass(frozen=True)
class Roster:
    version: str
    computers: list[RosterEntry]


@dataclass(frozen=True)
class ComputerReply:
    id: int
    ack: int
    messages: list[dict[str, Any]]  # server -> agent messages, as the agent will get them
    more: bool = False
    inventory_full: bool = False  # the server wants the agent's whole inventory


@dataclass(frozen=True)
class RelayReply:
    computers: list[ComputerReply]
    errors: list[EntryError]
    roster: Roster | None
    server_time: float
    settings: dict[str, Any]
    relay_settings: dict[str, Any]
    more: bool = False


def _id(value: Any, what: str) -> int:
    if type(value) is not int or not 1 <= value <= INT64_MAX:
        raise ProtocolError(f"{what} must be an integer 1..{INT64_MAX}")
    return value


def _seq(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key, 0)
    if type(value) is not int or not 0 <= value <= INT64_MAX:
        raise ProtocolError(f"{key!r} must be an integer 0..{INT64_MAX}")
    return value


def _finite(value: Any, what: str) -> float:
    if type(value) not in (int, float):
        raise ProtocolError(f"{what} must be a number")
    try:
        number = float(value)
    except OverflowError:
        raise ProtocolError(f"{what} must be a finite number") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ProtocolError(f"{what} must be a finite number")
    return number


def _entry(raw: Any) -> RelayEntry:
    if not isinstance(raw, dict):
        raise ProtocolError("an entry must be an object")
    cid = _id(raw.get("id"), "'id'")
    try:
        request = parse_agent_request({k: raw[k] for k in ("ack", "messages", "agent") if k in raw})
        have = _seq(raw, "have")
        address = raw.get("address")
        if address is not None and (
            not isinstance(address, str) or not 0 < len(address) <= MAX_ADDRESS_CHARS
        ):
            raise ProtocolError(f"'address' must be a text of 1..{MAX_ADDRESS_CHARS} characters")
        seen = raw.get("seen")
        seen_at = None if seen is None else _finite(seen, "'seen'")
        conflict = raw.get("conflict")
        if conflict is not None and (
            not isinstance(conflict, str) or not 0 < len(conflict) <= MAX_CONFLICT_CHARS
        ):
            raise ProtocolError(f"'conflict' must be a text of 1..{MAX_CONFLICT_CHARS} characters")
    except ProtocolError as exc:
        raise _EntryProblem(cid, str(exc)) from None
    return RelayEntry(cid, request, have, address, seen_at, conflict)


class _EntryProblem(ProtocolError):
    def __init__(self, cid: int, error: str) -> None:
        super().__init__(error)
        self.cid = cid


def parse_relay_request(obj: Any) -> RelayRequest:
    """Validate a decoded relay request. A body that is wrong as a whole raises
    ProtocolError; an entry that is wrong alone is refused in ``errors`` (when its
    ``id`` can be read; an entry without one fails the body: it cannot be answered)."""
    if not isinstance(obj, dict):
        raise ProtocolError("the relay exchange body must be a JSON object")
    roster = obj.get("roster", "")
    if not isinstance(roster, str) or len(roster) > MAX_ROSTER_VERSION_CHARS:
        raise ProtocolError(f"'roster' must be a text of at most {MAX_ROSTER_VERSION_CHARS}")
    resync = obj.get("resync", False)
    if type(resync) is not bool:
        raise ProtocolError("'resync' must be true or false")
    wait = _finite(obj.get("wait", 0), "'wait'")
    if not 0.0 <= wait <= MAX_LONG_POLL:
        raise ProtocolError(f"'wait' must be 0..{MAX_LONG_POLL:g} seconds")
    raw_stats = obj.get("stats", {})
    if not isinstance(raw_stats, dict) or len(raw_stats) > MAX_STATS:
        raise ProtocolError(f"'stats' must be an object of at most {MAX_STATS} numbers")
    stats = {}
    for key, value in raw_stats.items():
        if not isinstance(key, str) or len(key) > 32:
            raise ProtocolError("'stats' keys must be texts of at most 32 characters")
        stats[key] = _finite(value, f"stats {key!r}")
    raw_entries = obj.get("computers", [])
    if not isinstance(raw_entries, list):
        raise ProtocolError("'computers' must be a list")
    if len(raw_entries) > MAX_RELAY_COMPUTERS:
        raise ProtocolError(f"{len(raw_entries)} computers, the limit is {MAX_RELAY_COMPUTERS}")
    entries: list[RelayEntry] = []
    errors: list[EntryError] = []
    seen_ids: set[int] = set()
    for i, raw in enumerate(raw_entries):
        try:
            entry = _entry(raw)
        except _EntryProblem as exc:
            if exc.cid in seen_ids:
                raise ProtocolError(f"computer {exc.cid} appears twice") from None
            seen_ids.add(exc.cid)
            errors.append(EntryError(exc.cid, 400, f"bad exchange: {exc}"))
            continue
        except ProtocolError as exc:
            raise ProtocolError(f"computers[{i}]: {exc}") from None
        if entry.id in seen_ids:
            raise ProtocolError(f"computer {entry.id} appears twice")
        seen_ids.add(entry.id)
        entries.append(entry)
    return RelayRequest(roster, resync, wait, stats, entries, errors)


def _roster(raw: Any) -> Roster:
    if not isinstance(raw, dict):
        raise ProtocolError("'roster' must be an object")
    version = raw.get("version")
    if not isinstance(version, str) or len(version) > MAX_ROSTER_VERSION_CHARS:
        raise ProtocolError("'roster.version' must be a short text")
    items = raw.get("computers")
    if not isinstance(items, list):
        raise ProtocolError("'roster.computers' must be a list")
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise ProtocolError("a roster entry must be an object")
        secret_hash, tickle_key = item.get("secret_hash"), item.get("tickle_key")
        if not isinstance(secret_hash, str) or not _HASH.fullmatch(secret_hash):
            raise ProtocolError("'secret_hash' must be 64 lowercase hex digits")
        if not isinstance(tickle_key, str) or not _HASH.fullmatch(tickle_key):
            raise ProtocolError("'tickle_key' must be 64 lowercase hex digits")
        port = item.get("tickle_port")
        if port is not None and (type(port) is not int or not 0 < port < 65536):
            raise ProtocolError("'tickle_port' must be 1..65535 or null")
        flagged = item.get("flagged", False)
        if type(flagged) is not bool:
            raise ProtocolError("'flagged' must be true or false")
        out.append(
            RosterEntry(
                _id(item.get("id"), "roster 'id'"),
                _seq(item, "generation"),
                secret_hash,
                tickle_key,
                port,
                flagged,
            )
        )
    return Roster(version, out)


def parse_relay_reply(obj: Any) -> RelayReply:
    """Validate the server's reply to a relay exchange (the relay's side)."""
    if not isinstance(obj, dict):
        raise ProtocolError("the relay exchange reply must be a JSON object")
    computers = []
    raw_computers = obj.get("computers", [])
    if not isinstance(raw_computers, list):
        raise ProtocolError("'computers' must be a list")
    for raw in raw_computers:
        if not isinstance(raw, dict):
            raise ProtocolError("a computer reply must be an object")
        messages = raw.get("messages", [])
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ProtocolError("'messages' must be a list of objects")
        for m in messages:
            _id(m.get("seq"), "a server message's 'seq'")
        computers.append(
            ComputerReply(
                _id(raw.get("id"), "'id'"),
                _seq(raw, "ack"),
                messages,
                raw.get("more") is True,
                raw.get("inventory") == "full",
            )
        )
    errors = []
    raw_errors = obj.get("errors", [])
    if not isinstance(raw_errors, list):
        raise ProtocolError("'errors' must be a list")
    for raw in raw_errors:
        if not isinstance(raw, dict):
            raise ProtocolError("an error must be an object")
        status = raw.get("status")
        if type(status) is not int or not 400 <= status <= 599:
            raise ProtocolError("an error's 'status' must be 400..599")
        text = raw.get("error", "")
        errors.append(EntryError(_id(raw.get("id"), "'id'"), status, str(text)[:2000]))
    raw_roster = obj.get("roster")
    roster = None if raw_roster is None else _roster(raw_roster)
    settings = obj.get("settings", {})
    relay_settings = obj.get("relay_settings", {})
    if not isinstance(settings, dict) or not isinstance(relay_settings, dict):
        raise ProtocolError("'settings' and 'relay_settings' must be objects")
    return RelayReply(
        computers,
        errors,
        roster,
        _finite(obj.get("server_time", 0), "'server_time'"),
        settings,
        relay_settings,
        obj.get("more") is True,
    )


# -- builders -----------------------------------------------------------------------


def relay_enroll_body(
    token: str, name: str, *, url: str | None, tickle_port: int | None, version: str
) -> dict[str, Any]:
    """A relay's enrollment request (``RELAY_ENROLL_PATH``, the relay's side). ``url``
    (what its agents use, as the server shows it) and ``tickle_port`` (UDP for the
    server's wake-ups) are left out when the relay has none."""
    body: dict[str, Any] = {"token": token, "name": name, "version": version}
    if url:
        body["url"] = url
    if tickle_port:
        body["tickle_port"] = tickle_port
    return body


def relay_entry(
    computer_id: int,
    *,
    ack: int,
    have: int,
    messages: list[Any],
    agent: Any = None,
    address: str | None = None,
    seen: float | None = None,
    conflict: str | None = None,
) -> dict[str, Any]:
    """One computer's part of a relay request (the relay's side). ``messages`` and
    ``agent`` are the agent's own: decoded objects, or their spooled JSON texts as
    ``orjson.Fragment`` (forwarded byte for byte)."""
    entry: dict[str, Any] = {"id": computer_id, "ack": ack, "have": have, "messages": messages}
    if agent is not None:
        entry["agent"] = agent
    if address is not None:
        entry["address"] = address
    if seen is not None:
        entry["seen"] = seen
    if conflict is not None:
        entry["conflict"] = conflict[:MAX_CONFLICT_CHARS]
    return entry


# The numbers a relay reports in ``stats``, as the server shows them (``relay list``
# reads the first three by these names).
STAT_SPOOL = "spool"  # agent messages the server has not acknowledged yet
STAT_CACHED = "cached"  # server messages held for agents
STAT_LAG = "lag"  # seconds the oldest spooled message has waited
STAT_COMPUTERS = "computers"  # computers in the relay's roster


def relay_stats(*, spool: int, cached: int, lag: float, computers: int) -> dict[str, float]:
    """A relay's ``stats`` (the relay's side)."""
    return {STAT_SPOOL: spool, STAT_CACHED: cached, STAT_LAG: lag, STAT_COMPUTERS: computers}


def relay_request(
    entries: list[dict[str, Any]],
    *,
    roster: str,
    resync: bool = False,
    wait: float = 0.0,
    stats: dict[str, float] | None = None,
) -> dict[str, Any]:
    """A relay exchange request body (the relay's side)."""
    body: dict[str, Any] = {"roster": roster, "computers": entries}
    if resync:
        body["resync"] = True
    if wait:
        body["wait"] = wait
    if stats:
        body["stats"] = stats
    return body


def roster_entry(
    computer_id: int,
    generation: int,
    secret_hash: str,
    tickle_key: str,
    tickle_port: int | None,
    flagged: bool = False,
) -> dict[str, Any]:
    """One computer of a relay's roster (the server's side)."""
    entry: dict[str, Any] = {
        "id": computer_id,
        "generation": generation,
        "secret_hash": secret_hash,
        "tickle_key": tickle_key,
        "tickle_port": tickle_port,
    }
    if flagged:
        entry["flagged"] = True
    return entry


def roster_body(version: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """A relay's roster (the server's side): ``entries`` from :func:`roster_entry`."""
    return {"version": version, "computers": entries}


@dataclass(frozen=True)
class ComputerOut:
    """One computer's part of a relay reply, as the server builds it: ``messages`` are
    the stored JSON texts of its outbox, spliced in verbatim (never parsed again)."""

    id: int
    ack: int
    messages: list[str]
    more: bool = False
    inventory_full: bool = False  # the server wants the agent's whole inventory


def relay_reply_body(
    computers: list[ComputerOut],
    errors: list[EntryError],
    roster: dict[str, Any] | None,
    *,
    server_time: float,
    settings_json: bytes,
    relay_settings_json: bytes,
    more: bool,
) -> bytes:
    """The server's reply to a relay exchange, as bytes (what :func:`parse_relay_reply`
    reads). Built by hand around the verbatim messages, like the agent exchange's."""
    import orjson  # the server's; agents and relays import this module without it

    parts = [
        b'{"id":%d,"ack":%d,"messages":[%s]%s%s}'
        % (
            c.id,
            c.ack,
            ",".join(c.messages).encode(),
            b',"more":true' if c.more else b"",
            b',"inventory":"full"' if c.inventory_full else b"",
        )
        for c in computers
    ]
    return b'{"computers":[%s],"errors":%s,"roster":%s,"server_time":%.3f,"settings":%s,' % (
        b",".join(parts),
        orjson.dumps([{"id": e.id, "status": e.status, "error": e.error} for e in errors]),
        orjson.dumps(roster),
        server_time,
        settings_json,
    ) + b'"relay_settings":%s,"more":%s}' % (relay_settings_json, b"true" if more else b"false")
