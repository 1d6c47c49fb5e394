"""The server keeps its secrets private: data folder 0700, SQLite files 0600, whatever the umask.

The SQLite file holds the signing seed and the tickle master key; its -wal and
-shm files hold the same pages. A real server started under a permissive umask
must still create them readable by its own user only, and a database file that
others can read must stop the server with a message that says how to fix it.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import BACKEND, Proc, Server, enroll_token, free_port, spawn, wait_until


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def start_with_umask(tmp_path: Path, database_url: str, umask: int) -> tuple[Proc, str, Path]:
    data_dir = tmp_path / "server"
    port = free_port()
    proc = spawn(
        [
            "sh",
            "-c",
            f'umask {umask:03o} && exec "$0" "$@"',
            sys.executable,
            "-m",
            "taskfleet",
            "server",
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(data_dir),
            "--database",
            database_url,
        ],
        tmp_path / "server.log",
    )
    return proc, f"http://127.0.0.1:{port}", data_dir


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_server_creates_its_folder_0700_and_sqlite_files_0600_whatever_the_umask(
    tmp_path, database_url, umask
):
    proc, url, data_dir = start_with_umask(tmp_path, database_url, umask)
    try:

        def up() -> bool:
            if not proc.alive():
                raise AssertionError(f"server exited:\n{proc.text()[-3000:]}")
            try:
                return httpx.get(url + "/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 60, "server to start")
        token_file = data_dir / "admin-token"
        token = wait_until(lambda: token_file.exists() and token_file.read_text().strip())
        # A write, so the -wal and -shm files exist while the server runs.
        r = httpx.post(
            url + "/api/v1/groups",
            json={"name": "web"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert r.status_code == 201, r.text
        assert mode(data_dir) == 0o700
        assert mode(token_file) == 0o600
        if BACKEND == "sqlite":
            db_file = data_dir / "taskfleet.sqlite3"
            files = [db_file, Path(f"{db_file}-wal"), Path(f"{db_file}-shm")]
            assert all(f.exists() for f in files), sorted(p.name for p in data_dir.iterdir())
            assert {f.name: oct(mode(f)) for f in files} == {f.name: "0o600" for f in files}
    finally:
        proc.stop()


@pytest.mark.skipif(BACKEND != "sqlite", reason="the keys live in a file only with SQLite")
@pytest.mark.parametrize("loose", [0o644, 0o640])
def test_server_refuses_to_start_when_others_can_read_its_database(
    start_server, tmp_path, database_url, loose
):
    server: Server = start_server()
    server.proc.stop()
    db_file = Path(database_url.split(":///", 1)[1])
    os.chmod(db_file, loose)
    proc, _, _ = start_with_umask(tmp_path, database_url, 0o022)
    try:
        wait_until(lambda: proc.popen.poll() is not None, 60, "the server to exit")
    finally:
        proc.stop()
    assert proc.popen.returncode != 0
    log = proc.text()
    assert "refusing to start" in log, log[-3000:]
    assert f"{db_file} (mode {loose:04o})" in log
    assert f"chmod 600 {db_file}" in log
    assert "Traceback" not in log
    assert mode(db_file) == loose  # it says what to do; it does not change it


def test_agent_state_folder_and_files_are_private_whatever_the_umask(server, start_agent, tmp_path):
    # The state file holds the computer's secret and tickle key.
    old = os.umask(0o022)  # the agent inherits it
    try:
        agent = start_agent(server, enroll_token(server), state_dir=tmp_path / "nested" / "state")
    finally:
        os.umask(old)
    state = agent.state_dir / "state.db"
    files = [state, Path(f"{state}-wal"), Path(f"{state}-shm")]
    wait_until(lambda: all(f.exists() for f in files), 10, "the state files")
    assert mode(agent.state_dir) == 0o700
    assert {f.name: oct(mode(f)) for f in files} == {f.name: "0o600" for f in files}
