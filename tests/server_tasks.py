"""Server tasks driven through a real server's API: task-type files and the helpers
the acceptance and fault tests share (submit, read, wait for the end or the stop).

The callables named in ``CALLABLES`` live in ``tests/cancel_handlers.py``, which
server and worker processes import by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from tests.conftest import wait_until

TYPES = """
[types.echo]
scope = "none"
command = "echo {msg}"
time_limit = 10
[types.echo.params]
msg = "str"

[types.gate]
scope = "none"
command = "sh -c 'while [ ! -e {path} ]; do sleep 0.02; done; echo passed'"
concurrency = 1
time_limit = 60
[types.gate.params]
path = "str"

[types.report]
scope = "tenant"
command = "sh -c 'while [ ! -e {path} ]; do sleep 0.02; done'"
per_tenant = true
concurrency = 1
excludes = ["import"]
[types.report.params]
path = "str"

[types.import]
scope = "none"
command = "sh -c 'while [ ! -e {path} ]; do sleep 0.02; done'"
[types.import.params]
path = "str"

[types.slow]
scope = "none"
command = "sleep 100"
time_limit = 0.5

[types.broken-callable]
scope = "none"
callable = "taskfleet.no_such_module:fn"

[types.broken-command]
scope = "none"
command = "/nonexistent/program --flag"
"""

# Appends its number to {marks}; not retry-safe, so a lost one is never run twice.
MARK = """
[types.mark]
scope = "none"
command = "sh -c 'echo {{n}} >> {marks}'"
retry_safe = false
[types.mark.params]
n = "int"
"""


def submit(server, type_, expect=201, **body):
    with server.api() as api:
        r = api.post("/tasks", json={"type": type_, **body})
    assert r.status_code == expect, r.text
    return r.json()


def task(server, tid):
    with server.api() as api:
        return api.get(f"/tasks/{tid}").json()


def finished(server, tid, timeout=30):
    return wait_until(
        lambda: (t := task(server, tid))["state"] in ("succeeded", "failed", "canceled") and t,
        timeout,
        f"task {tid} to finish",
    )


# The shell ignores TERM (and so do its children): stopping it takes SIGKILL after the
# grace, which leaves a window where the canceled task's process group is still alive.
STUBBORN = """
[types.stubborn]
scope = "none"
concurrency = 1
time_limit = 600
command = '''sh -c 'trap "" TERM; echo $$ > "$1"; while :; do sleep 0.05; done' sh {pidfile}'''
[types.stubborn.params]
pidfile = "str"
"""

CALLABLES = """
[types.async-wait]
scope = "none"
concurrency = 1
time_limit = 600
callable = "tests.cancel_handlers:wait_async"
[types.async-wait.params]
dir = "str"

[types.sync-wait]
scope = "none"
concurrency = 1
time_limit = 600
callable = "tests.cancel_handlers:wait_sync"
[types.sync-wait.params]
dir = "str"
"""


def group_alive(pgid: int) -> bool:
    """True while any process of group ``pgid`` runs (zombies do not count: an init
    that does not reap would keep them forever)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def kill_group(pgid: int | None) -> None:
    if pgid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def confirmed(server, tid, timeout=30):
    return wait_until(
        lambda: (t := task(server, tid))["stopped_at"] is not None and t,
        timeout,
        f"task {tid}'s stop to be confirmed",
    )


def held_while_alive(server, pgid, waiting, timeout=30.0):
    """Poll until process group ``pgid`` is gone, checking that task ``waiting`` never
    went In Progress meanwhile; True if the group was seen alive at least once."""
    deadline = time.monotonic() + timeout
    seen = False
    while True:
        state = task(server, waiting)["state"]  # read before looking at the group
        if not group_alive(pgid):
            return seen
        assert state == "queued", "the next task started while the canceled one still ran"
        seen = True
        assert time.monotonic() < deadline, f"process group {pgid} outlived the cancel"
        time.sleep(0.05)
