"""The agent <-> server message exchange (SPEC 3.1). Read this before changing it.

An *exchange* is one authenticated ``POST /agent/v1/exchange`` carrying the
agent's outgoing messages and returning the server's. Both directions use the
same scheme, borrowed from landscape-client:

* Every message carries ``seq``, a per-computer, per-direction sequence number
  that starts at 1 and grows by one per message.
* Each side states in every exchange the highest sequence number it has
  *durably stored* from the other side (``ack``). Everything above the peer's
  ack is sent again at the next exchange; the receiver drops any message whose
  ``seq`` it has already applied. Delivery is therefore at-least-once and the
  effect exactly-once, and a lost request or response never loses or doubles
  work.
* Agent -> server messages: ``operation-result`` (``op``, status, exit code,
  output, start/end time on the computer, result line; ``recurring`` marks one
  run of a recurring operation, which changes no state) and
  ``operation-status`` (``op`` is ``working`` on its ``attempt``, or
  ``deferred`` ``until`` a time, with a reason; it changes no state but moves
  the server's lost-deadline), and ``refused`` (the server message
  ``server_seq``, naming operation ``op`` if it could be read, was not
  genuinely for this computer: a ``reason`` from ``REFUSAL_REASONS`` and a
  ``text``; the server records it in its log, metrics and audit log and
  changes no state). A result for an operation that is already final is
  recorded but changes no state.
* Every message is built by a builder below (``operation_message``,
  ``cancel_message``, ``operation_status``, ``operation_result``,
  ``refused_message``) and parsed
  here too: ``parse_agent_request`` on the server, ``parse_server_reply`` on
  the agent (which says what the agent does with a reply it cannot read).
* The inventory (``protocol/inventory.py``) adds ``inventory`` (agent -> server:
  the whole inventory or a delta) and the reply's ``"inventory": "full"`` (the
  server wants the whole one).
* A job (``protocol/jobs.py``) adds ``job-step`` (agent -> server: one step's
  status) and ``terminate`` (server -> agent: finish the current step, skip the rest).
* Server -> agent messages: ``operation`` (run operation ``op``),
  ``cancel`` (stop operation ``op``), ``terminate`` and ``windows`` (a job's
  computer's maintenance windows changed after hand-out). All are signed orders
  (``protocol/orders.py``): a canonical JSON text in ``body``, signed with the
  server's Ed25519 key in ``sig``, naming the computer, its generation and the
  operation, so a relay cannot invent, alter, redirect or replay one; the agent
  checks it before it stores or acts on it.
* The agent writes an operation to its local state before it acks it, and a
  result before it sends it. The server writes results before it acks them.
* Request body: ``{"ack": int, "messages": [...], "agent": {...}?, "wait": s?}``;
  ``agent`` (tickle port, version, policy) is sent when it changed; ``wait``
  asks for a long poll: the server holds the exchange up to ``wait`` seconds
  until there is work (agents that cannot receive UDP tickles).
* Response body: ``{"ack": int, "messages": [...], "server_time": float,
  "settings": {...}, "more": true?, "relay": URL?}``; a relay's reply adds
  ``"server_ack": int`` (``ack`` is then what the relay holds, ``server_ack`` what
  the server acknowledged: the agent keeps its messages until the server has
  them). The server's own reply names in ``relay`` the URL of the relay the
  computer is assigned to (``relay assign``), when that relay advertised one:
  an agent talking to the server directly moves behind it (``relay_field``
  builds it, ``parse_server_reply`` checks it).
* Identities that cannot be cloned (``domain/identity.py``): a direct request
  carries ``"identity": NONCE`` (32 hex digits; absent: the agent holds none yet),
  and a direct reply may carry a fresh ``"identity": NONCE`` that the agent keeps
  durably before it acts on anything else of that reply and presents next time
  (the enrollment's answer carries the first). Two agents presenting this
  computer's secret with diverging nonces are refused with 409 and
  ``"code": "identity-conflict"`` until an administrator decides. A relay keeps a
  lineage of its own for the computers behind it (docs/relays.md "Copies behind
  a relay"): the agent presents its relay nonce to the relay, its server nonce to
  the server, and keeps each reply's offer as the nonce of the peer that made it.

Limits (``MAX_*`` below) are checked before anything is applied; a body that
breaks one is refused whole with a clear error and nothing changes. Every
integer must fit the database column it is stored in (``INT64_MAX`` for
sequence numbers and ids, ``INT32_MAX`` for exit codes and attempts), every
number must be finite.

Text from agents is stored as sent with two exceptions, the same on every
database (``clean_text``): NUL (U+0000), which PostgreSQL text cannot hold,
becomes U+2400 (the visible "symbol for null"), and unpaired surrogates, which
are not Unicode text at all, become U+FFFD (as invalid UTF-8 in script output
already does on the agent).

A reply carries at most ``REPLY_MAX_BYTES`` (settings) of messages, or one
message if a single one is larger; ``"more": true`` in it says more is waiting,
and the agent exchanges again at once.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from taskfleet.domain.policy import validate_agent_policy
from taskfleet.protocol.fields import NUL_SYMBOL as NUL_SYMBOL
from taskfleet.protocol.fields import ProtocolError as ProtocolError
from taskfleet.protocol.fields import choice_field
from taskfleet.protocol.fields import clean_text as clean_text
from taskfleet.protocol.fields import int_field as _int
from taskfleet.protocol.fields import num_field as _num
from taskfleet.protocol.fields import str_field as _str
from taskfleet.protocol.inventory import InventoryReport, parse_inventory

# BIGINT columns (sequence numbers, operation ids) and INTEGER columns (exit
# code, attempt; dropped counts are capped at INT32_MAX).
from taskfleet.settings import AGENT_MAX_RESPONSE, INT32_MAX, INT32_MIN, INT64_MAX, RELAY_URL_MAX

if TYPE_CHECKING:
    from taskfleet.protocol.jobs import JobStep

EXCHANGE_PATH = "/agent/v1/exchange"
ENROLL_PATH = "/agent/v1/enroll"
PROTOCOL_VERSION = 1

MAX_BODY_BYTES = 4 * 1024 * 1024  # whole exchange request body
MAX_MESSAGES = 500  # messages in one exchange
MAX_OUTPUT_CHARS = 1024 * 1024  # stdout or stderr in one result
MAX_TEXT_CHARS = 2000  # result line, reasons
MAX_LONG_POLL = 300.0  # seconds a long poll may be held
MAX_VERSION_CHARS = 64  # agent version (computers.agent_version)
MAX_REPLY_BYTES = AGENT_MAX_RESPONSE  # a reply, so any text in it (the agent refuses more)
MAX_SIG_CHARS = 256  # a signature in hex (Ed25519: 128)


RESULT_STATUSES = frozenset({"succeeded", "failed", "canceled"})
# Why an agent refused a server message that is not genuinely for it (protocol/orders.py).
REFUSAL_REASONS = frozenset(
    {"bad-signature", "wrong-computer", "wrong-generation", "replayed", "malformed"}
)
# "failed" here is a failed attempt that will be retried (SPEC 5): not final.
PROGRESS_STATUSES = frozenset({"working", "deferred", "failed"})


@dataclass(frozen=True)
class OperationResult:
    seq: int
    op: int
    status: str  # succeeded | failed | canceled (what really happened on the computer)
    exit_code: int | None
    stdout: str
    stderr: str
    stdout_dropped: int
    stderr_dropped: int
    started_at: float | None
    ended_at: float | None
    result_line: str
    recurring: bool = False


@dataclass(frozen=True)
class OperationStatus:
    seq: int
    op: int
    status: str  # working | deferred | failed (an attempt failed; it will be retried)
    attempt: int
    until: float | None  # deferred: when the agent expects to run it
    reason: str


@dataclass(frozen=True)
class RefusedMessage:
    seq: int
    server_seq: int  # the server message refused
    op: int | None  # the operation it named, when that much could be read
    reason: str  # one of REFUSAL_REASONS
    text: str


AgentMessage: TypeAlias = (
    "OperationResult | OperationStatus | RefusedMessage | JobStep | InventoryReport"
)


@dataclass(frozen=True)
class AgentInfo:
    tickle_port: int | None
    version: str
    policy: dict[str, Any]


@dataclass(frozen=True)
class AgentRequest:
    ack: int
    messages: list[AgentMessage] = field(default_factory=list)
    agent: AgentInfo | None = None
    wait: float = 0.0
    identity: str | None = None  # the agent's identity nonce (None: it holds none)

    @property
    def max_seq(self) -> int:
        # parse_agent_request guarantees increasing sequence numbers.
        return self.messages[-1].seq if self.messages else 0


@dataclass(frozen=True)
class SignedOrder:
    """A numbered server -> agent message carrying an order for operation ``op``:
    ``body`` is the signed canonical text (``protocol/orders.py``), "" when the message
    carries none (unsigned: refused by the agent)."""

    seq: int
    op: int
    body: str
    sig: str


class OperationMessage(SignedOrder):
    """Server -> agent: run operation ``op``."""


class CancelMessage(SignedOrder):
    """Server -> agent: stop operation ``op``."""


class TerminateMessage(SignedOrder):
    """Server -> agent: terminate job operation ``op`` (``protocol/jobs.py``)."""


class WindowsMessage(SignedOrder):
    """Server -> agent: job operation ``op``'s maintenance windows changed."""


@dataclass(frozen=True)
class MalformedMessage:
    """A numbered server message the agent cannot read; it is acknowledged, never acted on."""

    seq: int
    op: int | None  # the operation it names, when that much is readable
    error: str


ServerMessage = (
    OperationMessage | CancelMessage | TerminateMessage | WindowsMessage | MalformedMessage
)


@dataclass(frozen=True)
class ServerSettings:
    poll_interval: float | None = None  # seconds between fallback exchanges, if set


@dataclass(frozen=True)
class ServerReply:
    ack: int
    messages: list[ServerMessage] = field(default_factory=list)
    server_time: float | None = None
    settings: ServerSettings = ServerSettings()
    more: bool = False
    server_ack: int | None = None  # a relay's reply: what the server acknowledged
    relay: str | None = None  # the server's reply: the relay this computer is assigned to
    inventory: str | None = None  # "full": the server wants the whole inventory
    identity: str | None = None  # the server's reply: a fresh identity nonce to keep


def clean_json(value: Any) -> Any:
    """``clean_text`` on every string (keys too) of a decoded JSON value."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean_text(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_json(v) for v in value]
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads_body(body: bytes) -> Any:
    """Decode an exchange body. orjson refuses unpaired surrogate escapes, which
    an agent's stdlib encoder can write (a surrogate-escaped file name in an
    error message); the slow path takes them, and ``clean_text`` replaces them.
    Non-finite constants (NaN, Infinity) are refused on both paths."""
    import orjson

    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        if b"\\u" not in body:
            raise
    try:
        return json.loads(body, parse_constant=_no_constant)
    except ValueError as exc:
        raise ProtocolError(f"malformed JSON: {exc}") from None


def _parse_result(msg: dict[str, Any]) -> OperationResult:
    status = choice_field(msg, "status", RESULT_STATUSES)
    exit_code = msg.get("exit_code")
    if exit_code is not None and type(exit_code) is not int:
        raise ProtocolError("'exit_code' must be an integer or null")
    if exit_code is not None and not INT32_MIN <= exit_code <= INT32_MAX:
        raise ProtocolError(f"'exit_code' must be {INT32_MIN}..{INT32_MAX}")
    return OperationResult(
        seq=_int(msg, "seq", minimum=1) or 0,
        op=_int(msg, "op", minimum=1) or 0,
        status=status,
        exit_code=exit_code,
        stdout=_str(msg, "stdout", MAX_OUTPUT_CHARS),
        stderr=_str(msg, "stderr", MAX_OUTPUT_CHARS),
        stdout_dropped=_int(msg, "stdout_dropped", optional=True) or 0,
        stderr_dropped=_int(msg, "stderr_dropped", optional=True) or 0,
        started_at=_num(msg, "started_at"),
        ended_at=_num(msg, "ended_at"),
        result_line=_str(msg, "result_line", MAX_TEXT_CHARS),
        recurring=msg.get("recurring") is True,
    )


def _parse_status(msg: dict[str, Any]) -> OperationStatus:
    status = choice_field(msg, "status", PROGRESS_STATUSES)
    return OperationStatus(
        seq=_int(msg, "seq", minimum=1) or 0,
        op=_int(msg, "op", minimum=1) or 0,
        status=status,
        attempt=_int(msg, "attempt", maximum=INT32_MAX, optional=True) or 0,
        until=_num(msg, "until"),
        reason=_str(msg, "reason", MAX_TEXT_CHARS),
    )


def _parse_refused(msg: dict[str, Any]) -> RefusedMessage:
    reason = choice_field(msg, "reason", REFUSAL_REASONS)
    return RefusedMessage(
        seq=_int(msg, "seq", minimum=1) or 0,
        server_seq=_int(msg, "server_seq", minimum=1) or 0,
        op=_int(msg, "op", minimum=1, optional=True),
        reason=reason,
        text=_str(msg, "text", MAX_TEXT_CHARS),
    )


def _parse_job_step(m: dict[str, Any]) -> JobStep:
    # The job rules load with the first job step (an agent never parses one: memory).
    from taskfleet.protocol.jobs import parse_job_step

    return parse_job_step(m)


_AGENT_PARSERS: dict[str, Callable[[dict[str, Any]], AgentMessage]] = {
    "operation-result": _parse_result,
    "operation-status": _parse_status,
    "refused": _parse_refused,
    "job-step": _parse_job_step,
    "inventory": parse_inventory,
}


def parse_agent_request(obj: Any) -> AgentRequest:
    """Validate a decoded exchange body; raise ProtocolError naming the first problem."""
    if not isinstance(obj, dict):
        raise ProtocolError("the exchange body must be a JSON object")
    ack = _int(obj, "ack") or 0
    raw_messages = obj.get("messages", [])
    if not isinstance(raw_messages, list):
        raise ProtocolError("'messages' must be a list")
    if len(raw_messages) > MAX_MESSAGES:
        raise ProtocolError(f"{len(raw_messages)} messages, the limit is {MAX_MESSAGES}")
    messages: list[AgentMessage] = []
    last_seq = 0
    for i, msg in enumerate(raw_messages):
        if not isinstance(msg, dict):
            raise ProtocolError(f"message {i} must be an object")
        parse = _AGENT_PARSERS.get(str(msg.get("type")))
        if parse is None:
            raise ProtocolError(f"message {i}: unknown type {msg.get('type')!r}")
        try:
            message: AgentMessage = parse(msg)
        except ProtocolError as exc:
            raise ProtocolError(f"message {i}: {exc}") from None
        if message.seq <= last_seq:
            raise ProtocolError(f"message {i}: sequence numbers must increase")
        last_seq = message.seq
        messages.append(message)
    agent = None
    raw_agent = obj.get("agent")
    if raw_agent is not None:
        if not isinstance(raw_agent, dict):
            raise ProtocolError("'agent' must be an object")
        port = _int(raw_agent, "tickle_port", optional=True)
        if port is not None and not 0 < port < 65536:
            raise ProtocolError("'tickle_port' must be 1..65535")
        try:
            policy = validate_agent_policy(raw_agent.get("policy", {}))
        except ValueError as exc:
            raise ProtocolError(f"invalid policy: {exc}") from None
        agent = AgentInfo(port, _str(raw_agent, "version", MAX_VERSION_CHARS), policy)
    wait = _num(obj, "wait") or 0.0
    if not 0.0 <= wait <= MAX_LONG_POLL:
        raise ProtocolError(f"'wait' must be 0..{MAX_LONG_POLL:g} seconds")
    return AgentRequest(
        ack=ack, messages=messages, agent=agent, wait=wait, identity=identity_field(obj)
    )


_NONCE = re.compile("[0-9a-f]{32}")


def identity_field(obj: dict[str, Any]) -> str | None:
    """An ``identity`` nonce (request or reply): 32 lowercase hex digits, or absent."""
    value = obj.get("identity")
    if value is None:
        return None
    if not isinstance(value, str) or not _NONCE.fullmatch(value):
        raise ProtocolError("'identity' must be 32 lowercase hexadecimal digits")
    return value


def loads_reply(raw: bytes) -> Any:
    """Decode a reply body on the agent (stdlib only: the agent stays lean);
    malformed JSON and non-finite constants raise ProtocolError."""
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, _no_constant
        raise ProtocolError(f"malformed JSON: {exc}") from None


def parse_server_reply(obj: Any) -> ServerReply:
    """Validate a decoded exchange reply on the agent.

    What cannot be trusted as a whole raises ProtocolError naming the first
    problem, and the agent applies nothing of that reply (not even its ``ack``:
    its results stay queued), logs it and retries the exchange with backoff:
    a body that is not an object, an ``ack``, ``server_ack``, ``server_time``,
    ``settings`` or ``more`` of the wrong type or range, a ``server_ack`` above
    ``ack`` (a relay holds what the server acknowledged), a ``relay`` that is not
    an http(s) URL with a host of at most ``RELAY_URL_MAX`` characters,
    ``messages`` that is not a list, or a
    message that is not an object or whose ``seq`` is missing, out of range or
    not increasing. Without a trustworthy ``seq`` a message cannot be
    acknowledged or skipped, so retrying (a truncated or garbled reply, a broken
    relay) is all that is left.

    A message with a good ``seq`` that is otherwise unreadable (an unknown
    ``type``, a bad ``op``, ``body`` or ``sig``) becomes a
    :class:`MalformedMessage`: the agent acknowledges it without acting on it,
    so one bad message can never stall the conversation (the server would
    resend it forever). A message missing ``body`` and ``sig`` parses with
    empty ones: it is unsigned, which the agent refuses like any signature
    that does not verify. Unknown fields, in messages or ``settings``, are
    ignored (a newer server may send more).
    """
    if not isinstance(obj, dict):
        raise ProtocolError("the exchange reply must be a JSON object")
    ack = _int(obj, "ack") or 0
    raw_messages = obj.get("messages", [])
    if not isinstance(raw_messages, list):
        raise ProtocolError("'messages' must be a list")
    messages: list[ServerMessage] = []
    last_seq = 0
    for i, msg in enumerate(raw_messages):
        if not isinstance(msg, dict):
            raise ProtocolError(f"message {i} must be an object")
        try:
            seq = _int(msg, "seq", minimum=1) or 0
        except ProtocolError as exc:
            raise ProtocolError(f"message {i}: {exc}") from None
        if seq <= last_seq:
            raise ProtocolError(f"message {i}: sequence numbers must increase")
        last_seq = seq
        messages.append(_parse_server_message(seq, msg))
    more = obj.get("more", False)
    if not isinstance(more, bool):
        raise ProtocolError("'more' must be true or false")
    settings = parse_settings(obj.get("settings", {}))
    server_ack = _int(obj, "server_ack", optional=True)
    if server_ack is not None and server_ack > ack:
        raise ProtocolError(f"'server_ack' {server_ack} is above 'ack' {ack}")
    relay = None if obj.get("relay") is None else _relay_url(obj["relay"])
    # An ask this agent does not know (a newer server's) is ignored, like unknown fields.
    inventory = "full" if obj.get("inventory") == "full" else None
    return ServerReply(
        ack,
        messages,
        _num(obj, "server_time"),
        settings,
        more,
        server_ack,
        relay,
        inventory,
        identity_field(obj),
    )


def _relay_url(value: Any) -> str:
    if not isinstance(value, str) or len(value) > RELAY_URL_MAX:
        raise ProtocolError(f"'relay' must be a string of at most {RELAY_URL_MAX} characters")
    try:
        u = urllib.parse.urlsplit(value)
        ok = u.scheme in ("http", "https") and bool(u.hostname) and u.port != 0
    except ValueError:  # a port that is not a number or beyond 65535, a bad IPv6 host
        ok = False
    if not ok:
        raise ProtocolError(f"'relay' {value[:80]!r} is not an http(s)://HOST[:PORT] URL")
    return value


def parse_settings(obj: Any) -> ServerSettings:
    """The ``settings`` of a reply (or of an enrollment's answer)."""
    if not isinstance(obj, dict):
        raise ProtocolError("'settings' must be an object")
    poll = _num(obj, "poll_interval")
    if poll is not None and poll <= 0:
        raise ProtocolError("'poll_interval' must be a positive number of seconds")
    return ServerSettings(poll)


_SERVER_MESSAGES: dict[
    str,
    type[OperationMessage] | type[CancelMessage] | type[TerminateMessage] | type[WindowsMessage],
] = {
    "operation": OperationMessage,
    "cancel": CancelMessage,
    "terminate": TerminateMessage,
    "windows": WindowsMessage,
}


def _parse_server_message(seq: int, msg: dict[str, Any]) -> ServerMessage:
    op = msg.get("op")
    readable_op = op if type(op) is int and 1 <= op <= INT64_MAX else None
    kind = msg.get("type")
    try:
        cls = _SERVER_MESSAGES.get(str(kind))
        if cls is None:
            raise ProtocolError(f"unknown message type {str(kind)[:40]!r}")
        return cls(
            seq,
            _int(msg, "op", minimum=1) or 0,
            _str(msg, "body", MAX_REPLY_BYTES, clean=False),
            _str(msg, "sig", MAX_SIG_CHARS, clean=False),
        )
    except ProtocolError as exc:
        return MalformedMessage(seq, readable_op, str(exc))


# -- builders: every message of the exchange is made here, both ways --------------
# Each returns the message as a JSON-ready dict; the sender encodes it (the
# agent with the stdlib, the server with orjson) and, where the message is
# numbered by its sender's store, adds ``seq`` there.


def operation_message(seq: int, op: int, body: str, sig: str) -> dict[str, Any]:
    """Server -> agent: run operation ``op`` (``body`` from ``orders.operation_body``)."""
    return {"seq": seq, "type": "operation", "op": op, "body": body, "sig": sig}


def relay_field(url: str | None) -> bytes:
    """Server -> agent: ``,"relay":URL`` to splice into a reply (``b""``: no URL, none)."""
    return b',"relay":' + json.dumps(url).encode() if url else b""


def cancel_message(seq: int, op: int, body: str, sig: str) -> dict[str, Any]:
    """Server -> agent: stop operation ``op`` (``body`` from ``orders.cancel_body``)."""
    return {"seq": seq, "type": "cancel", "op": op, "body": body, "sig": sig}


def terminate_message(seq: int, op: int, body: str, sig: str) -> dict[str, Any]:
    """Server -> agent: terminate job operation ``op`` (``body`` from
    ``orders.terminate_body``)."""
    return {"seq": seq, "type": "terminate", "op": op, "body": body, "sig": sig}


def windows_message(seq: int, op: int, body: str, sig: str) -> dict[str, Any]:
    """Server -> agent: job operation ``op``'s new maintenance windows (``body`` from
    ``orders.windows_body``)."""
    return {"seq": seq, "type": "windows", "op": op, "body": body, "sig": sig}


def operation_status(
    op: int, status: str, attempt: int, until: float | None, reason: str
) -> dict[str, Any]:
    """Agent -> server: ``op`` is working, deferred or failed an attempt (no ``seq``:
    the agent's state numbers it when it is queued to send)."""
    return {
        "type": "operation-status",
        "op": op,
        "status": status,
        "attempt": attempt,
        "until": until,
        "reason": reason,
    }


def operation_result(
    op: int,
    status: str,
    result_line: str,
    *,
    exit_code: int | None = None,
    stdout: str = "",
    stderr: str = "",
    **run: Any,
) -> dict[str, Any]:
    """Agent -> server: what happened to ``op`` (no ``seq``, as above). ``run`` adds
    what a run measured: ``stdout_dropped``, ``stderr_dropped``, ``started_at``,
    ``ended_at``, and ``recurring`` for one run of a recurring operation."""
    unknown = set(run) - _RESULT_RUN_FIELDS
    if unknown:
        raise TypeError(f"operation_result: unknown fields {sorted(unknown)}")
    return {
        "type": "operation-result",
        "op": op,
        "status": status,
        "result_line": result_line,
        "exit_code": exit_code,
        "stdout": stdout,
        "stderr": stderr,
        **run,
    }


_RESULT_RUN_FIELDS = frozenset(
    {"stdout_dropped", "stderr_dropped", "started_at", "ended_at", "recurring"}
)


def refused_message(server_seq: int, op: int | None, reason: str, text: str) -> dict[str, Any]:
    """Agent -> server: server message ``server_seq`` (naming ``op``, if readable) was
    not acted on, for ``reason`` (``REFUSAL_REASONS``); no ``seq``, as above."""
    if reason not in REFUSAL_REASONS:
        raise ValueError(f"refused_message: unknown reason {reason!r}")
    return {
        "type": "refused",
        "server_seq": server_seq,
        "op": op,
        "reason": reason,
        "text": text[:MAX_TEXT_CHARS],
    }


def canonical(obj: Any) -> str:
    """The exact text that is signed: sorted keys, no spaces, ASCII only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
