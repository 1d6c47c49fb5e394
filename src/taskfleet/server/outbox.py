"""The outbox: the one place that numbers server -> agent messages and queues them.

Contract: an :class:`Outbox` lives for one writer transaction; ``append`` gives a
computer's next message the next ``seq`` (after what the caller says was last used)
and stores its text verbatim, so a resend is byte for byte what was sent first.
The exchange's hand-out (``server/exchange.py``), a cancel (``server/requests.py``)
and a terminate (``server/jobs.py``) all go through it; the messages themselves are
built by ``protocol.exchange``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.store.schema import computers, outbox


class Outbox:
    """Server -> agent messages appended in one transaction, numbered here and only here.

    ``last_seq(computer_id)`` is the last sequence number used for a computer
    before this transaction (the in-memory fleet's, or an exchange's pending
    counter); each ``append`` takes the next one.
    """

    def __init__(self, last_seq: Callable[[int], int]) -> None:
        self._before = last_seq
        self._last: dict[int, int] = {}
        self._rows: list[dict[str, Any]] = []

    def last_seq(self, computer_id: int) -> int:
        last = self._last.get(computer_id)
        return self._before(computer_id) if last is None else last

    def append(
        self,
        computer_id: int,
        tenant_id: int,
        build: Callable[[int], dict[str, Any]],
        *,
        fits: Callable[[str], bool] | None = None,
    ) -> str | None:
        """Number ``build(seq)`` and queue it for the computer; its text, or None (and
        nothing used) when ``fits`` refuses it. The text is stored verbatim: a
        resend is byte for byte what was sent first."""
        seq = self.last_seq(computer_id) + 1
        message = orjson.dumps(build(seq)).decode()
        if fits is not None and not fits(message):
            return None
        self._last[computer_id] = seq
        self._rows.append(
            {"computer_id": computer_id, "seq": seq, "tenant_id": tenant_id, "message": message}
        )
        return message

    def appended(self) -> dict[int, int]:
        """computer id -> how many messages this outbox appended for it."""
        out: dict[int, int] = {}
        for row in self._rows:
            out[row["computer_id"]] = out.get(row["computer_id"], 0) + 1
        return out

    async def write(self, conn: AsyncConnection, *, counters: bool) -> None:
        """Insert the messages; ``counters``: also store each computer's new last seq
        (an exchange stores it with its other counters instead)."""
        if not self._rows:
            return
        await conn.execute(outbox.insert(), self._rows)
        if counters:
            await conn.execute(
                computers.update()
                .where(computers.c.id == sa.bindparam("b_id"))
                .values(out_seq=sa.bindparam("seq")),
                [{"b_id": cid, "seq": seq} for cid, seq in self._last.items()],
            )
