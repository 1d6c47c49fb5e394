"""The server's in-memory view of enrolled computers: the "has work" index.

Contract: one :class:`ComputerState` per enrolled computer, loaded at start and
kept in step by the single writer (``writer.py``). It answers, without touching
the database, whether an exchange has anything to do: a computer with no new
work, nothing unacknowledged and no new results costs a dict lookup and a hash.
Sequence counters here are only updated after the transaction that persisted
them commits. Memory per idle computer is a few hundred bytes (see benchmarks).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Iterable


def hash_secret(secret: str) -> str:
    # Secrets are 256-bit random strings, so a plain SHA-256 resists guessing;
    # a slow KDF would put milliseconds on every exchange for nothing.
    return hashlib.sha256(secret.encode()).hexdigest()


class ComputerState:
    __slots__ = (
        "address",
        "dirty",
        "generation",
        "has_work",
        "id",
        "in_acked",
        "last_seen",
        "out_acked",
        "out_seq",
        "secret_hash",
        "tenant_id",
        "tickle_port",
        "waiter",
    )

    def __init__(
        self,
        id: int,
        tenant_id: int,
        secret_hash: str,
        generation: int,
        in_acked: int = 0,
        out_seq: int = 0,
        out_acked: int = 0,
        address: str | None = None,
        tickle_port: int | None = None,
        last_seen: float | None = None,
    ) -> None:
        self.id = id
        self.tenant_id = tenant_id
        self.secret_hash = bytes.fromhex(secret_hash)
        self.generation = generation
        self.in_acked = in_acked
        self.out_seq = out_seq
        self.out_acked = out_acked
        self.address = address
        self.tickle_port = tickle_port
        self.last_seen = last_seen
        self.has_work = True  # unknown at load: the first exchange looks once
        self.dirty = False  # last_seen/address changed since the last flush
        self.waiter: asyncio.Event | None = None  # set while a long poll is held

    def check_secret(self, secret: str) -> bool:
        digest = hashlib.sha256(secret.encode()).digest()
        return hmac.compare_digest(digest, self.secret_hash)

    def wake(self) -> None:
        self.has_work = True
        if self.waiter is not None:
            self.waiter.set()


class Fleet:
    def __init__(self) -> None:
        self.computers: dict[int, ComputerState] = {}

    def get(self, computer_id: int) -> ComputerState | None:
        return self.computers.get(computer_id)

    def put(self, state: ComputerState) -> None:
        self.computers[state.id] = state

    def remove(self, computer_id: int) -> None:
        """A removed computer: its exchanges get 401 from now on; a held long poll ends."""
        cs = self.computers.pop(computer_id, None)
        if cs is not None and cs.waiter is not None:
            cs.waiter.set()

    def mark_work(self, computer_ids: Iterable[int]) -> list[ComputerState]:
        woken = []
        for cid in computer_ids:
            cs = self.computers.get(cid)
            if cs is not None:
                cs.wake()
                woken.append(cs)
        return woken

    def take_dirty(self) -> list[ComputerState]:
        out = [cs for cs in self.computers.values() if cs.dirty]
        for cs in out:
            cs.dirty = False
        return out
