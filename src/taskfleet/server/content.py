"""Content addressed by SHA-256: the bytes on the server's disk, their metadata per tenant.

Contract:

* Bytes live at ``DATA_DIR/content/<sha[:2]>/<sha>`` (folders 0700, files 0600); the
  ``content`` table holds per tenant what describes them (size, name, who added it,
  when). The same bytes are one file however many tenants (or uploads) add them.
* ``ContentStore.receive`` streams an upload to a temporary file in the content folder
  while hashing it (never held whole in memory), refuses it past ``limit`` bytes
  (413) or when it does not hash to the ``expected`` value (400), fsyncs it; then
  ``add`` renames it into place (or drops it: the file is already there) and records
  the caller's row, under a per-hash lock that ``remove`` takes too, so a file is
  never deleted while an upload of the same bytes is being recorded. Same bytes
  again for the same tenant: the row is kept as it was (``created`` false).
* Every read and write is the caller's tenant only; another tenant's content is
  answered exactly as content that does not exist (404).
* ``remove`` refuses (409, naming them) while an unfinished job (one of its
  activities not final) or an active job schedule of the tenant references the hash;
  the file is deleted only when no tenant's row references it any more.
* Adds and removes are audited (``content.add``, ``content.remove``).
* A server killed mid-upload leaves a temporary file; ``prepare`` (at start) removes
  such leftovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.jobs import JOB, JobSpecError, validate_job_spec
from taskfleet.domain.states import FINAL_STATES
from taskfleet.protocol.content import valid_sha256
from taskfleet.server.kernel import ApiError, Principal, audit
from taskfleet.store.schema import activities, content, jobs, requests, schedules

log = logging.getLogger("taskfleet.server")

FOLDER = "content"
_TMP = ".upload-"  # temporary files of uploads in progress (removed at start)
NAME_MAX = 255  # characters of a content's name (the column's width)


def check_sha(sha256: str) -> str:
    """The hash as stored (lowercase), or a 404 that says why it names nothing."""
    sha = sha256.lower()
    if not valid_sha256(sha):
        raise ApiError(404, f"no content {sha256[:80]!r}: a content hash is 64 hex digits")
    return sha


def check_name(name: str) -> str:
    if not name or len(name) > NAME_MAX:
        raise ApiError(400, f"a content name must be 1..{NAME_MAX} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise ApiError(400, "a content name must not hold control characters")
    return name


@dataclass
class Received:
    """An upload on disk, hashed and fsynced, not yet in place."""

    sha256: str
    size: int
    tmp: Path


class ContentStore:
    """The content folder of one server process, and the per-hash locks."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / FOLDER
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    def prepare(self) -> None:
        """Make the folder (0700) and remove uploads a previous run left half done."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for leftover in self.root.glob(_TMP + "*"):
            with contextlib.suppress(OSError):
                leftover.unlink()
                log.info("removed %s, an upload a previous run did not finish", leftover.name)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    @contextlib.asynccontextmanager
    async def lock(self, sha256: str) -> AsyncIterator[None]:
        """Hold the hash: its file's presence and its rows change together."""
        lock = self._locks.setdefault(sha256, asyncio.Lock())
        self._users[sha256] = self._users.get(sha256, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._users[sha256] -= 1
            if not self._users[sha256]:
                del self._users[sha256], self._locks[sha256]

    async def receive(
        self, chunks: AsyncIterator[bytes], *, limit: int, expected: str | None
    ) -> Received:
        """Stream ``chunks`` to a temporary file while hashing (module docstring)."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.root / f"{_TMP}{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        h = hashlib.sha256()
        size = 0
        done = False
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"content over {limit} bytes")
                h.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            sha = h.hexdigest()
            if expected is not None and sha != expected:
                raise ApiError(
                    400,
                    f"the bytes received hash to {sha}, not {expected} as the "
                    "X-Content-SHA256 header says: nothing stored",
                )
            await asyncio.to_thread(os.fsync, fd)
            done = True
        finally:
            os.close(fd)
            if not done:
                with contextlib.suppress(OSError):
                    tmp.unlink()
        return Received(sha, size, tmp)

    def place(self, r: Received) -> bool:
        """Move an upload into place; False (and the upload dropped) when the same bytes
        are there already. Call it holding ``lock(r.sha256)``."""
        final = self.path(r.sha256)
        if final.exists():
            r.tmp.unlink(missing_ok=True)
            return False
        final.parent.mkdir(mode=0o700, exist_ok=True)
        os.replace(r.tmp, final)
        _fsync_dir(final.parent)
        return True

    def discard(self, sha256: str) -> None:
        """Delete a file no row references any more. Call it holding ``lock(sha256)``."""
        final = self.path(sha256)
        with contextlib.suppress(FileNotFoundError):
            final.unlink()
            _fsync_dir(final.parent)
        with contextlib.suppress(OSError):
            final.parent.rmdir()  # only when empty


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the rows ------------------------------------------------------------------------

_COLUMNS = (
    content.c.sha256,
    content.c.size,
    content.c.name,
    content.c.created_by,
    content.c.created_at,
)


async def add(
    conn: AsyncConnection, p: Principal, sha256: str, size: int, name: str, now: float
) -> tuple[dict[str, Any], bool]:
    """The caller's row for these bytes, made if it was not there (and audited);
    returns it and whether it was made."""
    row = await _row(conn, p.tenant_id, sha256)
    if row is not None:
        return row, False
    await conn.execute(
        content.insert().values(
            tenant_id=p.tenant_id,
            sha256=sha256,
            size=size,
            name=name,
            created_by=p.actor,
            created_at=now,
        )
    )
    await audit(conn, p, "content.add", now, sha256=sha256, size=size, name=name)
    made = await _row(conn, p.tenant_id, sha256)
    assert made is not None
    return made, True


async def _row(conn: AsyncConnection, tenant_id: int, sha256: str) -> dict[str, Any] | None:
    row = (
        await conn.execute(
            sa.select(*_COLUMNS).where(content.c.tenant_id == tenant_id, content.c.sha256 == sha256)
        )
    ).first()
    return None if row is None else dict(row._mapping)


async def size_of(conn: AsyncConnection, tenant_id: int, sha256: str) -> int | None:
    """The size of the tenant's content ``sha256``, or None: it has none by that hash."""
    row = await _row(conn, tenant_id, sha256)
    return None if row is None else int(row["size"])


async def referenced(conn: AsyncConnection, sha256: str) -> bool:
    """Whether any tenant has a row for ``sha256`` (its file must stay)."""
    n = (
        await conn.execute(sa.select(sa.func.count()).where(content.c.sha256 == sha256))
    ).scalar_one()
    return int(n) > 0


async def list_content(conn: AsyncConnection, p: Principal) -> list[dict[str, Any]]:
    rows = await conn.execute(
        sa.select(*_COLUMNS)
        .where(content.c.tenant_id == p.tenant_id)
        .order_by(content.c.created_at, content.c.sha256)
    )
    return [dict(r._mapping) for r in rows]


async def get_content(conn: AsyncConnection, p: Principal, sha256: str) -> dict[str, Any]:
    """The caller's content ``sha256`` and the ids of the jobs whose params name it."""
    row = await _row(conn, p.tenant_id, sha256)
    if row is None:
        raise ApiError(404, f"no content {sha256}")
    users = await referencing_jobs(conn, p.tenant_id, sha256)
    row["jobs"] = sorted(users)
    row["unfinished_jobs"] = sorted(j for j, unfinished in users.items() if unfinished)
    return row


async def referencing_jobs(conn: AsyncConnection, tenant_id: int, sha256: str) -> dict[int, bool]:
    """Job id -> whether it is unfinished, for every job of the tenant whose params
    reference ``sha256``."""
    rows = await conn.execute(
        sa.select(jobs.c.request_id, requests.c.params)
        .join(requests, requests.c.id == jobs.c.request_id)
        .where(jobs.c.tenant_id == tenant_id)
    )
    users = [r.request_id for r in rows if sha256 in _hashes(r.params)]
    if not users:
        return {}
    open_rows = await conn.execute(
        sa.select(activities.c.request_id)
        .where(
            activities.c.request_id.in_(users),
            activities.c.state.notin_([s.value for s in FINAL_STATES]),
        )
        .distinct()
    )
    unfinished = {r.request_id for r in open_rows}
    return {j: j in unfinished for j in users}


async def _referencing_schedules(conn: AsyncConnection, tenant_id: int, sha256: str) -> list[int]:
    """Active schedules of the tenant whose runs would create a job that names it."""
    rows = await conn.execute(
        sa.select(schedules.c.id, schedules.c.template).where(
            schedules.c.tenant_id == tenant_id, schedules.c.canceled_at.is_(None)
        )
    )
    return [
        r.id
        for r in rows
        if isinstance(r.template, dict)
        and r.template.get("type") == JOB
        and sha256 in _hashes(r.template.get("params"))
    ]


def _hashes(params: Any) -> set[str]:
    try:
        return validate_job_spec(params).content_hashes()
    except JobSpecError:
        return set()  # not a job's params (or not valid ones): it references nothing


async def remove(conn: AsyncConnection, p: Principal, sha256: str, now: float) -> bool:
    """Delete the caller's row (module docstring); returns whether the file is now
    unreferenced (no tenant has a row for it), so the caller deletes it."""
    row = await _row(conn, p.tenant_id, sha256)
    if row is None:
        raise ApiError(404, f"no content {sha256}")
    busy = sorted(
        j
        for j, unfinished in (await referencing_jobs(conn, p.tenant_id, sha256)).items()
        if unfinished
    )
    if busy:
        raise ApiError(
            409,
            f"content {sha256} is used by unfinished job(s) {', '.join(map(str, busy))}: "
            "remove it once they end (or terminate them)",
        )
    planned = await _referencing_schedules(conn, p.tenant_id, sha256)
    if planned:
        raise ApiError(
            409,
            f"content {sha256} is used by the job schedule(s) "
            f"{', '.join(map(str, planned))}: cancel them first",
        )
    await conn.execute(
        content.delete().where(content.c.tenant_id == p.tenant_id, content.c.sha256 == sha256)
    )
    await audit(conn, p, "content.remove", now, sha256=sha256, size=row["size"], name=row["name"])
    return not await referenced(conn, sha256)
