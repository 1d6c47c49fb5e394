"""Signed orders: the texts the server signs for one computer, and the agent's check of them.

Contract:
* Every order the server gives an agent (an ``operation`` to run, a ``cancel``
  to stop one, a ``terminate`` to wind a job down, a job's new ``windows``)
  carries a canonical JSON text (``body``, from
  :func:`operation_body` or :func:`cancel_body`) signed with the server's
  Ed25519 key (``sig``). The text names the computer, its enrollment
  generation and the operation id; a cancel or terminate also names its kind
  (``"order": "cancel"``; an operation's text has no ``order``), so one kind of
  signed text can never pass for another.
* :func:`open_order` is what the agent does before it stores or acts on an
  order: the signature must verify with the server key it got at enrollment,
  and the text must be the order the message says it is, for the operation the
  message names, for this computer and this generation. Otherwise it raises
  :class:`Refusal` with a reason code from ``exchange.REFUSAL_REASONS``, which
  the agent reports to the server in a ``refused`` message.
* So a relay (a man in the middle) can delay or drop orders but cannot invent,
  alter, redirect or re-purpose one; a replayed order is caught by the agent's
  own record of the operations it already has (``agent/operations.py``).
"""

from __future__ import annotations

import json
from typing import Any

from taskfleet.protocol.exchange import canonical
from taskfleet.protocol.signing import SignatureError, Verifier

OPERATION = "operation"
CANCEL = "cancel"
TERMINATE = "terminate"
WINDOWS = "windows"


class Refusal(ValueError):
    """An order that is not genuinely for this computer: never acted on, reported."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(f"{reason}: {text}")
        self.reason = reason  # one of exchange.REFUSAL_REASONS
        self.text = text


def operation_body(
    *,
    computer: int,
    generation: int,
    op: int,
    type: str,
    params: Any,
    policy: dict[str, Any],
    timeout: float,
    issued_at: float,
    windows: list[dict[str, Any]] | None = None,
) -> str:
    """An operation's payload as the exact text the server signs. ``windows``: a job's
    computer's maintenance windows at hand-out (``domain.jobs.parse_windows``), only
    when it has some; without them the text is what it always was."""
    payload = {
        "computer": computer,
        "generation": generation,
        "op": op,
        "type": type,
        "params": params,
        "policy": policy,
        "timeout": timeout,
        "issued_at": issued_at,
    }
    if windows:
        payload["windows"] = windows
    return canonical(payload)


def cancel_body(*, computer: int, generation: int, op: int) -> str:
    """A cancel order as the exact text the server signs: small, it names no more than
    whom it is for and what it stops (a cancel repeated does nothing more)."""
    return canonical({"computer": computer, "generation": generation, "op": op, "order": CANCEL})


def terminate_body(*, computer: int, generation: int, op: int) -> str:
    """A terminate order (``protocol/jobs.py``) as the exact text the server signs; its
    kind differs from a cancel's, so neither can pass for the other."""
    return canonical({"computer": computer, "generation": generation, "op": op, "order": TERMINATE})


def windows_body(
    *, computer: int, generation: int, op: int, windows: list[dict[str, Any]], issued_at: float
) -> str:
    """A job's computer's maintenance windows changed after hand-out: the whole new list
    (empty: none any more) as the exact text the server signs. ``issued_at`` orders
    them: the agent keeps the latest it saw, so a relay replaying an older one cannot
    bring old windows back."""
    return canonical(
        {
            "computer": computer,
            "generation": generation,
            "op": op,
            "order": WINDOWS,
            "windows": windows,
            "issued_at": issued_at,
        }
    )


def open_order(
    verifier: Verifier,
    body: str,
    sig: str,
    *,
    kind: str,
    op: int,
    computer: int,
    generation: int,
) -> dict[str, Any]:
    """The payload of a signed order of ``kind`` for ``op``, checked to be genuinely
    meant for this computer and generation; :class:`Refusal` otherwise."""
    if not body or not sig:
        raise Refusal("bad-signature", f"the {kind} is not signed")
    try:
        verifier.verify(body, sig)
    except SignatureError:
        raise Refusal("bad-signature", f"the {kind}'s signature does not verify") from None
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        # Signed by the server, yet not an order: never made by this protocol.
        raise Refusal("malformed", f"the signed text of the {kind} is not an object")
    signed_kind = payload.get("order", OPERATION)
    if signed_kind != kind:
        raise Refusal("bad-signature", f"a signed {signed_kind!s:.20} sent as a {kind}")
    if payload.get("computer") != computer:
        raise Refusal(
            "wrong-computer", f"the {kind} is for computer {payload.get('computer')!s:.20}"
        )
    if payload.get("generation") != generation:
        raise Refusal(
            "wrong-generation",
            f"the {kind} is for enrollment generation {payload.get('generation')!s:.20}, "
            f"this computer is at {generation}",
        )
    if payload.get("op") != op:
        raise Refusal(
            "bad-signature",
            f"the message names operation {op}, its signed text {payload.get('op')!s:.20}",
        )
    return payload
