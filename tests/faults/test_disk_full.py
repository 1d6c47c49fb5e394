"""The disk under the SQLite file fills up under a steady load (issue 15): the server
refuses writes with a clear 503 ("the database is full"), not a 500 and not a crash;
reads go on; agents' exchanges get the same retryable refusal; nothing acknowledged is
lost. Once the space is back the server recovers by itself: every acknowledged request
succeeds on every computer, each activity once, each history one chain.

The SQLite file lives on a small tmpfs the test mounts (root only: skipped, with the
reason, where mounting is not permitted); a filler file takes the rest of its space.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Agent, enroll_token, wait_until
from tests.fault_checks import (
    RequestLoad,
    check_requests,
    check_sequences,
    start_server_on,
    wait_requests_end,
)

SIZE = "8m"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for the database (needs root): {out.stderr}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(path: Path) -> None:
    """Write ``path`` until the disk has no byte left."""
    with open(path, "ab", buffering=0) as f:
        for size in (1 << 20, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)
    with pytest.raises(OSError) as exc, open(path, "ab", buffering=0) as f:
        f.write(b"\0")
    assert exc.value.errno == errno.ENOSPC


def test_a_full_disk_refuses_writes_clearly_and_the_server_recovers_by_itself(
    small_disk: Path, tmp_path: Path, start_agent: Callable[..., Agent]
) -> None:
    server = start_server_on(
        tmp_path / "server",
        f"sqlite:///{small_disk / 'taskfleet.sqlite3'}",
        *("--lost-grace", "2", "--reaper-interval", "0.2"),
    )
    try:
        token = enroll_token(server)
        agents = [start_agent(server, token, name=f"full-{i}") for i in range(2)]
        filler = small_disk / "filler"
        with RequestLoad(server, every=0.3) as load:
            wait_until(lambda: len(load.acknowledged) >= 3, 20, "a first stretch of load")
            seqs = check_sequences(server, agents)
            fill(filler)
            # SQLite writes into the space its files already hold for a while: the
            # refusal comes when one of them has to grow.
            wait_until(lambda: load.refused[503], 30, "a write refused")
            assert any("database is full" in e for e in load.errors), load.errors
            full_at = len(load.acknowledged)
            # Reads go on, and so does the server.
            with server.api() as api:
                for rid in load.acknowledged[:3]:
                    assert api.get(f"/requests/{rid}").status_code == 200
                assert api.get("/computers").status_code == 200
                r = api.post("/tokens", json={"kind": "enroll", "name": "while-full"})
                assert r.status_code == 503, r.text
                assert r.json()["error"].startswith("the database is full"), r.text
                assert r.headers["Retry-After"]
            # The agents reporting their results were told the same, and retry.
            wait_until(
                lambda: server.metric("taskfleet_exchange_errors_total", 'reason="unavailable"'),
                30,
                "an agent exchange refused",
            )
            assert server.proc.alive()
            os.unlink(filler)
            wait_until(lambda: len(load.acknowledged) > full_at + 2, 30, "writes to resume")
        assert 500 not in load.refused and "down" not in load.refused, load.refused
        wait_requests_end(server, load.acknowledged, 60)
        check_requests(server, load.acknowledged, agents, all_succeed=True)
        check_sequences(server, agents, seqs)
        assert "Traceback" not in server.proc.text()
    finally:
        server.proc.stop()
