"""Hints between the server processes on one database (issue 16): "these computers
have work", "these computers/relays changed", and any topic another part subscribes to.

Contract:
* ``Hints`` is the port and the in-process implementation (SQLite: one process, so
  nothing to send: ``publish`` does nothing and no handler is ever called).
* ``PgHints`` sends hints with PostgreSQL ``NOTIFY`` on channel ``HINTS_CHANNEL``
  and hears them on a dedicated ``LISTEN`` connection (``application_name``
  ``HINTS_APPLICATION pid``, to be found in ``pg_stat_activity``).
* ``work(ids)`` is called after a commit that gave computers work (``Fleet.on_work``);
  ``publish_ids(topic, ids)`` is the same for any topic: ids of one topic published
  at the same moment are coalesced into one hint, split so each payload stays under
  NOTIFY's 8000 bytes (``HINTS_PAYLOAD_MAX``), or sent as "all" past
  ``HINTS_ALL_OVER`` ids. ``publish_entries(topic, entries)`` sends keyed JSON
  entries the same way (coalesced by key: the last one of a key wins; a body is a
  JSON list of them). ``publish(topic, body)`` sends any other short hint.
* ``subscribe(topic, handler)``: ``handler(body)`` is called for each hint of that topic
  from ANOTHER process (a process's own hints are not echoed to it: it acted on them
  already); it may be a coroutine function. Topics used here: ``work`` (ids, or
  "all"), ``computers`` and ``relays`` (ids to reload, ``server/fleet_load.py``),
  ``windows`` (reload the maintenance windows), ``task-cancel`` (server task ids
  canceled while running: the embedded worker that runs one stops it), ``tasks``
  (ids of server tasks submitted elsewhere: the leader's scheduler reads those at
  once), ``tickle`` (wake-ups for the leader to send, ``server/tickler.py``), ``reach``
  (where computers' and relays' wake-ups go changed: ``Fleet.reach``).
* Hints are hints: one may be lost (a listener reconnecting, a process starting).
  After every (re)connect of the listener each ``on_connect`` callback runs (the
  fleet's catch-up: every computer looks once, as at load), and every
  ``HINTS_CHECK_INTERVAL`` the listener NOTIFYs itself: not heard back within
  ``HINTS_CHECK_TIMEOUT`` (or the connection closed), it reconnects.
* A hint that cannot be sent (the database is away) is kept and sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from taskfleet.aio import wait_set
from taskfleet.settings import (
    HINTS_ALL_OVER,
    HINTS_APPLICATION,
    HINTS_CHANNEL,
    HINTS_CHECK_INTERVAL,
    HINTS_CHECK_TIMEOUT,
    HINTS_PAYLOAD_MAX,
    HINTS_RETRY,
)
from taskfleet.store import db

log = logging.getLogger("taskfleet.server")
Handler = Callable[[str], Awaitable[None] | None]
WORK = "work"
WINDOWS = "windows"  # a group's maintenance window or membership changed: reload
TASK_CANCEL = "task-cancel"  # server tasks canceled while running: stop them if here
TASKS = "tasks"  # ids of server tasks a process that does not lead took: read them now
TICKLE = "tickle"  # wake-ups for the leader to send (server/tickler.py)
REACH = "reach"  # where computers' and relays' wake-ups go changed (Fleet.reach)
ALL = "all"
_PING = "ping"


def parse_ids(body: str) -> list[int] | None:
    """A hint's ids (None: "all"); what is not a number is skipped."""
    if body == ALL:
        return None
    return [int(x) for x in body.split(",") if x.isdigit()]


def parse_entries(body: str) -> list[Any]:
    """A hint's JSON list of entries (none if it is not one); each is checked by its user."""
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []
    return raw if isinstance(raw, list) else []


def split_ids(ids: Iterable[int], limit: int = HINTS_PAYLOAD_MAX) -> list[str]:
    """Comma-separated ids in bodies of at most ``limit`` characters."""
    out: list[str] = []
    cur = ""
    for i in sorted(set(ids)):
        s = str(i)
        if cur and len(cur) + 1 + len(s) > limit:
            out.append(cur)
            cur = ""
        cur = f"{cur},{s}" if cur else s
    if cur:
        out.append(cur)
    return out


def split_entries(entries: Iterable[bytes], limit: int = HINTS_PAYLOAD_MAX) -> list[str]:
    """JSON-encoded entries as JSON lists of at most ``limit`` characters each (an
    entry longer than that alone is dropped: a hint is never worth a failed NOTIFY)."""
    out: list[str] = []
    cur: list[bytes] = []
    size = 2
    for e in entries:
        if len(e) + 2 > limit:
            log.warning("a hint entry of %d bytes dropped", len(e))
            continue
        if cur and size + 1 + len(e) > limit:
            out.append((b"[" + b",".join(cur) + b"]").decode())
            cur, size = [], 2
        size += len(e) + (1 if cur else 0)
        cur.append(e)
    if cur:
        out.append((b"[" + b",".join(cur) + b"]").decode())
    return out


class Hints:
    """In-process hints (SQLite: one process, nobody else to tell)."""

    def __init__(self) -> None:
        self.handlers: dict[str, list[Handler]] = {}
        self.connect_callbacks: list[Callable[[], None]] = []

    def subscribe(self, topic: str, handler: Handler) -> None:
        """``handler(body)`` for each ``topic`` hint another process sends."""
        self.handlers.setdefault(topic, []).append(handler)

    def on_connect(self, callback: Callable[[], None]) -> None:
        """``callback()`` after every (re)connect: hints may have been missed."""
        self.connect_callbacks.append(callback)

    def work(self, computer_ids: Iterable[int]) -> None:
        """These computers have work (after the commit that gave it)."""
        self.publish_ids(WORK, computer_ids)

    def publish_ids(self, topic: str, ids: Iterable[int]) -> None:
        """Tell the other processes about these ids (coalesced with others of the topic)."""

    def publish_entries(self, topic: str, entries: Mapping[str, Any]) -> None:
        """Tell the other processes these keyed JSON entries (coalesced by key)."""

    def publish(self, topic: str, body: str) -> None:
        """Tell the other processes (``body``: short text, under HINTS_PAYLOAD_MAX)."""

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


class PgHints(Hints):
    """Hints over PostgreSQL LISTEN/NOTIFY (module docstring)."""

    def __init__(
        self,
        database_url: str,
        *,
        check_interval: float = HINTS_CHECK_INTERVAL,
        check_timeout: float = HINTS_CHECK_TIMEOUT,
    ) -> None:
        super().__init__()
        self.origin = secrets.token_hex(6)  # this process: its own hints are not echoed
        self.check_interval, self.check_timeout = check_interval, check_timeout
        self.connects = 0  # listener connections made (tests, logs)
        url = db.database_url(database_url)
        app = {"server_settings": {"application_name": f"{HINTS_APPLICATION} {os.getpid()}"}}
        self._listen_engine = create_async_engine(url, poolclass=NullPool, connect_args=app)
        # No pre-ping: a NOTIFY that fails is sent again on a new connection.
        self._send_engine: AsyncEngine = create_async_engine(url, pool_size=1, max_overflow=0)
        self._ids: dict[str, set[int]] = {}  # topic -> ids to send
        self._all: set[str] = set()  # topics to send as "all"
        self._entries: dict[str, dict[str, bytes]] = {}  # topic -> key -> JSON entry
        self._out: list[tuple[str, str]] = []
        self._wake = asyncio.Event()
        self._pong = asyncio.Event()
        self._ping = ""
        self._tasks: list[asyncio.Task[None]] = []
        self._running: set[asyncio.Future[Any]] = set()  # handlers that are coroutines

    def publish_ids(self, topic: str, ids: Iterable[int]) -> None:
        new = set(ids)
        if not new or topic in self._all:
            return
        pending = self._ids.setdefault(topic, set())
        pending.update(new)
        if len(pending) > HINTS_ALL_OVER:
            self._all.add(topic)
            del self._ids[topic]
        self._wake.set()

    def publish_entries(self, topic: str, entries: Mapping[str, Any]) -> None:
        pending = self._entries.setdefault(topic, {})
        for key, entry in entries.items():
            try:
                pending[key] = orjson.dumps(entry)
            except TypeError:  # not JSON (text with a lone surrogate): skipped, not fatal
                log.warning("a %s hint entry that is not JSON dropped", topic)
        if pending:
            self._wake.set()

    def publish(self, topic: str, body: str) -> None:
        self._out.append((topic, body))
        self._wake.set()

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._send_loop(), name="hints-send"),
            asyncio.create_task(self._listen_loop(), name="hints-listen"),
        ]

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._flush(), 5.0)  # what the last commits said
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._listen_engine.dispose()
        await self._send_engine.dispose()

    # -- sending ---------------------------------------------------------------------

    def _take(self) -> list[tuple[str, str]]:
        """What is to be sent, as (topic, body), emptied."""
        items = self._out
        items += [(topic, ALL) for topic in self._all]
        for topic, ids in self._ids.items():
            items += [(topic, b) for b in split_ids(ids)]
        for topic, entries in self._entries.items():
            items += [(topic, b) for b in split_entries(entries.values())]
        self._out, self._ids, self._all, self._entries = [], {}, set(), {}
        return items

    async def _flush(self) -> None:
        items = self._take()
        if not items:
            return
        try:
            async with self._send_engine.connect() as conn:
                for topic, body in items:
                    await _notify(conn, f"{self.origin} {topic} {body}")
                await conn.commit()
        except Exception:
            # Kept and sent again: a hint the others never hear delays work there
            # until their long polls end or their listener reconnects.
            self._out = items + self._out
            raise

    async def _send_loop(self) -> None:
        delay = HINTS_RETRY[0]
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._flush()
                delay = HINTS_RETRY[0]
            except Exception as exc:
                log.warning("sending hints failed (%s); again in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, HINTS_RETRY[1])
                self._wake.set()

    # -- listening -------------------------------------------------------------------

    def _heard(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        origin, _, rest = payload.partition(" ")
        topic, _, body = rest.partition(" ")
        if origin == self.origin:
            if topic == _PING and body == self._ping:
                self._pong.set()
            return
        for handler in self.handlers.get(topic, []):
            try:
                res = handler(body)
            except Exception:
                log.exception("hint handler for %r failed", topic)
                continue
            if res is not None:
                task = asyncio.ensure_future(res)
                self._running.add(task)
                task.add_done_callback(self._handled)

    def _handled(self, task: asyncio.Future[Any]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("hint handler failed: %r", task.exception())

    async def _listen_loop(self) -> None:
        delay = HINTS_RETRY[0]
        while True:
            try:
                await self._listen_once()
                delay = HINTS_RETRY[0]
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("hints listener: %s; reconnecting in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, HINTS_RETRY[1])

    async def _listen_once(self) -> None:
        """One listener session: LISTEN, catch up, then self-check until it fails."""
        conn = await self._listen_engine.connect()
        try:
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            lost = asyncio.Event()
            raw.add_termination_listener(lambda _c: lost.set())
            await raw.add_listener(HINTS_CHANNEL, self._heard)
            self.connects += 1
            log.info("hints listener connected (%d)", self.connects)
            for callback in self.connect_callbacks:  # what was missed while away
                try:
                    callback()
                except Exception:
                    log.exception("hints catch-up failed")
            while not lost.is_set():
                self._ping = secrets.token_hex(4)
                self._pong.clear()
                await raw.execute(
                    "SELECT pg_notify($1, $2)", HINTS_CHANNEL, f"{self.origin} {_PING} {self._ping}"
                )
                if not await wait_set(self._pong, self.check_timeout):
                    log.warning("hints listener did not hear itself; reconnecting")
                    return
                await wait_set(lost, self.check_interval)
            log.warning("hints listener connection closed; reconnecting")
        finally:
            with contextlib.suppress(Exception):
                await conn.close()


async def _notify(conn: AsyncConnection, payload: str) -> None:
    await conn.execute(sa.text("SELECT pg_notify(:c, :p)"), {"c": HINTS_CHANNEL, "p": payload})
