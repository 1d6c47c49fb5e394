"""What a multi-phase job adds to the exchange (SPEC 6): step reports up, terminate down.

Contract:

* A job reaches a computer as an ``operation`` of type ``job`` (``domain/jobs.py``
  validates its params: phases and items). The agent reports each step of it as it
  happens in a ``job-step`` message: operation ``op``, ``phase`` (one of ``PHASES``),
  ``item`` (the item's index in the job's items), ``status`` (``STEP_STATUSES``
  in ``domain/jobs.py``:
  ``started`` when the step begins, then ``succeeded``, ``failed`` or ``skipped``),
  a ``detail`` line and ``at`` (the computer's clock). Reports of one step may come
  more than once (a resend, a resumed job): the last one is the step's status. The
  job's end is the operation's ``operation-result`` as for any operation: status
  ``succeeded`` (every step ran and none failed), ``failed`` (every step ran, one
  failed) or ``canceled`` (not every step ran: terminated or canceled).
* ``terminate`` (server -> agent, in ``exchange.py``) is a signed order
  (``orders.terminate_body``), distinct from ``cancel``: the agent finishes the step
  it is on (Analyze: the whole phase), skips the rest, starts no later phase and
  removes the job's staged content. ``cancel`` still stops at once.
* Content is fetched by hash from the computer's relay, else the server, at
  ``CONTENT_PATH`` + the SHA-256 in lowercase hex, with the exchange's agent
  credentials; a relay fetches what it lacks from the server at
  ``RELAY_CONTENT_PATH`` + hash with its own (``server/content.py``,
  ``relay/content.py``). Both answer ``Range: bytes=N-`` (206) so a download
  resumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from taskfleet.domain.jobs import PHASES, STEP_STATUSES
from taskfleet.protocol.fields import ProtocolError, int_field, num_field, str_field
from taskfleet.settings import INT32_MAX

MAX_DETAIL_CHARS = 2000

CONTENT_PATH = "/agent/v1/content/"
RELAY_CONTENT_PATH = "/relay/v1/content/"


@dataclass(frozen=True)
class JobStep:
    seq: int
    op: int
    phase: str
    item: int
    status: str
    detail: str
    at: float | None


def parse_job_step(msg: dict[str, Any]) -> JobStep:
    phase, status = msg.get("phase"), msg.get("status")
    if phase not in PHASES:
        raise ProtocolError(f"'phase' must be one of {list(PHASES)}")
    if status not in STEP_STATUSES:
        raise ProtocolError(f"'status' must be one of {list(STEP_STATUSES)}")
    return JobStep(
        seq=int_field(msg, "seq", minimum=1) or 0,
        op=int_field(msg, "op", minimum=1) or 0,
        phase=phase,
        item=int_field(msg, "item", maximum=INT32_MAX) or 0,
        status=status,
        detail=str_field(msg, "detail", MAX_DETAIL_CHARS),
        at=num_field(msg, "at"),
    )


def job_step(op: int, phase: str, item: int, status: str, detail: str, at: float) -> dict[str, Any]:
    """Agent -> server: step (``phase``, ``item``) of job operation ``op`` is ``status``
    (no ``seq``: the agent's state numbers it when it is queued to send)."""
    if phase not in PHASES or status not in STEP_STATUSES:
        raise ValueError(f"job_step: bad phase {phase!r} or status {status!r}")
    return {
        "type": "job-step",
        "op": op,
        "phase": phase,
        "item": item,
        "status": status,
        "detail": detail[:MAX_DETAIL_CHARS],
        "at": at,
    }
