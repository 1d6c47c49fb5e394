"""The relay process: binds its ports, enrolls once, then serves agents and the server.

Contract:

* Ports are claimed before anything else (the agents' HTTP port, the UDP port for the
  server's tickles), so a relay that cannot listen uses up no enrollment token.
* Agents are served at once (``relay/http.py``); until the relay is enrolled, and
  while the server refuses it, they are answered 503. Content they download comes
  from the cache in ``STATE_DIR/content`` (``relay/content.py``), at most
  ``content_cache_bytes`` (LRU).
* One event loop runs the HTTP server (uvicorn on the claimed socket), the upstream
  loop (``relay/upstream.py``), the server-tickle listener and the agent tickler
  (``relay/tickles.py``). SIGTERM or SIGINT stops them; open long polls are answered
  first. Every committed spool write is durable, so a kill -9 loses nothing
  acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from taskfleet.agent.http import trust
from taskfleet.listen import bind_tcp
from taskfleet.relay.content import ContentCache
from taskfleet.relay.http import AgentApp
from taskfleet.relay.spool import Spool
from taskfleet.relay.tickles import AgentTickler, ServerTickles
from taskfleet.relay.upstream import Upstream, UpstreamConfig
from taskfleet.settings import (
    RELAY_CONTENT_CACHE_BYTES,
    RELAY_RETRY_MAX,
    RELAY_RETRY_MIN,
    RELAY_SHUTDOWN_GRACE,
    RELAY_TICKLE_BIND,
    SERVER_KEEP_ALIVE,
    TICKLE_RATE,
)

log = logging.getLogger("taskfleet.relay")


@dataclass
class RelayConfig:
    server: str
    state_dir: Path
    host: str
    port: int
    enroll_token: str | None = None
    ca_file: Path | None = None  # verify the server with this CA only (tls.pin_ca)
    name: str = field(default_factory=socket.gethostname)
    advertise: str | None = None
    tickle_port: int = 0  # 0: no UDP from the server, long-poll instead
    tickle_bind: str = RELAY_TICKLE_BIND
    poll_interval: float | None = None
    retry_min: float = RELAY_RETRY_MIN
    retry_max: float = RELAY_RETRY_MAX
    content_cache_bytes: int = RELAY_CONTENT_CACHE_BYTES  # LRU cap of relay/content.py
    tls_cert: Path | None = None  # serve agents HTTPS with this pair (tls.check_server_files)
    tls_key: Path | None = None


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the relay stops it itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _bind_udp(host: str, port: int) -> socket.socket:
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class Relay:
    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.spool = Spool(config.state_dir)  # raises SpoolError: refuse to start
        trust(config.ca_file)  # HTTPS to the server: the pinned CA, else the system's
        self.upstream = Upstream(
            self.spool,
            UpstreamConfig(
                server=config.server,
                enroll_token=config.enroll_token,
                name=config.name,
                advertise=config.advertise,
                tickle_port=config.tickle_port,
                poll_interval=config.poll_interval,
                retry_min=config.retry_min,
                retry_max=config.retry_max,
            ),
        )
        self.app = AgentApp(self.spool, self.upstream)
        self.app.content = ContentCache(
            config.state_dir / "content", config.content_cache_bytes, self.upstream.open_content
        )
        self.tickler = AgentTickler(self.spool, self.upstream.server_now, rate=TICKLE_RATE)
        self.stopping = asyncio.Event()

    def _news(self, ids: set[int]) -> None:
        self.app.wake(ids)
        rate = self.spool.relay_settings.get("tickle_rate")
        if isinstance(rate, int | float) and 0 < rate < float("inf"):
            self.tickler.set_rate(float(rate))
        interval = self.spool.relay_settings.get("tickle_min_interval")
        if isinstance(interval, int | float) and 0 <= interval < float("inf"):
            self.tickler.set_min_interval(float(interval))
        self.tickler.wake(ids)

    async def run(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self.stopping.set)
        try:
            tcp = bind_tcp(cfg.host, cfg.port)
        except OSError as exc:
            raise SystemExit(
                f"cannot listen for agents on {cfg.host}:{cfg.port} ({exc.strerror or exc}); "
                "choose another --listen. Nothing was enrolled or changed."
            ) from None
        try:
            udp = _bind_udp(cfg.tickle_bind, cfg.tickle_port) if cfg.tickle_port else None
        except OSError as exc:
            tcp.close()
            raise SystemExit(
                f"cannot listen for the server's wake-ups on UDP {cfg.tickle_bind}:"
                f"{cfg.tickle_port} ({exc.strerror or exc}); choose another --tickle-port, "
                "or --tickle-port 0 to long-poll instead. Nothing was enrolled or changed."
            ) from None
        self.upstream.on_news = self._news
        server = _Uvicorn(
            uvicorn.Config(
                self.app,
                lifespan="off",
                log_config=None,
                access_log=False,
                timeout_keep_alive=SERVER_KEEP_ALIVE,
                timeout_graceful_shutdown=int(RELAY_SHUTDOWN_GRACE),
                ssl_certfile=cfg.tls_cert,
                ssl_keyfile=cfg.tls_key,
            )
        )
        http = asyncio.create_task(server.serve(sockets=[tcp]), name="http")
        self.tickler.start()
        # Work cached before a crash (or a stop) may never have been tickled: the agent
        # would wait for its fallback poll (half an hour by default) while the server's
        # time limit runs out. Wake those agents now.
        self.tickler.wake({c.id for c in self.spool.computers.values() if c.work_waiting})
        upstream = asyncio.create_task(self._upstream(udp), name="upstream")
        stop = asyncio.create_task(self.stopping.wait())
        done, _ = await asyncio.wait({http, upstream, stop}, return_when=asyncio.FIRST_COMPLETED)
        failed = next((t for t in done if t is not stop and t.exception() is not None), None)
        stop.cancel()
        upstream.cancel()
        with contextlib.suppress(asyncio.CancelledError, BaseException):
            await upstream
        self.app.wake_all()
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, BaseException):
            await http
        await self.tickler.stop()
        await self.upstream.conn.close()
        await self.upstream.enroll_conn.close()
        for conn in self.upstream.enroll_pool:
            await conn.close()
        self.spool.close()
        log.info("relay stopped")
        if failed is not None:
            raise failed.exception()  # type: ignore[misc]

    async def _upstream(self, udp: socket.socket | None) -> None:
        cfg = self.config
        ident = self.upstream.ident or await self.upstream.enroll(self.stopping)
        if ident is None:
            return  # stopped before it could enroll
        transport = None
        if udp is not None:
            listener = ServerTickles(
                self.spool, ident.tickle_key, ident.relay_id, self.upstream.server_tickled
            )
            self.upstream.on_offset = listener.verifier.set_clock_offset
            transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: listener, sock=udp
            )
        log.info(
            "relay %d ready: agents on %s:%d, %s, server %s",  # tests wait for this line
            ident.relay_id,
            cfg.host,
            cfg.port,
            f"server tickles on UDP {cfg.tickle_port}" if udp is not None else "long poll",
            ident.server,
        )
        try:
            await self.upstream.run(self.stopping)
        finally:
            if transport is not None:
                transport.close()


def run_relay(config: RelayConfig) -> None:
    async def main() -> None:
        await Relay(config).run()

    asyncio.run(main())
