"""The agent's content download: one file by SHA-256 from its relay or the server.

Contract of :func:`download`:

* The bytes go to ``DEST.part`` (beside ``dest``), opened with ``O_NOFOLLOW`` (a
  symlink planted there is refused, never followed) and mode 0600; then size and
  SHA-256 are checked, the file is fsynced and renamed to ``dest``. ``dest`` exists
  only when it is complete and verified.
* Resumable: a ``.part`` left by an interrupted download is hashed first, then the
  rest is asked for with ``Range: bytes=N-`` (206). A server that ignores the range
  (200) sends it all again; the ``.part`` starts over.
* ``root`` is the folder ``dest`` must stay inside (the item's staging folder): its
  parent folders are made (0700) only after checking that what exists of them
  resolves inside ``root``, and checked again after; a ``dest`` whose parent resolves
  elsewhere (a symlinked folder) is refused and nothing is written.
* ``timeout`` bounds connecting and each read, not the whole transfer (a large file
  takes as long as it takes while bytes flow).
* Every failure is a :class:`ContentError` whose ``reason`` fits a step's detail line,
  and whose ``kind`` says what it was: ``hash`` or ``size`` mismatch (the ``.part`` is
  removed: those bytes are wrong), ``not-found`` (404), ``refused`` (401/403), ``disk``
  (no space, or another write error: the ``.part`` is removed), ``unsafe`` (a path
  that leaves ``root``), ``unreachable`` (connection, timeout, 5xx, a body cut short:
  the ``.part`` is kept for the next attempt to resume).

No httpx or aiohttp (``agent/http.py`` says why): the body is read through
``agent.http.stream_get``, ``CONTENT_CHUNK`` bytes at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import Any

from taskfleet.agent.http import HttpError, error_text, stream_get
from taskfleet.protocol.content import valid_sha256
from taskfleet.protocol.jobs import CONTENT_PATH
from taskfleet.settings import CONTENT_CHUNK


class ContentError(Exception):
    """A download that did not end with a verified file (module docstring)."""

    def __init__(self, reason: str, kind: str = "unreachable") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _check_parent(dest: Path, root: Path) -> None:
    """``dest``'s folder is (or will be) inside ``root``, following what exists of it.
    ``root`` itself is the caller's (made if missing)."""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ContentError(f"cannot create {root}: {exc.strerror or exc}", "disk") from None
    real_root = root.resolve()
    probe = dest.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not _inside(probe.resolve(), real_root):
        raise ContentError(f"refused: {dest.name} would be written outside {root}", "unsafe")
    try:
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ContentError(f"cannot create {dest.parent}: {exc.strerror or exc}", "disk") from None
    if not _inside(dest.parent.resolve(), real_root):
        raise ContentError(f"refused: {dest.name} would be written outside {root}", "unsafe")


def _open_part(part: Path) -> int:
    try:
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ContentError(f"refused: {part.name} is a symlink", "unsafe") from None
        raise _disk(exc) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ContentError(f"refused: {part.name} is not a regular file", "unsafe")
        os.fchmod(fd, 0o600)  # a part left by someone else: ours, and private, now
    except BaseException:
        os.close(fd)
        raise
    return fd


def _disk(exc: OSError) -> ContentError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ContentError(f"disk full: {exc.strerror or exc}", "disk")
    return ContentError(f"write failed: {exc.strerror or exc}", "disk")


def _hash_prefix(fd: int, n: int) -> Any:
    """The SHA-256 state of the first ``n`` bytes of ``fd`` (the part to resume)."""
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    left = n
    while left:
        piece = os.read(fd, min(CONTENT_CHUNK, left))
        if not piece:
            break
        h.update(piece)
        left -= len(piece)
    return h


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


async def download(
    base_url: str,
    computer_id: int,
    secret: str,
    sha256: str,
    size: int,
    dest: Path,
    *,
    timeout: float,
    root: Path | None = None,
) -> None:
    """Fetch content ``sha256`` (``size`` bytes) from ``base_url`` into ``dest``,
    verified (module docstring); raises ContentError. ``root``: the folder ``dest``
    must stay inside (default: ``dest``'s own folder)."""
    if not valid_sha256(sha256):
        raise ContentError(f"bad content hash {str(sha256)[:80]!r}", "hash")
    if type(size) is not int or size < 0:
        raise ContentError(f"bad content size {size!r}", "size")
    root = dest.parent if root is None else root
    _check_parent(dest, root)
    part = dest.with_name(dest.name + ".part")
    fd = _open_part(part)
    keep = True  # whether the .part may be resumed after a failure
    try:
        have = os.fstat(fd).st_size
        if have > size:  # not a prefix of this content: start over
            os.ftruncate(fd, 0)
            have = 0
        h = await asyncio.to_thread(_hash_prefix, fd, have) if have else hashlib.sha256()
        os.lseek(fd, have, os.SEEK_SET)
        if have < size:
            have, h = await _fetch(
                base_url, computer_id, secret, sha256, size, fd, h, have, timeout
            )
        if have != size:
            keep = False
            raise ContentError(f"size mismatch: expected {size} bytes, got {have}", "size")
        got = h.hexdigest()
        if got != sha256:
            keep = False
            raise ContentError(f"hash mismatch: expected sha256 {sha256}, got {got}", "hash")
        try:
            await asyncio.to_thread(os.fsync, fd)
            os.replace(part, dest)
        except OSError as exc:
            keep = False
            raise _disk(exc) from None
    except ContentError as exc:
        if exc.kind != "unreachable":
            keep = False
        raise
    except OSError as exc:  # a write to the .part (ENOSPC, EIO)
        keep = False
        raise _disk(exc) from None
    finally:
        os.close(fd)
        if not keep:
            _remove(part)
    with contextlib.suppress(OSError):  # the rename is durable with its folder
        dir_fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


async def _fetch(
    base_url: str,
    computer_id: int,
    secret: str,
    sha256: str,
    size: int,
    fd: int,
    h: Any,
    have: int,
    timeout: float,
) -> tuple[int, Any]:
    """Append the bytes from ``have`` on to ``fd`` (and hash them into ``h``); returns
    the size now and the hash (a new one when the source sent everything again)."""
    headers = {"X-Taskfleet-Computer": str(computer_id), "Authorization": f"Bearer {secret}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        async with stream_get(base_url, CONTENT_PATH + sha256, headers, timeout=timeout) as r:
            if r.status == 200 and have:  # the range was ignored: all of it comes again
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                h = hashlib.sha256()
                have = 0
            if r.status == 416:
                raise ContentError(
                    f"size mismatch: expected {size} bytes, the source has fewer than {have}",
                    "size",
                )
            if r.status not in (200, 206):
                raise _refusal(r.status, await r.text())
            total = have + r.length if r.length is not None else None
            if total is not None and total != size:
                raise ContentError(
                    f"size mismatch: expected {size} bytes, the source has {total}", "size"
                )
            async for piece in r.chunks(CONTENT_CHUNK):
                if have + len(piece) > size:
                    raise ContentError(
                        f"size mismatch: expected {size} bytes, the source sent more", "size"
                    )
                try:
                    _write_all(fd, piece)
                except OSError as exc:  # ENOSPC, EIO: the disk, not the network
                    raise _disk(exc) from None
                h.update(piece)
                have += len(piece)
    except ContentError:
        raise
    except (TimeoutError, ConnectionError, OSError, ValueError) as exc:
        what = str(exc) or type(exc).__name__
        raise ContentError(f"unreachable: {base_url}: {what}", "unreachable") from None
    return have, h


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _refusal(status: int, body: bytes) -> ContentError:
    why = error_text(HttpError(status, body))
    if status == 404:
        return ContentError(f"not found: {why}", "not-found")
    if status in (401, 403):
        return ContentError(f"refused (HTTP {status}): {why}", "refused")
    return ContentError(f"unreachable: HTTP {status}: {why}", "unreachable")
