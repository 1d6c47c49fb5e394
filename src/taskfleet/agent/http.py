"""A minimal asyncio HTTP/1.1 client for the agent's calls (enroll, exchange, content).

Why not httpx or aiohttp: the agent runs on production machines and must stay
lean (idle RSS <= 30 MB); importing httpx alone costs ~15 MB. The stdlib has
no asyncio HTTP client, and an exchange must be cancellable mid-flight (a long
poll is abandoned when a result is ready), which a thread-bound
``http.client`` call is not. Scope: POST of a JSON body, one keep-alive
connection, responses framed by Content-Length or by connection close; and
``stream_get``, a GET on a connection of its own whose body is read piece by
piece (content downloads: never held whole in memory). HTTPS verifies the
server's certificate and name against the system's CAs, or only against the CA
file ``trust`` was given (``--ca-file``, pinned at enrollment: ``taskfleet/tls.py``);
one TLS context per process, made at the first HTTPS connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from taskfleet.settings import AGENT_MAX_RESPONSE


class HttpError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:300].decode(errors='replace')}")
        self.status = status
        self.body = body


MAX_RESPONSE = AGENT_MAX_RESPONSE

_ca_file: Path | None = None  # None: the system's CAs
_context: ssl.SSLContext | None = None


def trust(ca_file: Path | None) -> None:
    """Verify every server this process talks to over HTTPS with ``ca_file`` (PEM)
    instead of the system's CAs (None: the system's again)."""
    global _ca_file, _context
    _ca_file, _context = ca_file, None


def _tls() -> ssl.SSLContext:
    global _context
    if _context is None:  # loading the CAs costs time and memory: once, and only for HTTPS
        _context = ssl.create_default_context(cafile=None if _ca_file is None else str(_ca_file))
    return _context


def error_text(exc: HttpError) -> str:
    """The reason an HTTP error answer gives (``error`` or ``detail``), else the error."""
    try:
        body = json.loads(exc.body)
        return str(body.get("error") or body.get("detail"))
    except (ValueError, AttributeError):
        return str(exc)


def _split_url(base_url: str) -> tuple[str, int, bool, str]:
    """(host, port, tls, path prefix) of an http(s) base URL; ValueError otherwise."""
    u = urllib.parse.urlsplit(base_url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"invalid server URL {base_url!r}: expected http(s)://HOST[:PORT]")
    port = u.port or (443 if u.scheme == "https" else 80)
    return u.hostname, port, u.scheme == "https", u.path.rstrip("/")


class Connection:
    def __init__(
        self, base_url: str, *, timeout: float = 30.0, max_response: int = MAX_RESPONSE
    ) -> None:
        self.host, self.port, self.tls, self.prefix = _split_url(base_url)
        self.timeout = timeout
        self.max_response = max_response  # the relay takes larger replies than an agent
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        self._reader = self._writer = None

    @property
    def connected(self) -> bool:
        """Whether a kept-alive connection is open (the next post reuses it)."""
        return self._writer is not None

    async def post(
        self,
        path: str,
        body: bytes,
        headers: dict[str, str],
        timeout: float | None = None,
        *,
        retry_stale: bool = True,
    ) -> bytes:
        """POST and return the body of a 2xx answer; raise HttpError for others.
        ``retry_stale``: when a kept-alive connection turns out closed, send again on a
        new one (the request may have been applied: only for requests that may repeat)."""
        try:
            return await asyncio.wait_for(
                self._post(path, body, headers, retry_stale), timeout or self.timeout
            )
        except BaseException:
            # Any failure or cancel leaves the stream in an unknown place.
            await self.close()
            raise

    async def _post(
        self, path: str, body: bytes, headers: dict[str, str], retry_stale: bool
    ) -> bytes:
        for attempt in (1, 2):
            fresh = self._writer is None
            if fresh:
                ctx = _tls() if self.tls else None
                self._reader, self._writer = await asyncio.open_connection(
                    self.host, self.port, ssl=ctx
                )
            assert self._reader is not None and self._writer is not None
            head = [
                f"POST {self.prefix}{path} HTTP/1.1",
                f"Host: {self.host}:{self.port}",
                "Content-Type: application/json",
                f"Content-Length: {len(body)}",
            ] + [f"{k}: {v}" for k, v in headers.items()]
            try:
                self._writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
                await self._writer.drain()
                status_line = await self._reader.readline()
                if not status_line:
                    raise ConnectionResetError("server closed the connection")
            except (ConnectionError, OSError):
                await self.close()
                if fresh or attempt == 2 or not retry_stale:
                    raise
                continue  # a kept-alive connection the server had closed: retry once
            return await self._read_response(status_line)
        raise ConnectionError("unreachable")

    async def _read_response(self, status_line: bytes) -> bytes:
        assert self._reader is not None
        parts = status_line.decode("latin-1").split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise ConnectionError(f"bad HTTP status line {status_line[:80]!r}")
        status = int(parts[1])
        length, close, chunked = None, False, False
        while True:
            line = await self._reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.lower() == "close":
                close = True
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if chunked:
            data = bytearray()
            while True:
                size = int((await self._reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    await self._reader.readline()
                    break
                data += await self._reader.readexactly(size)
                await self._reader.readexactly(2)
                if len(data) > self.max_response:
                    raise ConnectionError("response too large")
            body = bytes(data)
        elif length is not None:
            if length > self.max_response:
                raise ConnectionError("response too large")
            body = await self._reader.readexactly(length)
        else:
            body = await self._reader.read(self.max_response)
            close = True
        if close:
            await self.close()
        if not 200 <= status < 300:
            raise HttpError(status, body)
        return body


# -- streaming GET (content downloads) -------------------------------------------------

_MAX_HEADERS = 100  # header lines of one answer: more is not an HTTP server we know


@dataclass
class Streamed:
    """An answer whose body is still on the wire: read it with ``chunks`` (or ``text``
    for an error's few bytes). ``headers`` are keyed in lowercase; ``length`` is the
    body's declared size (Content-Length), None when chunked or framed by close."""

    status: int
    headers: dict[str, str]
    length: int | None
    reader: asyncio.StreamReader
    chunked: bool
    timeout: float

    async def _read(self, n: int) -> bytes:
        return await asyncio.wait_for(self.reader.read(n), self.timeout)

    async def _line(self) -> bytes:
        return await asyncio.wait_for(self.reader.readline(), self.timeout)

    async def chunks(self, size: int) -> AsyncIterator[bytes]:
        """The body, at most ``size`` bytes at a time; each read waits at most
        ``timeout`` (TimeoutError). A body that ends before its declared length raises
        ConnectionError: the caller keeps what it has and may resume."""
        if self.chunked:
            while True:
                line = await self._line()
                if not line:
                    raise ConnectionError("connection closed inside a chunked body")
                in_chunk = int(line.split(b";")[0].strip() or b"0", 16)
                if in_chunk == 0:
                    return
                while in_chunk:
                    piece = await self._read(min(size, in_chunk))
                    if not piece:
                        raise ConnectionError("connection closed inside a chunk")
                    in_chunk -= len(piece)
                    yield piece
                await self._line()  # the CRLF after the chunk
        left = self.length
        while left is None or left > 0:
            piece = await self._read(size if left is None else min(size, left))
            if not piece:
                if left is None:
                    return  # framed by the connection's end
                raise ConnectionError(f"connection closed {left} bytes before the body's end")
            if left is not None:
                left -= len(piece)
            yield piece

    async def text(self, limit: int = 64 * 1024) -> bytes:
        """Up to ``limit`` bytes of the body (an error answer's reason)."""
        out = bytearray()
        with contextlib.suppress(ConnectionError, TimeoutError, ValueError):
            async for piece in self.chunks(limit):
                out += piece
                if len(out) >= limit:
                    break
        return bytes(out[:limit])


@contextlib.asynccontextmanager
async def stream_get(
    base_url: str, path: str, headers: dict[str, str], *, timeout: float
) -> AsyncIterator[Streamed]:
    """GET ``path`` on a connection of its own (closed on exit) and yield the answer
    with its body unread, whatever its status. ``timeout`` bounds connecting and each
    read (not the whole transfer: a large file takes as long as it takes while bytes
    flow). Raises OSError, TimeoutError or ConnectionError when the server cannot be
    reached or answers something that is not HTTP; ValueError for a bad URL."""
    host, port, tls, prefix = _split_url(base_url)
    ctx = _tls() if tls else None
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx), timeout)
    try:
        head = [
            f"GET {prefix}{path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Connection: close",
        ] + [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        await asyncio.wait_for(writer.drain(), timeout)
        status_line = await asyncio.wait_for(reader.readline(), timeout)
        parts = status_line.decode("latin-1").split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise ConnectionError(f"bad HTTP status line {status_line[:80]!r}")
        fields: dict[str, str] = {}
        for _ in range(_MAX_HEADERS):
            line = await asyncio.wait_for(reader.readline(), timeout)
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            fields[name.strip().lower()] = value.strip()
        else:
            raise ConnectionError("too many header lines")
        chunked = "chunked" in fields.get("transfer-encoding", "").lower()
        raw_length = fields.get("content-length", "")
        if raw_length and not raw_length.isdigit():
            raise ConnectionError(f"bad Content-Length {raw_length[:40]!r}")
        length = None if chunked or not raw_length else int(raw_length)
        yield Streamed(int(parts[1]), fields, length, reader, chunked, timeout)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
