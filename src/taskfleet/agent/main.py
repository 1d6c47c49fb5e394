"""The agent: enrolls once, then exchanges with the server and runs what it is given.

Contract (see ``protocol/exchange.py`` for the wire protocol):
* Exchanges happen at start, at once on a valid tickle, at once when a result
  is ready, and every ``poll_interval`` (default 30 min) as a fallback. An
  agent that cannot receive UDP (``--tickle-port 0``) holds a long poll open
  instead, which it abandons when it has a result to send. A reply that says
  ``more`` (it was full) is followed by another exchange at once.
* Every operation is written to local state before it is acknowledged, and its
  result before it is sent; results stay queued until the server acks them,
  across restarts and server outages.
* The agent acts only on orders (operations, cancels) signed by the server for
  this computer and generation, and reports to the server, in a ``refused``
  message, every server message it refuses for that reason; it refuses
  (reporting Failed with the reason) the operations its own policy does not
  allow: scripts must be enabled (``--allow-scripts``) and may run only as the
  listed users (default: the agent's own user). Operation runs (receive,
  cancel, spawn, run, check) live in ``agent/operations.py``.
* A server that is down is retried with exponential backoff, and the agent
  says so in its log.
* With ``--relay``, the agent enrolls through the relay and exchanges with it
  (the same protocol); it keeps its messages until the SERVER acknowledged
  them (``server_ack`` in a relay's reply) and sends each peer only what is
  above what that peer holds. A relay that fails for ``relay_failover_after``
  seconds is left for the server (``--server``, the fallback), logged once;
  while direct, the relay is tried again every ``relay_probe_interval`` and
  the agent goes back to it when it answers (``domain/peers.py``). A server
  reply naming another relay (``relay assign``) moves the agent behind that
  one, with or without ``--relay``: logged once, kept in the local state (it
  wins over ``--relay`` at the next start, logged). A pinned
  ``--server-key`` refuses an enrollment answer carrying another key (a relay
  could swap it); without one the first key is trusted, and logged as such.
* The inventory is reported at start, after each finished operation, when the
  server asks for the whole of it and every ``inventory_interval``
  (``agent/inventory_reports.py``: deltas, at most once a minute).
* An operation found unfinished at start (the agent died while it ran) is
  reported Failed with a result line saying so. A restart that waits for the computer
  to come back is not: at start it is Succeeded if the boot id changed, else it
  waits out its delay plus the grace (``agent/operations.py``).
* A failed run of a pulled, Required, Once operation with attempts left is not
  final (SPEC 5): it is Failed locally, the server is told "failed, will retry
  (attempt k of N)" and the scrubber's next run continues it. Only the last
  attempt's failure is reported as the final Failed.

Why one module of about 750 lines: it is the agent process's one loop — start,
enrollment, the exchange with its peer (relay or server, failover and return),
wake-ups and the scrubber's schedule — and each of those steers the others'
timing; the rules live elsewhere (``domain/peers.py``, ``domain/scrubber.py``),
as do operation runs (``agent/operations.py``) and the inventory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import platform
import random
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskfleet import __version__
from taskfleet.agent import memory
from taskfleet.agent import state as st
from taskfleet.agent.actions.context import ActionEnv
from taskfleet.agent.actions.registry import capabilities
from taskfleet.agent.enroll import enroll
from taskfleet.agent.http import Connection, HttpError, error_text, trust
from taskfleet.agent.inventory_reports import InventoryReports
from taskfleet.agent.operations import Operations
from taskfleet.agent.scrub import agent_lock, kill_leftover
from taskfleet.agent.scrub import plan as scrub_plan
from taskfleet.agent.scrub import scrub as scrub_record
from taskfleet.agent.wakeups import bind_tickle_port, listen
from taskfleet.aio import wait_set
from taskfleet.domain.actions import allowed_types
from taskfleet.domain.kinds import JOB
from taskfleet.domain.peers import Failover, Peer, PeerAcks, Switch, reassigned
from taskfleet.domain.policy import RunWindow
from taskfleet.domain.scripts import EXECUTE_SCRIPT
from taskfleet.domain.scrubber import Action
from taskfleet.protocol.exchange import (
    EXCHANGE_PATH,
    MAX_MESSAGES,
    ProtocolError,
    ServerSettings,
    loads_reply,
    operation_status,
    parse_server_reply,
)
from taskfleet.protocol.signing import Verifier
from taskfleet.protocol.tickle import TickleVerifier
from taskfleet.settings import (
    AGENT_INVENTORY_INTERVAL,
    AGENT_INVENTORY_MIN_INTERVAL,
    AGENT_PACKAGE_LOCK_TIMEOUT,
    AGENT_RELAY_CHECK_INTERVAL,
    AGENT_RELAY_FAILOVER_AFTER,
    AGENT_RELAY_PROBE_INTERVAL,
    AGENT_RETRY_MAX,
    AGENT_RETRY_MIN,
    AGENT_TICKLE_BIND,
    AGENT_TICKLE_PORT,
    EXCHANGE_HTTP_TIMEOUT,
    LONG_POLL_WAIT,
    POLL_INTERVAL,
    SCRUB_INTERVAL,
    SCRUB_MAX_ATTEMPTS,
    TICKLE_MAX_SKEW,
    TICKLE_MIN_INTERVAL,
)

log = logging.getLogger("taskfleet.agent")
SEND_BUDGET = 3 * 1024 * 1024  # bytes of results per exchange, under the server's limit


@dataclass
class AgentConfig:
    server: str
    state_dir: Path
    enroll_token: str | None = None
    hostname: str = field(default_factory=socket.gethostname)
    machine_id: str | None = None
    tickle_port: int = AGENT_TICKLE_PORT  # 0: no UDP, hold a long poll instead
    tickle_bind: str = AGENT_TICKLE_BIND
    ca_file: Path | None = None  # verify the server with this CA only (tls.pin_ca)
    poll_interval: float | None = None  # None: what the server says (default 30 min)
    allow_scripts: bool = False
    script_users: tuple[str, ...] = ()
    reenroll: bool = False
    run_window: str | None = None  # HH:MM-HH:MM local: when optional work may run
    scrub_interval: float = SCRUB_INTERVAL  # SPEC 5: the scrubber runs at start, then this often
    max_attempts: int = SCRUB_MAX_ATTEMPTS  # continuing stops after this many attempts
    relay: str | None = None  # exchange through this relay; ``server`` is the fallback
    relay_failover_after: float = AGENT_RELAY_FAILOVER_AFTER
    relay_probe_interval: float = AGENT_RELAY_PROBE_INTERVAL
    server_key: str | None = None  # pinned server public key (hex): refuse any other
    inventory: bool = True  # report the inventory (--no-inventory: never)
    inventory_root: Path = Path("/")  # the inventory is read under this root (containers, tests)
    inventory_admindir: Path | None = None  # dpkg's database (default ROOT/var/lib/dpkg)
    inventory_interval: float = AGENT_INVENTORY_INTERVAL
    inventory_min_interval: float = AGENT_INVENTORY_MIN_INTERVAL
    # Typed activities (docs/activity-types.md): the types or families this computer's
    # owner enables (none of the system-changing ones by default) and how they run.
    allow_types: tuple[str, ...] = ()
    restart_command: tuple[str, ...] | None = None  # None: ActionEnv's default
    shutdown_command: tuple[str, ...] | None = None
    boot_id_file: Path | None = None
    restart_grace: float | None = None  # None: ActionEnv's default (AGENT_RESTART_GRACE)
    package_lock_timeout: float = AGENT_PACKAGE_LOCK_TIMEOUT
    apt_options: tuple[str, ...] = ()


def action_env(config: AgentConfig, own_user: str) -> ActionEnv:
    """How this agent runs typed activities, from its configuration."""
    env = ActionEnv(
        root=config.inventory_root,
        admindir=config.inventory_admindir,
        own_user=own_user,
        lock_timeout=config.package_lock_timeout,
        apt_options=config.apt_options,
        tmp_dir=config.state_dir,
        inventory=config.inventory,
    )
    if config.restart_command is not None:
        env = dataclasses.replace(env, restart_command=config.restart_command)
    if config.shutdown_command is not None:
        env = dataclasses.replace(env, shutdown_command=config.shutdown_command)
    if config.boot_id_file is not None:
        env = dataclasses.replace(env, boot_id_file=config.boot_id_file)
    if config.restart_grace is not None:
        env = dataclasses.replace(env, restart_grace=config.restart_grace)
    return env


def default_machine_id(state_dir: Path) -> str:
    """Stable per machine and state folder, so a rebuilt machine re-enrolls as itself."""
    try:
        base = Path("/etc/machine-id").read_text().strip()
    except OSError:
        base = platform.node()
    return hashlib.sha256(f"{base}|{state_dir.resolve()}".encode()).hexdigest()[:32]


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.state = st.LocalState(config.state_dir)  # raises StateError: refuse to start
        trust(config.ca_file)  # HTTPS: the pinned CA, else the system's
        self.ident: st.Identity | None = None
        self.conn = Connection(config.server, timeout=EXCHANGE_HTTP_TIMEOUT)
        self.server_url = config.server  # the server this agent talks to (its enrollment's)
        self.acks = PeerAcks()
        # The relay the server assigned this computer to wins over --relay.
        self.relay_url = self.state.relay_assignment or config.relay
        self.relay_conn: Connection | None = None
        self.failover: Failover | None = None
        if self.relay_url:
            self._use_relay(self.relay_url)
        self.relay_error = ""  # why the relay failed last (said when failing over)
        self.trigger = asyncio.Event()
        self.verifier: TickleVerifier | None = None
        self.poll_interval = config.poll_interval or POLL_INTERVAL
        self.info_sent = False
        self.own_user = _own_user()
        self.action_env = action_env(config, self.own_user)
        runs, cannot = capabilities(self.action_env, allowed_types(config.allow_types))
        self.policy = {
            "scripts": config.allow_scripts,
            "users": sorted({self.own_user, *config.script_users}),
            "types": sorted([EXECUTE_SCRIPT, JOB] if config.allow_scripts else []) + runs,
            "unsupported": cannot,
        }
        self.stopping = asyncio.Event()
        self.tickled = False
        # Set by a tickle: a computer refused for an identity conflict retries at once
        # (an administrator's reset wakes it), not after its backoff.
        self.tickle_event = asyncio.Event()
        self.woken = False
        self.agent_lock = agent_lock(config.state_dir)
        if not self.agent_lock.acquire():
            raise st.StateError(
                f"another agent is already running with state folder {config.state_dir}"
            )
        self.exchanges = 0
        # When the scrubber runs next: a failed attempt's retry starts then.
        self.next_scrub_at = time.time() + config.scrub_interval
        self.ops = Operations(
            self.state,
            self.trigger,
            state_dir=config.state_dir,
            policy=self.policy,
            own_user=self.own_user,
            window=RunWindow.parse(config.run_window) if config.run_window else None,
            max_attempts=config.max_attempts,
            next_scrub_at=lambda: self.next_scrub_at,
            content_base=self.content_base,
            action_env=self.action_env,
            resync=lambda: self.inventory.resync(),
        )
        self.inventory = InventoryReports(
            self.state,
            self.trigger,
            state_dir=config.state_dir,
            root=config.inventory_root,
            admindir=config.inventory_admindir,
            interval=config.inventory_interval,
            min_interval=config.inventory_min_interval,
        )
        if config.inventory:
            self.state.on_finish = self.inventory.want  # an operation may have changed it

    # -- lifecycle -------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self.stopping.set)
        # Claim the UDP port before enrolling: an agent that cannot listen must
        # not leave a stray computer behind or use up an enrollment token.
        sock = bind_tickle_port(self.config.tickle_bind, self.config.tickle_port)
        self.ident = self.state.identity()
        if self.ident is None or self.config.reenroll:
            if not self.config.enroll_token:
                raise SystemExit(
                    f"this agent is not enrolled (state folder {self.config.state_dir}); "
                    "give --enroll-token"
                )
            self.ident = await self._enroll()
            self.inventory.forget()  # a new computer to the server: the next report is whole
        elif self.ident.server != self.config.server:
            log.warning(
                "state folder was enrolled with %s; talking to it, not %s",
                self.ident.server,
                self.config.server,
            )
            self.conn = Connection(self.ident.server, timeout=EXCHANGE_HTTP_TIMEOUT)
            self.server_url = self.ident.server
        key = self.config.server_key
        if key is not None and key.lower() != self.ident.server_public_key.lower():
            raise SystemExit(
                f"--server-key {key} is not the server key this agent pinned at enrollment "
                f"({self.ident.server_public_key}); nothing was changed"
            )
        self.ops.bind(self.ident, Verifier(self.ident.server_public_key))
        if self.relay_url != self.config.relay:
            log.warning(
                "the server assigned this computer to relay %s: exchanging through it%s",
                self.relay_url,
                f", not --relay {self.config.relay}" if self.config.relay else "",
            )
        transport = await self._listen_tickles(sock)
        self._startup()
        scrubber = asyncio.create_task(self._scrub_loop())
        inventory = asyncio.create_task(
            self.inventory.run() if self.config.inventory else self.stopping.wait()
        )
        log.info(
            "agent ready: computer %d, %s, poll every %gs%s",
            self.ident.computer_id,
            f"tickles on UDP {self.config.tickle_port}" if transport else "long poll",
            self.poll_interval,
            f", through relay {self.relay_url}" if self.relay_url else "",
        )
        self.trigger.set()
        main = asyncio.create_task(self._loop())
        await self.stopping.wait()
        main.cancel()
        scrubber.cancel()
        inventory.cancel()
        self.ops.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await main
        if transport:
            transport.close()
        await self.conn.close()
        if self.relay_conn is not None:
            await self.relay_conn.close()
        self.state.close()
        log.info("agent stopped")

    async def _enroll(self) -> st.Identity:
        cfg = self.config
        body = json.dumps(
            {
                "token": cfg.enroll_token,
                "hostname": cfg.hostname,
                "machine_id": cfg.machine_id or default_machine_id(cfg.state_dir),
                "tickle_port": cfg.tickle_port or None,
                "version": __version__,
                "policy": self.policy,
            }
        ).encode()
        # Through the relay when there is one: it enrolls this computer behind itself.
        done = await enroll(
            self.relay_conn or self.conn,
            body,
            server=cfg.server,
            peer="relay" if self.relay_url else "server",
            url=self.relay_url or cfg.server,
            pinned_key=cfg.server_key,
            sleep=self._sleep,
        )
        ident = done.identity
        self.state.save_identity(ident, done.nonce)
        self.info_sent = True  # enrollment carried our info
        self._apply_settings(done.settings)
        log.info(
            "enrolled as computer %d%s",
            ident.computer_id,
            " (re-enrolled: its queued work was canceled)" if done.reenrolled else "",
        )
        return ident

    async def _sleep(self, seconds: float) -> None:
        await wait_set(self.stopping, seconds)
        if self.stopping.is_set():
            raise SystemExit(0)

    async def _listen_tickles(self, sock: socket.socket | None) -> asyncio.DatagramTransport | None:
        if sock is None:
            return None
        assert self.ident is not None
        self.verifier = TickleVerifier(
            self.ident.tickle_key,
            self.ident.computer_id,
            max_skew=TICKLE_MAX_SKEW,
            min_interval=TICKLE_MIN_INTERVAL,
            replay_floor_ms=self.state.tickle_high_water_ms,
        )
        return await listen(sock, self.verifier, self.state, self._woken)

    def _woken(self) -> None:
        self.tickled = True
        self.trigger.set()
        self.tickle_event.set()

    def content_base(self) -> str:
        """Where a job's content comes from: the peer the agent exchanges with (its
        relay, unless it failed over to the server; else the server)."""
        if self.relay_url and self.failover is not None and not self.failover.direct:
            return self.relay_url
        return self.server_url

    def _startup(self) -> None:
        # What a finished job left behind (a crash between its end and its cleanup); the
        # job code loads only where a job ever ran (agent memory).
        if any((self.config.state_dir / f).exists() for f in ("jobs", "checkpoints")):
            from taskfleet.agent.job_files import sweep_staging

            for swept in sweep_staging(self.state, self.config.state_dir):
                log.info("operation %d: removed the staging folder its job left", swept)
        # SPEC 5: scrub at start, before anything runs; then resume pending work.
        self._scrub(executor_running=False)
        for op in self.state.unfinished():
            if op.cancel_requested or op.status == st.UNKNOWN or op.awaiting is not None:
                # Received and never started (or continued): run it now; a restart
                # awaiting the computer: is it back (a new boot id)?
                self.ops.spawn(op)
            elif op.next_run_at is not None:
                self.ops.spawn(op, max(0.0, op.next_run_at - time.time()))

    def _scrub(self, *, executor_running: bool) -> None:
        plan, ops = scrub_plan(
            self.state,
            self.config.state_dir,
            executor_running=executor_running,
            max_attempts=self.config.max_attempts,
        )
        if plan.skipped:
            log.info("scrubber skipped this run: %d task executor(s) running", len(self.ops.owned))
            self._retries_wait(time.time() + self.config.scrub_interval)
            return
        continued = 0
        for record, decision in plan.decisions:
            op = ops[record.op]
            if decision.action is Action.LEAVE:
                continue
            killed = kill_leftover(op)
            if decision.action is Action.SCRUB:
                scrub_record(self.state, op, decision, killed=killed, folder=self.config.state_dir)
            else:
                continued += 1
                log.warning(
                    "operation %d continues (attempt %d): %s", op.op, op.attempts + 1, decision.rule
                )
                self.state.requeue(op.op)
        log.info(
            "scrubber: %d records checked, %d scrubbed, %d continued",
            len(plan.decisions),
            plan.scrubbed,
            continued,
        )
        if plan.scrubbed:
            self.trigger.set()

    def _retries_wait(self, until: float) -> None:
        # Failed attempts waiting to be continued miss this run: tell the server
        # when they can start now, so it does not declare them lost meanwhile.
        waiting = [
            o
            for o in self.state.unfinished()
            if o.status == st.FAILED and o.op not in self.ops.owned
        ]
        for o in waiting:
            reason = "its retry waits for the scrubber's next run (a task is running)"
            self.state.set_status(
                o.op,
                st.FAILED,
                message=operation_status(o.op, "deferred", o.attempts, until, reason),
            )
        if waiting:
            self.trigger.set()

    async def _scrub_loop(self) -> None:
        while True:
            self.next_scrub_at = time.time() + self.config.scrub_interval
            await asyncio.sleep(self.config.scrub_interval)
            self.scrub_pass()

    def scrub_pass(self) -> None:
        """One periodic scrubber run, then start what it continued."""
        running = bool(self.ops.owned) or self.ops.exec_lock.held_elsewhere()
        self._scrub(executor_running=running)
        for op in self.state.unfinished():
            if op.status == st.UNKNOWN and op.op not in self.ops.owned:
                self.ops.spawn(op)

    # -- exchanging ------------------------------------------------------------

    async def _loop(self) -> None:
        delay = AGENT_RETRY_MIN
        while True:
            long_poll = not self.config.tickle_port
            if not self.trigger.is_set() and self.ops.idle():
                memory.release()  # going idle: hand back what the last burst freed
            if not long_poll:
                await wait_set(self.trigger, self._idle_wait())
            self.trigger.clear()
            peer = self._choose_peer()
            try:
                await self._exchange_once(peer, long_poll)
            except (HttpError, TimeoutError, OSError, ValueError) as exc:
                if self._relay_failed(peer, exc):
                    self.trigger.set()  # a failover is due, or a probe failed: go on at once
                    continue
                pause = self._failed(peer, exc, delay) * random.uniform(0.8, 1.2)
                due = self._relay_due()
                pause = pause if due is None else min(pause, due)
                if _identity_conflict(exc):
                    self.tickle_event.clear()
                    await wait_set(self.tickle_event, pause)
                else:
                    await asyncio.sleep(pause)
                delay = min(delay * 2, AGENT_RETRY_MAX)
                self.trigger.set()
                continue
            delay = AGENT_RETRY_MIN
            if self.failover is not None and self.failover.answered(peer) is Switch.RETURNED:
                log.warning(
                    "relay %s answers again: exchanging through it, no longer with the "
                    "server directly",
                    self.relay_url,
                )

    def _choose_peer(self) -> Peer:
        if self.failover is None:
            return Peer.SERVER
        peer, switch = self.failover.choose(time.monotonic())
        if switch is Switch.FAILED_OVER:
            log.warning(
                "relay %s has failed for %gs (%s): exchanging with the server %s directly, "
                "trying the relay again every %gs",
                self.relay_url,
                self.failover.failover_after,
                self.relay_error,
                self.config.server,
                self.failover.probe_every,
            )
        return peer

    def _relay_due(self) -> float | None:
        """Seconds until the relay needs an exchange (a check of what it holds unacked,
        a failover, a probe); None without a relay or with nothing due."""
        if self.failover is None:
            return None
        due = self.failover.wait_limit(time.monotonic())
        if not self.failover.direct and self.state.outbox_size():
            due = (
                AGENT_RELAY_CHECK_INTERVAL if due is None else min(due, AGENT_RELAY_CHECK_INTERVAL)
            )
        return due

    def _idle_wait(self) -> float:
        due = self._relay_due()
        return self.poll_interval if due is None else min(self.poll_interval, due)

    def _relay_failed(self, peer: Peer, exc: Exception) -> bool:
        """Count a failure of the relay (anything but a refusal of this computer's
        credentials, which the server would refuse too); True: exchange again at once."""
        if self.failover is None or peer is not Peer.RELAY:
            return False
        if isinstance(exc, HttpError) and exc.status in (401, 403):
            return False
        if _identity_conflict(exc):
            # The relay caught two copies of this identity and reported it: the server
            # refuses this computer too (no failover to get round it).
            return False
        if isinstance(exc, HttpError) and exc.status == 410:
            # Moved to another relay (or off relays): the server's reply says where.
            log.warning(
                "relay %s no longer serves this computer (%s): asking the server %s",
                self.relay_url,
                error_text(exc),
                self.config.server,
            )
            self.failover.released(time.monotonic())
            return True
        self.relay_error = error_text(exc) if isinstance(exc, HttpError) else str(exc)
        self.relay_error = self.relay_error or type(exc).__name__
        if self.failover.direct:
            log.info("relay %s still fails (%s)", self.relay_url, self.relay_error)
        return self.failover.failed(peer, time.monotonic())

    def _failed(self, peer: Peer, exc: Exception, delay: float) -> float:
        """Say why an exchange failed; returns the backoff before the next one."""
        url = self.relay_url if peer is Peer.RELAY else self.config.server
        if isinstance(exc, HttpError):
            if _identity_conflict(exc):
                log.error(
                    "IDENTITY CONFLICT: %s %s refuses this computer: %s. Another agent "
                    "uses this computer's identity (a copied state folder?). No work "
                    "will run here until an administrator resets the identity "
                    "(taskfleet computer identity-reset %d) or removes the computer.",
                    peer,
                    url,
                    error_text(exc),
                    self.ident.computer_id if self.ident else 0,
                )
            elif exc.status == 401:
                log.error(
                    "%s refused this computer's credentials (%s); re-enroll "
                    "with --enroll-token TOKEN --reenroll",
                    peer,
                    error_text(exc),
                )
            else:
                log.warning("exchange refused by %s %s: %s", peer, url, error_text(exc))
        elif isinstance(exc, ProtocolError):
            # parse_server_reply says why a reply is refused whole.
            log.warning(
                "%s %s sent a reply this agent cannot read (%s); nothing of it "
                "was applied, retrying in %.0fs",
                peer,
                url,
                exc,
                delay,
            )
        else:
            log.warning(
                "%s %s unreachable (%s); retrying in %.0fs",
                peer,
                url,
                exc or type(exc).__name__,
                delay,
            )
        return delay

    async def _exchange_once(self, peer: Peer, long_poll: bool) -> None:
        assert self.ident is not None
        # Work that arrives in an exchange a wake-up caused was pushed by the
        # server; work found at the agent's own poll was pulled (SPEC 5).
        self.woken, self.tickled = self.tickled, False
        above = self.acks.send_above(peer)
        pending = self.state.pending_seqs(MAX_MESSAGES, SEND_BUDGET, above)
        messages = [text for _, text in pending]
        wait = LONG_POLL_WAIT if long_poll and not messages else 0.0
        due = self._relay_due()
        if wait and due is not None:
            wait = min(wait, max(1.0, due))  # back in time for a check, failover or probe
        body = self._request_body(peer, bool(messages), wait)
        raw = json.dumps(body, separators=(",", ":")).encode()
        if messages:  # splice the stored JSON texts in as they are
            raw = raw.replace(b'"@@"', ("[" + ",".join(messages) + "]").encode(), 1)
        headers = {
            "X-Taskfleet-Computer": str(self.ident.computer_id),
            "Authorization": f"Bearer {self.ident.secret}",
        }
        conn = self.relay_conn if peer is Peer.RELAY and self.relay_conn else self.conn
        post = asyncio.ensure_future(
            conn.post(EXCHANGE_PATH, raw, headers, timeout=EXCHANGE_HTTP_TIMEOUT + wait)
        )
        if wait:
            # Abandon the long poll as soon as we have something to say.
            trig = asyncio.ensure_future(self.trigger.wait())
            done, _ = await asyncio.wait({post, trig}, return_when=asyncio.FIRST_COMPLETED)
            trig.cancel()
            if post not in done:
                post.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await post
                return
        reply = parse_server_reply(loads_reply(await post))
        top = self.state.last_seq
        server_ack = reply.server_ack if peer is Peer.RELAY else None
        if reply.ack > top or (server_ack or 0) > top:
            # It would drop results that were never sent.
            raise ProtocolError(f"ack {reply.ack} is beyond the last message sent")
        if reply.identity is not None:
            # Kept before anything of this reply is acted on or acknowledged.
            if peer is Peer.SERVER:
                self.state.save_identity_nonce(reply.identity)
            else:
                self.state.save_relay_identity_nonce(reply.identity)
        self.exchanges += 1
        if "agent" in body:
            self.info_sent = True
        # Kept until the SERVER has them: a relay's ack only says what it holds.
        self.state.acked(self.acks.replied(peer, reply.ack, server_ack))
        self._apply_settings(reply.settings)
        self.inventory.asked(reply.inventory)
        if self.verifier is not None and reply.server_time is not None:
            self.verifier.set_clock_offset(reply.server_time - time.time())
        self.ops.receive(reply.messages, pushed=bool(wait) or self.woken)
        sent_top = pending[-1][0] if pending else above
        if self.state.queued_above(max(sent_top, self.acks.send_above(peer))):
            self.trigger.set()  # more than one exchange holds, or queued meanwhile
        if messages and reply.messages:
            self.trigger.set()
        if reply.more:  # the reply was full: the server holds more for us
            self.trigger.set()
        moved = reassigned(peer, self.relay_url, reply.relay)
        if moved is not None:
            await self._move_to_relay(moved)

    def _request_body(self, peer: Peer, messages: bool, wait: float) -> dict[str, Any]:
        """An exchange's body; ``"messages": "@@"`` marks where the stored texts go."""
        body: dict[str, Any] = {"ack": self.state.server_seq}
        if messages:
            body["messages"] = "@@"
        # A probe says who it is: the relay forwards that at once, so the server knows
        # this computer is behind its relay again (and wakes it through the relay).
        probe = peer is Peer.RELAY and self.failover is not None and self.failover.direct
        if not self.info_sent or probe:
            body["agent"] = {
                "tickle_port": self.config.tickle_port or None,
                "version": __version__,
                "policy": self.policy,
            }
        if wait:
            body["wait"] = wait
        # Which copy of this identity speaks (domain/identity.py). The server and the
        # relay each keep a lineage of their own: each is shown only its own nonce.
        if peer is Peer.SERVER:
            nonce = self.state.identity_nonce
        else:
            nonce = self.state.relay_identity_nonce
        if nonce is not None:
            body["identity"] = nonce
        return body

    def _use_relay(self, url: str) -> None:
        """Exchange through the relay at ``url`` from now on (behind it, not failed over)."""
        self.relay_url = url
        self.relay_conn = Connection(url, timeout=EXCHANGE_HTTP_TIMEOUT)
        self.failover = Failover(self.config.relay_failover_after, self.config.relay_probe_interval)
        self.acks.moved()

    async def _move_to_relay(self, url: str) -> None:
        """The server assigned this computer to the relay at ``url``: kept (so a restart
        stays with it) before the agent goes behind it, at once."""
        log.warning(
            "the server assigned this computer to relay %s: exchanging through it%s",
            url,
            f", no longer {self.relay_url}" if self.relay_url else "",
        )
        self.state.save_relay_assignment(url)
        old = self.relay_conn
        self._use_relay(url)
        self.info_sent = False  # like a probe: the relay tells the server at once
        if old is not None:
            await old.close()
        self.trigger.set()

    def _apply_settings(self, settings: ServerSettings) -> None:
        if self.config.poll_interval is None and settings.poll_interval is not None:
            self.poll_interval = settings.poll_interval


def _identity_conflict(exc: Exception) -> bool:
    """The server refused this computer: two agents use its identity (server/identity.py)."""
    return isinstance(exc, HttpError) and exc.status == 409 and b"identity-conflict" in exc.body


def _own_user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def run_agent(config: AgentConfig) -> None:
    asyncio.run(Agent(config).run())
