"""An interim content fetch for the agent's jobs, until ``taskfleet.agent.content`` lands.

``jobs.default_fetch`` prefers ``taskfleet.agent.content.download`` (branch
s6/content) and falls back to ``download`` here, which has its signature: remove
this module once that one is merged.

Contract of ``download``: ``GET {base_url}/agent/v1/content/{sha256}`` with the
exchange's agent credentials, into ``dest.part`` (resumed with
``Range: bytes=N-`` when a part is there: 206 appends, 200 starts over), then
the size and SHA-256 are checked and the part is renamed to ``dest`` (fsynced).
A file already at ``dest`` with the right hash is kept. Anything else raises
``FetchError`` with a reason; an ``OSError`` of the disk (ENOSPC) is raised as
it is. ``timeout`` bounds each wait for the peer. ``root`` is the folder
``dest`` must stay in (checked by the caller; asserted here).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import urllib.parse
from pathlib import Path

from taskfleet.protocol.jobs import CONTENT_PATH

_CHUNK = 256 * 1024


class FetchError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _sha256(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


async def download(
    base_url: str,
    computer_id: int,
    secret: str,
    sha256: str,
    size: int,
    dest: Path,
    *,
    timeout: float,
    root: Path,
) -> None:
    assert dest.resolve().is_relative_to(root.resolve())
    if dest.exists():
        if _sha256(dest) == (size, sha256):
            return
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    if have < size:
        await _get(base_url, computer_id, secret, sha256, part, have, timeout)
        have = part.stat().st_size
        if have < size:  # kept: the next fetch resumes from it
            raise FetchError(f"content {sha256[:12]}: interrupted at {have} of {size} bytes")
    elif not part.exists():
        part.write_bytes(b"")  # empty content: nothing to fetch
    got = _sha256(part)
    if got != (size, sha256):
        part.unlink(missing_ok=True)
        raise FetchError(
            f"content {sha256[:12]}: got {got[0]} bytes with another hash"
            if got[0] == size
            else f"content {sha256[:12]}: got {got[0]} bytes, expected {size}"
        )
    os.replace(part, dest)
    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _get(
    base_url: str, computer_id: int, secret: str, sha: str, part: Path, have: int, timeout: float
) -> None:
    u = urllib.parse.urlsplit(base_url)
    tls = u.scheme == "https"
    port = u.port or (443 if tls else 80)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                u.hostname, port, ssl=ssl.create_default_context() if tls else None
            ),
            timeout,
        )
    except (OSError, TimeoutError) as exc:
        raise FetchError(f"cannot reach {base_url}: {exc or type(exc).__name__}") from None
    try:
        path = u.path.rstrip("/") + CONTENT_PATH + sha
        head = (
            f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\nConnection: close\r\n"
            f"X-Taskfleet-Computer: {computer_id}\r\nAuthorization: Bearer {secret}\r\n"
            + (f"Range: bytes={have}-\r\n" if have else "")
            + "\r\n"
        )
        writer.write(head.encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])
        }
        if status not in (200, 206):
            raise FetchError(f"{base_url} answered HTTP {status} for content {sha[:12]}")
        length = int(headers.get("content-length", "-1"))
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if status == 206 else os.O_TRUNC)
        fd = os.open(part, flags, 0o600)
        try:
            while length != 0:
                chunk = await asyncio.wait_for(reader.read(_CHUNK), timeout)
                if not chunk:
                    break
                os.write(fd, chunk)
                length -= len(chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
    except (TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
        raise FetchError(
            f"content {sha[:12]} from {base_url}: {exc or type(exc).__name__}"
        ) from None
    except ConnectionError as exc:
        raise FetchError(f"content {sha[:12]} from {base_url}: {exc}") from None
    finally:
        writer.close()
