"""The relay's content cache: what its agents download, fetched once from the server.

Contract:

* Files live at ``STATE_DIR/content/<sha256>`` (folder 0700, files 0600), named by
  the SHA-256 of their bytes; a file is there only once verified.
* ``acquire(sha)`` pins the content and returns its size: a hit serves the cached
  file; a miss fetches it from the server (``Upstream.open_content``, the relay's own
  credentials, a connection of its own) ONCE however many agents ask at the same time
  (single flight: the others wait for that fetch, and one waiter giving up does not
  stop it). The bytes go to a temporary file, are checked (SHA-256 = the name, size =
  the server's Content-Length), fsynced and only then renamed into the cache: a relay
  killed mid-fetch leaves only a temporary file, removed at the next start, and never
  serves a partial file. ``release(sha)`` unpins it.
* Failures are :class:`FetchError` with the status agents are answered: 404 (the
  server has no such content for this relay's tenant), 502 (the server sent bytes
  that do not match, or an answer that is not one; nothing cached), 503 (the server
  cannot be reached or refuses this relay, or the cache cannot be written: retry, or
  fetch from the server directly).
* LRU by total size: after each fetch and each release, the least recently used
  files go until the total is at most ``cap`` bytes; a pinned file (being served, or
  being waited for) is never evicted, so the total may exceed the cap while it is.
  A hit touches the file's mtime, so the order survives a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from taskfleet.agent.http import HttpError, Streamed, error_text
from taskfleet.protocol.content import valid_sha256
from taskfleet.relay import metrics
from taskfleet.settings import CONTENT_CHUNK

log = logging.getLogger("taskfleet.relay")

_TMP = ".fetch-"

Opener = Callable[[str], AbstractAsyncContextManager[Streamed]]


class FetchError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ContentCache:
    def __init__(self, folder: Path, cap: int, opener: Opener) -> None:
        self.folder = folder
        self.cap = cap
        self.opener = opener  # sha -> the server's streamed answer (Upstream.open_content)
        self.sizes: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self.total = 0
        self.pins: dict[str, int] = {}
        self.inflight: dict[str, asyncio.Task[None]] = {}
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        found = []
        for path in folder.iterdir():
            if path.name.startswith(_TMP) or not valid_sha256(path.name):
                # A fetch a killed relay did not finish (or a stranger): never served.
                with contextlib.suppress(OSError):
                    path.unlink()
                    log.info("removed %s from the content cache (not a verified file)", path.name)
                continue
            st = path.stat()
            found.append((st.st_mtime, path.name, st.st_size))
        for _, sha, size in sorted(found):
            self.sizes[sha] = size
            self.total += size
        metrics.CONTENT_CACHE_BYTES.set(self.total)
        self._evict()

    def path(self, sha256: str) -> Path:
        return self.folder / sha256

    async def acquire(self, sha256: str) -> int:
        """Pin ``sha256`` and return its size, fetching it first on a miss; FetchError."""
        self.pins[sha256] = self.pins.get(sha256, 0) + 1
        try:
            size = self.sizes.get(sha256)
            if size is not None:
                metrics.CONTENT_HITS.inc()
                self.sizes.move_to_end(sha256)
                with contextlib.suppress(OSError):
                    os.utime(self.path(sha256))
                return size
            metrics.CONTENT_MISSES.inc()
            task = self.inflight.get(sha256)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._fetch(sha256))
                self.inflight[sha256] = task
                task.add_done_callback(lambda _t: self.inflight.pop(sha256, None))
                task.add_done_callback(_settled)
            await asyncio.shield(task)
            return self.sizes[sha256]
        except BaseException:
            self.release(sha256)
            raise

    def release(self, sha256: str) -> None:
        left = self.pins.get(sha256, 0) - 1
        if left > 0:
            self.pins[sha256] = left
        else:
            self.pins.pop(sha256, None)
        self._evict()

    @contextlib.asynccontextmanager
    async def pinned(self, sha256: str) -> AsyncIterator[int]:
        size = await self.acquire(sha256)
        try:
            yield size
        finally:
            self.release(sha256)

    def _evict(self) -> None:
        if self.total <= self.cap:
            return
        for sha in list(self.sizes):
            if self.total <= self.cap:
                break
            if sha in self.pins:
                continue  # being served or waited for
            size = self.sizes.pop(sha)
            self.total -= size
            with contextlib.suppress(FileNotFoundError):
                self.path(sha).unlink()
            metrics.CONTENT_EVICTED.inc()
            log.info("content %s evicted from the cache (%d bytes)", sha, size)
        metrics.CONTENT_CACHE_BYTES.set(self.total)

    async def _fetch(self, sha256: str) -> None:
        tmp = self.folder / f"{_TMP}{sha256}-{uuid.uuid4().hex[:8]}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise _failed(503, f"the relay cannot write its content cache: {exc}") from None
        try:
            size = await self._receive(sha256, fd)
            await asyncio.to_thread(os.fsync, fd)
            os.replace(tmp, self.path(sha256))
            _fsync_dir(self.folder)
        except OSError as exc:  # fsync or rename: the cache's disk (full, or failing)
            raise _failed(503, f"the relay cannot write its content cache: {exc}") from None
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self.sizes[sha256] = size
        self.total += size
        metrics.CONTENT_CACHE_BYTES.set(self.total)
        log.info("content %s fetched from the server and cached (%d bytes)", sha256, size)
        self._evict()

    async def _receive(self, sha256: str, fd: int) -> int:
        """The server's bytes into ``fd``, checked; returns their size."""
        h = hashlib.sha256()
        got = 0
        try:
            async with self.opener(sha256) as r:
                if r.status != 200:
                    raise _refused(r.status, await r.text())
                if r.length is None:
                    raise _failed(502, "the server's answer has no Content-Length")
                async for piece in r.chunks(CONTENT_CHUNK):
                    got += len(piece)
                    if got > r.length:
                        break
                    h.update(piece)
                    _write(fd, piece)
                    metrics.CONTENT_FETCHED_BYTES.inc(len(piece))
                length = r.length
        except (TimeoutError, OSError) as exc:  # connecting, reading (not writing: _write)
            what = str(exc) or type(exc).__name__
            raise _failed(503, f"the relay's fetch from its server failed: {what}") from None
        except ValueError as exc:  # not HTTP as we know it (a bad chunk size)
            raise _failed(502, f"the server's answer is malformed: {exc}") from None
        if got != length:
            raise _failed(502, f"the server sent {got} bytes, not {length}: nothing cached")
        digest = h.hexdigest()
        if digest != sha256:
            raise _failed(502, f"the server's bytes hash to {digest}, not {sha256}: nothing cached")
        return got


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError as exc:
        raise _failed(503, f"the relay cannot write its content cache: {exc}") from None


def _settled(task: asyncio.Task[None]) -> None:
    """Read a fetch's outcome, so one whose waiters all left is not logged as lost."""
    if not task.cancelled():
        task.exception()


def _refused(status: int, body: bytes) -> FetchError:
    why = error_text(HttpError(status, body))
    if status == 404:
        return _failed(404, f"no such content: {why}")
    if status in (401, 403):
        return _failed(503, f"the server refused this relay ({why}); fetch from the server")
    if status >= 500:
        return _failed(503, f"the server could not answer (HTTP {status}: {why}); retry")
    return _failed(502, f"the server answered HTTP {status}: {why}")


def _failed(status: int, message: str) -> FetchError:
    metrics.CONTENT_FETCH_FAILURES.labels(str(status)).inc()
    return FetchError(status, message)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
