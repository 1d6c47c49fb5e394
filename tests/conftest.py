"""Shared fixtures: real databases, real server and agent processes, deadlines.

``TASKFLEET_TEST_DB`` selects the store: ``sqlite`` (default) or ``postgresql``
(``TASKFLEET_PG_URL``, default postgresql://postgres@127.0.0.1:5432/test). Each
test gets its own database. A missing service skips its tests with a reason,
unless ``TASKFLEET_REQUIRE_SERVICES=1`` (CI), where it fails. RabbitMQ is
``TASKFLEET_AMQP_URL`` (default amqp://guest:guest@127.0.0.1:5672/); each test
gets a queue of its own (``amqp_url``).

Tests that need a service carry the ``services`` marker, set here from the
fixtures they use (``amqp_url``; ``database_url`` when the backend is
PostgreSQL), so ``-m "not services"`` runs what needs no service at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, settings

# Hypothesis's timing checks (a 200 ms deadline per example, "input generation is
# slow") measure the machine's load, not the property: scripts/test runs the suite on
# several xdist workers beside real server and agent processes. Tests that set their
# own settings still override these.
settings.register_profile("taskfleet", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("taskfleet")

AMQP = os.environ.get("TASKFLEET_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
PG_URL = os.environ.get("TASKFLEET_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REQUIRE = os.environ.get("TASKFLEET_REQUIRE_SERVICES") == "1"
BACKEND = os.environ.get("TASKFLEET_TEST_DB", "sqlite")


def wait_until(check: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


# Under pytest-xdist each worker takes only its own share of the ports (``_my_port``):
# bind(0) picks a random free port and the test closes it before the process that
# uses it binds it, so two workers asking at the same moment could be handed the
# same one (3000 bind(0) calls here give only ~2700 distinct ports).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)


def _my_port(port: int) -> bool:
    # TCP bind(0) hands out odd ports only (connect() takes even ones), so the share
    # goes by port // 2: every port pair belongs to exactly one worker.
    return (port // 2) % _WORKERS == _WORKER


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port nothing listens on now, and that no other xdist worker is handed."""
    while True:
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if _my_port(port):
            return port


def _service_missing(message: str) -> None:
    if REQUIRE:
        pytest.fail(f"{message} (TASKFLEET_REQUIRE_SERVICES=1)")
    pytest.skip(message)


def _reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture
def amqp_url() -> Iterator[str]:
    """A queue of this test's own on the local RabbitMQ (``?queue=``), dropped afterwards
    with its cancel fanout; skips without RabbitMQ, fails under TASKFLEET_REQUIRE_SERVICES."""
    if not _reachable():
        _service_missing("RabbitMQ unavailable at 127.0.0.1:5672")
    name = "tf_test_" + uuid.uuid4().hex[:12]
    yield f"{AMQP}?queue={name}"

    async def drop() -> None:
        import aio_pika

        conn = await aio_pika.connect(AMQP)
        async with conn:
            channel = await conn.channel()
            await channel.queue_delete(name)
            await channel.exchange_delete(f"{name}.control")  # the cancel fanout

    with contextlib.suppress(Exception):
        asyncio.run(drop())


LONGEST = {
    "tests/faults/test_api_fuzz_schemathesis.py",  # one schemathesis run over the whole API
    "tests/faults/test_random_operations_keep_the_state_table.py",  # a hypothesis machine
    "tests/faults/test_chaos.py",  # kill -9s under a steady load, then every request checked
    "tests/faults/test_rabbitmq_bounce.py",  # a private RabbitMQ node started twice
    "tests/faults/test_worker_chaos.py",  # worker kill -9s under a steady load of tasks
    "tests/faults/test_postgres_restart.py",  # a private PostgreSQL, restarted twice
    "tests/faults/test_scale_out_faults.py",  # two servers, workers, relay: six faults
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--database-tests-only",
        action="store_true",
        help="run only the tests marked `database` (what TASKFLEET_TEST_DB changes); "
        "scripts/test's PostgreSQL pass, since the rest already ran on SQLite",
    )


def _uses_database(item: pytest.Item) -> bool:
    """Whether ``TASKFLEET_TEST_DB`` can change what this test does: it uses the
    ``database_url`` fixture (directly or through ``start_server``, ``rabbit_fleet``...),
    or its module takes ``fresh_database`` or ``BACKEND`` from here."""
    if "database_url" in getattr(item, "fixturenames", ()):
        return True
    module = getattr(item, "module", None)
    return any(
        getattr(module, name, None) is obj
        for name, obj in (("fresh_database", fresh_database), ("BACKEND", BACKEND))
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that needs PostgreSQL or RabbitMQ with ``services``, and every
    test of the selected database with ``database``."""
    needs = {"amqp_url"} | ({"database_url"} if BACKEND == "postgresql" else set())
    for item in items:
        if needs & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)
        if _uses_database(item):
            item.add_marker(pytest.mark.database)
    # The longest tests first, so that xdist (`--dist load` hands tests out in this
    # order) does not start them last and wait for them alone at the end.
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in LONGEST)
    if config.getoption("--database-tests-only"):
        keep = [item for item in items if item.get_closest_marker("database")]
        config.hook.pytest_deselected(
            items=[i for i in items if not i.get_closest_marker("database")]
        )
        items[:] = keep


def _pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql)


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of the selected backend."""
    with fresh_database(tmp_path) as url:
        yield url


@contextlib.contextmanager
def fresh_database(tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of the selected backend, dropped afterwards."""
    if BACKEND == "sqlite":
        yield f"sqlite:///{tmp_path / 'server' / 'taskfleet.sqlite3'}"
        return
    if BACKEND != "postgresql":
        raise ValueError(f"TASKFLEET_TEST_DB must be sqlite or postgresql, not {BACKEND!r}")
    name = "tf_" + uuid.uuid4().hex[:16]
    try:
        _pg_admin(f"CREATE DATABASE {name}")
    except Exception as exc:  # psycopg.OperationalError and friends
        _service_missing(f"PostgreSQL unavailable at {PG_URL}: {exc}")
    base = PG_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with contextlib.suppress(Exception):
        _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "taskfleet", *args]


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    return Proc(popen, log)


def spawn_worker(
    queue: str, database: str, types: Path, log: Path, *args: str, wait: bool = True
) -> Proc:
    """A ``taskfleet worker`` process on ``queue``; with ``wait``, once it consumes."""
    proc = spawn(
        [
            *_cli("worker", "--queue", queue, "--database", database),
            *("--task-types", str(types), *args),
        ],
        log,
    )
    if wait:
        wait_until(lambda: "consuming" in proc.text() or not proc.alive(), 30, "worker")
        assert proc.alive(), proc.text()
    return proc


@dataclass
class Server:
    url: str
    port: int
    data_dir: Path
    database_url: str
    proc: Proc
    admin_token: str = ""
    args: list[str] = field(default_factory=list)
    ca: str | None = None  # an https:// server's CA file (tests/tls)

    def api(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.url + "/api/v1",
            headers={"Authorization": f"Bearer {token or self.admin_token}"},
            timeout=30,
            verify=_verify(self.ca),
        )

    def restart(self) -> None:
        self.proc.stop()
        self.proc = _start_server_proc(self)

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        key = name + (("{" + labels + "}") if labels else "")
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        return 0.0


def _verify(ca: str | None) -> ssl.SSLContext | bool:
    return ssl.create_default_context(cafile=ca) if ca else True


def _healthy(url: str, ca: str | None = None) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=2, verify=_verify(ca)).status_code == 200
    except httpx.HTTPError:
        return False


def _start_server_proc(s: Server) -> Proc:
    proc = spawn(
        _cli(
            "server",
            "--listen",
            f"127.0.0.1:{s.port}",
            "--data-dir",
            str(s.data_dir),
            "--database",
            s.database_url,
            *s.args,
        ),
        s.data_dir.parent / "server.log",
    )

    def up() -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError(f"server exited:\n{proc.text()[-3000:]}")
        return _healthy(s.url, s.ca)

    wait_until(up, 60, "server to start")
    return proc


@pytest.fixture
def start_server(tmp_path: Path, database_url: str) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(*args: str, port: int | None = None, ca: str | None = None) -> Server:
        """``ca``: the server serves HTTPS (``args`` name its certificate and key)."""
        port = port or free_port()
        s = Server(
            url=f"{'https' if ca else 'http'}://127.0.0.1:{port}",
            port=port,
            data_dir=tmp_path / "server",
            database_url=database_url,
            proc=None,  # type: ignore[arg-type]
            args=list(args),
            ca=ca,
        )
        s.proc = _start_server_proc(s)
        token_file = s.data_dir / "admin-token"
        s.admin_token = wait_until(
            lambda: token_file.exists() and token_file.read_text().strip(), 10, "admin token"
        )
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.proc.stop()


@pytest.fixture
def server(start_server: Callable[..., Server]) -> Server:
    return start_server("--lost-grace", "2", "--reaper-interval", "0.2")


@dataclass
class Agent:
    state_dir: Path
    tickle_port: int
    proc: Proc

    def status(self) -> dict[str, Any]:
        out = subprocess.run(
            _cli("agent", "--state-dir", str(self.state_dir), "status", "--json"),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    @property
    def computer_id(self) -> int:
        return int(self.status()["computer_id"])


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    agents: list[Agent] = []
    counter = iter(range(1, 10_000))

    def start(
        server: Server | str,
        enroll_token: str | None = None,
        *extra: str,
        name: str | None = None,
        state_dir: Path | None = None,
        tickle_port: int | None = None,
        allow_scripts: bool = True,
        wait_enrolled: bool = True,
        inventory: bool = False,
    ) -> Agent:
        n = next(counter)
        name = name or f"agent-{n}"
        state_dir = state_dir or tmp_path / name
        port = free_port(socket.SOCK_DGRAM) if tickle_port is None else tickle_port
        url = server if isinstance(server, str) else server.url
        args = [
            "agent",
            "--server",
            url,
            "--state-dir",
            str(state_dir),
            "--tickle-port",
            str(port),
            "--tickle-bind",
            "127.0.0.1",
            "--hostname",
            name,
            # Never the machine's own shutdown(8): a test that enables the system types
            # and posts a restart must not reboot the machine (a test's own command,
            # given in ``extra``, comes later and wins).
            "--restart-command",
            "false",
            "--shutdown-command",
            "false",
            *extra,
        ]
        if enroll_token:
            args += ["--enroll-token", enroll_token]
        if allow_scripts:
            args.append("--allow-scripts")
        if not inventory:  # its messages would change what other tests count (inventory.md)
            args.append("--no-inventory")
        proc = spawn(_cli(*args), tmp_path / f"{name}.log")
        agent = Agent(state_dir, port, proc)
        agents.append(agent)
        if wait_enrolled:

            def ready() -> bool:
                if not proc.alive():
                    raise AssertionError(f"agent exited:\n{proc.text()[-3000:]}")
                return "agent ready" in proc.text()

            wait_until(ready, 30, f"{name} to be ready")
        return agent

    yield start
    for a in agents:
        a.proc.stop()


def enroll_token(server: Server, **kw: Any) -> str:
    with server.api() as api:
        r = api.post("/tokens", json={"kind": "enroll", "name": "test", **kw})
        assert r.status_code == 201, r.text
        return str(r.json()["token"])


def run_request(server: Server, target: str, params: dict[str, Any], timeout: float = 30) -> dict:
    with server.api() as api:
        r = api.post(
            "/requests",
            json={"type": "execute-script", "target": target, "params": params, "timeout": timeout},
        )
        assert r.status_code == 201, r.text
        return r.json()


def request_done(server: Server, request_id: int, timeout: float = 30) -> dict:
    def done() -> dict | None:
        with server.api() as api:
            req = api.get(f"/requests/{request_id}").json()
        return req if req["progress"]["done"] else None

    return wait_until(done, timeout, f"request {request_id} to finish")


def activities_of(server: Server, request_id: int) -> list[dict]:
    with server.api() as api:
        rows = api.get(
            "/activities", params={"request_id": request_id, "output": True, "limit": 10000}
        ).json()
    return sorted(rows, key=lambda a: a["computer_id"])


@pytest.fixture
def rabbit_fleet(
    start_server: Callable[..., Server], amqp_url: str, tmp_path: Path, database_url: str
) -> Iterator[Callable[..., Any]]:
    """``start(*server_args)`` starts a server on this test's RabbitMQ queue and returns
    ``(server, worker, marks)``: ``worker(*args)`` starts a ``taskfleet worker`` process,
    ``marks`` is the file the ``mark`` type appends to."""
    from tests.server_tasks import MARK, TYPES  # imported here: it imports this module

    types = tmp_path / "types.toml"
    marks = tmp_path / "marks"
    types.write_text(TYPES + MARK.format(marks=marks))
    workers = []

    def start(*server_args: str):
        srv = start_server("--task-types", str(types), "--queue", amqp_url, *server_args)

        def worker(*args: str):
            proc = spawn_worker(
                amqp_url, database_url, types, tmp_path / f"worker-{len(workers)}.log", *args
            )
            workers.append(proc)
            return proc

        return srv, worker, marks

    yield start
    for w in workers:
        w.stop()


def post_action(
    server: Server, type: str, target: str, params: dict[str, Any] | None = None, **extra: Any
) -> httpx.Response:
    """POST a typed activity request (docs/activity-types.md); the raw response."""
    with server.api() as api:
        return api.post(
            "/requests", json={"type": type, "target": target, "params": params or {}, **extra}
        )
