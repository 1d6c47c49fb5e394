"""Jobs on the server side end to end (issue 12): the ``taskfleet job`` command against a
real server process, and job steps and a terminate order through a real relay process.
The agent is a raw one (``tests/job_agent.py``: the real agent's job runner is built
elsewhere); content rows are written to the database directly (so is the content API).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from taskfleet.store.schema import content
from tests.acceptance.test_cli import tf
from tests.conftest import BACKEND, Server, enroll_token
from tests.inproc import eventually
from tests.job_agent import JobAgent, sha
from tests.relay_proc import Relay, start_relay

__all__ = ["start_relay"]  # the fixture, used by name

DATA = [b"openssl 3.0.13 package", b"curl 8.5 package"]


def add_content(server: Server, data: list[bytes] = DATA) -> list[str]:
    """Content rows as the content API would write them (built on another branch)."""
    url = server.database_url
    if BACKEND == "postgresql":
        url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                content.insert(),
                [
                    {
                        "tenant_id": 1,
                        "sha256": sha(d),
                        "size": len(d),
                        "name": f"pkg-{k}.deb",
                        "created_by": "test",
                        "created_at": 0.0,
                    }
                    for k, d in enumerate(data)
                ],
            )
    finally:
        engine.dispose()
    return [sha(d) for d in data]


ITEMS_TOML = """
[[items]]
name = "openssl"
detect = {{ argv = ["dpkg", "--compare-versions", "3.0.2", "lt", "3.0.13"] }}
content = [{{ sha256 = "{h0}" }}]
install = {{ argv = ["dpkg", "-i", "pkg-0.deb"], timeout = 900 }}

[[items]]
name = "curl"
detect = {{ script = "test -x /usr/bin/curl" }}
content = [{{ sha256 = "{h1}", name = "curl.deb" }}]
install = {{ argv = ["dpkg", "-i", "curl.deb"] }}
"""


async def test_job_commands_against_a_real_server(server: Server, tmp_path: Path) -> None:
    h0, h1 = add_content(server)
    items = tmp_path / "items.toml"
    items.write_text(ITEMS_TOML.format(h0=h0, h1=h1))
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        agent = await JobAgent.enroll(client, enroll_token(server), "web-1")
        target = f"computer:{agent.computer_id}"
        out = tf(server, "job", "create", "--name", "May patches", "--target", target,
                 "--items", str(items))  # fmt: skip
        assert "created (pending): 1 computers" in out.stdout, out.stdout
        [job] = json.loads(tf(server, "job", "list", "--json").stdout)
        assert (job["name"], job["state"], job["total"]) == ("May patches", "pending", 1)
        assert "May patches" in tf(server, "job", "list").stdout

        [op] = await agent.ops()
        body = json.loads(op["body"])
        assert body["type"] == "job"
        assert body["params"]["items"][1]["content"] == [
            {"sha256": h1, "size": len(DATA[1]), "name": "curl.deb"}
        ]
        assert body["params"]["items"][0]["install"]["timeout"] == 900
        await agent.steps(
            op["op"],
            ("analyze", 0, "succeeded"),
            ("analyze", 1, "succeeded"),
            ("download", 0, "succeeded"),
            ("download", 1, "started"),
        )
        shown = tf(server, "job", "show", str(job["id"])).stdout
        for text in ("Running", "openssl", "curl", "download 1 (curl): started", "0: openssl"):
            assert text in shown, shown

        out = tf(server, "job", "terminate", str(job["id"]), "--reason", "window over")
        assert f"job {job['id']} Terminating: 0 computers had not started" in out.stdout
        assert "1 told to stop" in out.stdout and f"waits for: {agent.computer_id} (web-1)" in (
            out.stdout
        )
        await agent.exchange()
        [order] = agent.terminates()  # signature checked with the server's public key
        assert order["op"] == op["op"]
        again = tf(server, "job", "terminate", str(job["id"]), "--reason", "twice")
        assert f"job {job['id']} was already terminating (by token:1" in again.stdout
        assert "window over" in again.stdout
        await agent.steps(
            op["op"],
            ("download", 1, "succeeded"),
            ("install", 0, "skipped"),
            ("install", 1, "skipped"),
        )
        await agent.exchange([agent.result(op["op"], "canceled")])
        final = json.loads(tf(server, "job", "show", str(job["id"]), "--watch", "--json").stdout)
        assert final["state"] == "terminated"
        [c] = final["computers"]
        assert c["state"] == "canceled"
        assert {(s["phase"], s["item"]): s["status"] for s in c["steps"]} == {
            ("analyze", 0): "succeeded",
            ("analyze", 1): "succeeded",
            ("download", 0): "succeeded",
            ("download", 1): "succeeded",
            ("install", 0): "skipped",
            ("install", 1): "skipped",
        }
        table = tf(server, "job", "show", str(job["id"])).stdout
        assert "Terminated" in table and "by token:1" in table and "skipped" in table
        after = tf(server, "job", "terminate", str(job["id"]))
        assert "already terminating" in after.stdout

        # --cron makes a schedule whose runs are jobs.
        out = tf(server, "job", "create", "--name", "nightly", "--target", target,
                 "--items", str(items), "--cron", "0 3 * * *")  # fmt: skip
        assert "schedule" in out.stdout and "first run at" in out.stdout
        [sched] = json.loads(tf(server, "schedule", "list", "--json").stdout)
        assert sched["template"]["type"] == "job"
        assert sched["template"]["params"]["items"][0]["content"][0]["size"] == len(DATA[0])


def test_job_create_refuses_bad_items_files_clearly(server: Server, tmp_path: Path) -> None:
    [h0, _] = add_content(server)
    cases = [
        ("items = [", "is not valid TOML"),
        ('[[items]]\ndetect = { argv = ["true"] }\n', "item 0: 'name' must be a non-empty string"),
        (
            '[[items]]\nname = "a"\nistall = { argv = ["x"] }\n',
            "item 0 (a): unknown field(s) istall",
        ),
        (
            '[[items]]\nname = "a"\ndetect = { argv = ["true"] }\n'
            '[[items]]\nname = "b"\ninstall = { argv = "dpkg -i" }\n',
            "item 1 (b): install: argv must be a non-empty list of strings",
        ),
        ('[[items]]\nname = "a"\ncontent = [{ sha256 = "XYZ" }]\n', "content 0: sha256 must be"),
        ("[tool]\nx = 1\n", "unknown top-level key(s) tool"),
        # Checked by the server: its message names the item and the field too.
        (
            f'[[items]]\nname = "a"\ncontent = [{{ sha256 = "{h0}" }}]\n'
            'install = { argv = ["true"] }\n',
            "item 0 (a): the analyze phase needs a detect command",
        ),
        (
            '[[items]]\nname = "a"\ndetect = { argv = ["true"] }\n'
            f'content = [{{ sha256 = "{"0" * 64}" }}]\ninstall = {{ argv = ["true"] }}\n',
            "not found in this tenant's content",
        ),
    ]
    path = tmp_path / "items.toml"
    for text, says in cases:
        path.write_text(text)
        out = tf(server, "job", "create", "--name", "x", "--target", "all", "--items", str(path),
                 check=False)  # fmt: skip
        assert out.returncode == 2, (text, out.stdout, out.stderr)
        assert says in out.stderr, (text, out.stderr)
    out = tf(server, "job", "create", "--name", "x", "--target", "all", "--items",
             str(tmp_path / "missing.toml"), check=False)  # fmt: skip
    assert out.returncode == 2 and "cannot read" in out.stderr
    assert json.loads(tf(server, "job", "list", "--json").stdout) == []


async def test_job_steps_and_terminate_through_a_real_relay(
    server: Server, start_relay: Callable[..., Relay]
) -> None:
    h0, h1 = add_content(server)
    relay = start_relay(server, "--poll-interval", "3600")
    async with httpx.AsyncClient(base_url=relay.url, timeout=30) as client:
        agent = await JobAgent.enroll(client, enroll_token(server), "behind-relay")
        body = {
            "name": "via relay",
            "target": f"computer:{agent.computer_id}",
            "phases": ["download", "install"],
            "items": [
                {"name": "openssl", "content": [{"sha256": h0}], "install": {"argv": ["true"]}},
                {"name": "curl", "content": [{"sha256": h1}], "install": {"argv": ["true"]}},
            ],
        }
        with server.api() as api:
            r = api.post("/jobs", json=body)
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]

        async def handed_out() -> list[dict[str, Any]]:
            return await agent.ops()

        [op] = await eventually(handed_out, 30, "the job to reach the agent through the relay")
        await agent.steps(op["op"], ("download", 0, "succeeded"), ("download", 1, "started"))

        async def steps_recorded() -> dict[str, Any] | None:
            with server.api() as api:
                d = api.get(f"/jobs/{job_id}").json()
            return d if len(d["computers"][0]["steps"]) == 2 else None

        d = await eventually(steps_recorded, 30, "the steps to reach the server")
        assert d["computers"][0]["step"]["item_name"] == "curl"
        with server.api() as api:
            r = api.post(f"/jobs/{job_id}/terminate", json={"reason": "through the relay"})
            assert r.status_code == 200 and r.json()["state"] == "terminating", r.text

        async def terminated_order() -> list[dict[str, Any]]:
            await agent.exchange()
            return agent.terminates()  # checked with the server's key: the relay cannot forge it

        [order] = await eventually(terminated_order, 30, "the terminate order via the relay")
        assert order["op"] == op["op"]
        await agent.steps(op["op"], ("download", 1, "succeeded"), ("install", 0, "skipped"))
        await agent.exchange([agent.result(op["op"], "canceled")])

        async def job_terminated() -> dict[str, Any] | None:
            with server.api() as api:
                d = api.get(f"/jobs/{job_id}").json()
            return d if d["state"] == "terminated" else None

        d = await eventually(job_terminated, 30, "the job to be Terminated")
        assert {(s["phase"], s["item"]): s["status"] for s in d["computers"][0]["steps"]} == {
            ("download", 0): "succeeded",
            ("download", 1): "succeeded",
            ("install", 0): "skipped",
        }
        assert d["computers"][0]["state"] == "canceled"
