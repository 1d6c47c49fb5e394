"""The outbox: the one place that numbers server -> agent messages and queues them.

Contract: an :class:`Outbox` lives for one writer transaction; ``append`` gives a
computer's next message the next ``seq`` (after what the caller says was last used)
and stores its text verbatim, so a resend is byte for byte what was sent first.
The exchange's hand-out (``server/exchange.py``), a cancel (``server/requests.py``)
and a terminate (``server/jobs.py``) all go through it; the messages themselves are
built by ``protocol.exchange``.

On PostgreSQL several server processes may append for one computer, so memory is
not the truth there: ``lock`` reads the computers' last seq from their ``computers``
rows under a row lock (``SELECT ... FOR UPDATE``, in id order, as the exchange does:
no deadlock between them) in the caller's transaction, before anything is appended;
the caller refreshes memory from ``last()`` after the commit. On SQLite (one process)
``lock`` does nothing and the in-memory counters stay the truth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.store.schema import computers, outbox


async def lock_counters(conn: AsyncConnection, computer_ids: Iterable[int]) -> dict[int, Any]:
    """PostgreSQL: the computers' rows (``id, generation, removed_at, in_acked, out_seq,
    out_acked``), locked for this transaction in id order (every writer that locks
    several takes them in that order, so two processes never deadlock on them)."""
    ids = sorted(set(computer_ids))
    if not ids:
        return {}
    rows = await conn.execute(
        sa.select(
            computers.c.id,
            computers.c.generation,
            computers.c.removed_at,
            computers.c.in_acked,
            computers.c.out_seq,
            computers.c.out_acked,
        )
        .where(computers.c.id.in_(ids))
        .order_by(computers.c.id)
        .with_for_update()
    )
    return {row.id: row for row in rows}


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

    async def lock(self, conn: AsyncConnection, computer_ids: Iterable[int]) -> None:
        """PostgreSQL: lock these computers' rows and number from their stored
        ``out_seq`` (another process may have used more than memory knows). Call it
        before the transaction touches their activities (the exchange locks computers
        first too). SQLite: nothing (memory is the truth)."""
        if conn.dialect.name != "postgresql":
            return
        for cid, row in (await lock_counters(conn, computer_ids)).items():
            self._last.setdefault(cid, row.out_seq)

    def last(self) -> dict[int, int]:
        """computer id -> the last seq this outbox used (memory takes it after the commit)."""
        out: dict[int, int] = {}
        for row in self._rows:
            out[row["computer_id"]] = row["seq"]
        return out

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
                [{"b_id": cid, "seq": seq} for cid, seq in self.last().items()],
            )
