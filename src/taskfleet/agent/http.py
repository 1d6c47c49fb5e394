"""A minimal asyncio HTTP/1.1 client for the agent's two calls (enroll, exchange).

Why not httpx or aiohttp: the agent runs on production machines and must stay
lean (idle RSS <= 30 MB); importing httpx alone costs ~15 MB. The stdlib has
no asyncio HTTP client, and an exchange must be cancellable mid-flight (a long
poll is abandoned when a result is ready), which a thread-bound
``http.client`` call is not. Scope: POST of a JSON body, one keep-alive
connection, responses framed by Content-Length or by connection close.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import urllib.parse

from taskfleet.settings import AGENT_MAX_RESPONSE


class HttpError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:300].decode(errors='replace')}")
        self.status = status
        self.body = body


MAX_RESPONSE = AGENT_MAX_RESPONSE


def error_text(exc: HttpError) -> str:
    """The reason an HTTP error answer gives (``error`` or ``detail``), else the error."""
    try:
        body = json.loads(exc.body)
        return str(body.get("error") or body.get("detail"))
    except (ValueError, AttributeError):
        return str(exc)


class Connection:
    def __init__(
        self, base_url: str, *, timeout: float = 30.0, max_response: int = MAX_RESPONSE
    ) -> None:
        u = urllib.parse.urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"invalid server URL {base_url!r}: expected http(s)://HOST[:PORT]")
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.tls = u.scheme == "https"
        self.prefix = u.path.rstrip("/")
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
                ctx = ssl.create_default_context() if self.tls else None
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
