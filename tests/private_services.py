"""Private PostgreSQL and RabbitMQ instances for the tests that restart them.

The machine's shared services (PostgreSQL on 5432, RabbitMQ on 5672) serve other work
and are never restarted: a test that bounces a database or a broker starts its own, on
free ports, with its data in the test's tmp_path, and stops it at the end. Both run as
their service user (``runuser``), since the servers refuse to run as root. Where that
is not possible the test is skipped with the reason (failed under
``TASKFLEET_REQUIRE_SERVICES=1``, as for the shared services).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import _service_missing, free_port, wait_until


def _pg_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    if found:
        return Path(found[0]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).resolve().parent if pg_ctl else None


def _as(user: str, *args: str, timeout: float = 60, env: dict | None = None) -> str:
    out = subprocess.run(
        ["runuser", "-u", user, "--", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr[-2000:]}")
    return out.stdout


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own: ``url`` of its database ``tf``;
    ``stop(mode)``, ``start()``, ``restart(mode)`` with pg_ctl's modes."""

    def __init__(self, root: Path, bindir: Path) -> None:
        self.root, self.bin = root, bindir
        self.data = root / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/tf"

    def _pg_ctl(self, *args: str) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        _as(
            "postgres",
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "postgres.log"),
            "-o",
            opts,
            "-w",
            "-t",
            "30",
            *args,
        )

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.root, "postgres")
        _as(
            "postgres",
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        self.start()
        _as(
            "postgres",
            str(self.bin / "createdb"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "tf",
        )

    def start(self) -> None:
        self._pg_ctl("start")

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("-m", mode, "stop")

    def restart(self, mode: str = "fast") -> None:
        self._pg_ctl("-m", mode, "restart")


@contextlib.contextmanager
def private_postgres(tmp_path: Path) -> Iterator[PrivatePostgres]:
    bindir = _pg_bindir()
    if bindir is None or shutil.which("runuser") is None:
        _service_missing("no PostgreSQL binaries (pg_ctl) or no runuser to start a private one")
    # Not in tmp_path: pytest makes its folders 0700 for root, and postgres must reach it.
    root = Path(tempfile.mkdtemp(prefix="tf-pg-"))
    pg = PrivatePostgres(root, bindir)  # type: ignore[arg-type]
    try:
        pg.init()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        with contextlib.suppress(Exception):
            pg.stop("immediate")
        _service_missing(f"cannot start a private PostgreSQL: {exc}")
    try:
        yield pg
    finally:
        with contextlib.suppress(Exception):
            pg.stop("immediate")
        shutil.copy(root / "postgres.log", tmp_path / "postgres.log")
        shutil.rmtree(root, ignore_errors=True)


class PrivateRabbit:
    """A RabbitMQ node of the test's own (``tf<random>@localhost`` on free ports, its
    data in a folder of the test's): ``url``; ``stop()`` and ``start()`` the whole node,
    ``stop_app()`` and ``start_app()`` the broker in it; on the same data either way,
    so durable queues and their messages survive."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.node = f"tf{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(root / "log"),
            "RABBITMQ_CONFIG_FILE": str(root / "rabbit"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "plugins"),
            "HOME": str(root),
        }

    def init(self) -> None:
        for d in ("mnesia", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        # guest may log in over loopback only: keep it that way (127.0.0.1 is loopback).
        (self.root / "rabbit.conf").write_text(f"listeners.tcp.default = {self.port}\n")
        (self.root / "plugins").write_text("[].\n")
        subprocess.run(["chown", "-R", "rabbitmq", str(self.root)], check=True)
        self.start()

    def start(self) -> None:
        with open(self.root / "server.out", "ab") as out:
            self.proc = subprocess.Popen(
                ["rabbitmq-server"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited: {self.log()[-2000:]}")
            return _listening(self.port)

        try:
            wait_until(up, 60, "the private RabbitMQ node")
        except AssertionError as exc:
            raise RuntimeError(str(exc)) from exc

    def log(self) -> str:
        p = self.root / "server.out"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self) -> None:
        subprocess.run(
            ["rabbitmqctl", "-n", self.node, "stop"],
            env=self.env,
            capture_output=True,
            timeout=60,
        )
        if self.proc is not None:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        wait_until(lambda: not _listening(self.port), 20, "the private node to stop")

    def _ctl(self, *args: str) -> None:
        out = subprocess.run(
            ["rabbitmqctl", "-n", self.node, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {out.stderr[-2000:]}")

    def stop_app(self) -> None:
        """Stop the broker (every connection closed, the port shut) but not its Erlang
        node: starting it again (``start_app``) takes seconds, not a whole boot."""
        self._ctl("stop_app")
        wait_until(lambda: not _listening(self.port), 20, "the broker to stop")

    def start_app(self) -> None:
        self._ctl("start_app")
        wait_until(lambda: _listening(self.port), 60, "the broker to start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait(10)


@contextlib.contextmanager
def private_rabbit(tmp_path: Path) -> Iterator[PrivateRabbit]:
    if shutil.which("rabbitmq-server") is None or shutil.which("rabbitmqctl") is None:
        _service_missing("no rabbitmq-server to start a private RabbitMQ node")
    # Not in tmp_path: pytest makes its folders 0700 for root, and rabbitmq must reach it.
    root = Path(tempfile.mkdtemp(prefix="tf-rabbit-"))
    node = PrivateRabbit(root)
    try:
        node.init()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        node.kill()
        _service_missing(f"cannot start a private RabbitMQ node: {exc}")
    try:
        yield node
    finally:
        with contextlib.suppress(Exception):
            node.stop()
        node.kill()
        with contextlib.suppress(OSError):
            shutil.copy(root / "server.out", tmp_path / "rabbitmq.out")
        shutil.rmtree(root, ignore_errors=True)
