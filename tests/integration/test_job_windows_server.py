"""Jobs and maintenance windows on the server (issue 12, SPEC 9): a computer whose window
is closed still gets its job (Analyze and Download run outside the window), with its
windows in the job's signed text, while its other work waits; a job waiting on the
computer for its window is not declared lost. Real app, store and protocol on a fake
clock; the agent is a raw one (``tests/job_agent.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import sqlalchemy as sa

from taskfleet.protocol.exchange import operation_status
from taskfleet.protocol.jobs import job_step
from taskfleet.protocol.signing import Verifier
from taskfleet.store.schema import activities
from tests.inproc import START, Harness, inproc_server
from tests.integration.test_jobs_server import _agents, _content, _create

WINDOW = {"window": "01:00-03:00", "utc_offset": 60}  # START is 23:13 at UTC+1: closed


async def _activity(h: Harness, op: int) -> dict[str, object]:
    async with h.rt.read.connect() as conn:
        row = (await conn.execute(sa.select(activities).where(activities.c.id == op))).one()
    return dict(row._mapping)


async def test_a_job_is_handed_out_with_its_windows_while_a_script_waits_for_them(
    database_url: str, tmp_path: Path
) -> None:
    async with inproc_server(database_url, tmp_path, lost_grace=60) as h:
        await _content(h)
        [a, b] = await _agents(h, 2)
        await h.ok("POST", "/groups", {"name": "db"})
        await h.ok("POST", "/groups/db/members", {"computer_ids": [a.computer_id]})
        await h.ok("PUT", "/groups/db/window", {"window": "01:00-03:00", "utc_offset": "+01:00"})
        script = await h.run(f"computer:{a.computer_id},{b.computer_id}")
        job = await _create(h, [a, b])
        # Not delivered yet: the script says it waits for the window, the job does not.
        for request, held in [(script, True), (job, False)]:
            [x] = [
                x
                for x in await h.ok("GET", f"/activities?request_id={request['id']}")
                if x["computer_id"] == a.computer_id
            ]
            detail = await h.ok("GET", f"/activities/{x['id']}")
            assert ("maintenance window 01:00-03:00" in str(detail.get("held"))) is held
        got = await a.ops()
        # The job, not the script: the window holds the script as before.
        assert [json.loads(m["body"])["type"] for m in got] == ["job"]
        Verifier(a.public_key).verify(got[0]["body"], got[0]["sig"])
        assert json.loads(got[0]["body"])["windows"] == [WINDOW]
        # Outside the group: both, and no windows in either signed text.
        bodies = [json.loads(m["body"]) for m in await b.ops()]
        assert sorted(x["type"] for x in bodies) == ["execute-script", "job"]
        assert all("windows" not in x for x in bodies)
        assert await h.states(script["id"]) == {
            a.computer_id: "queued",
            b.computer_id: "in_progress",
        }

        # On the computer: Download done, then Deferred until the window opens (in the
        # same exchange). The step must not cut the deferred deadline short.
        op = got[0]["op"]
        until = START + 3 * 3600
        report = job_step(op, "download", 1, "succeeded", "2 file(s)", START)
        waits = operation_status(op, "deferred", 1, until, "install of item 0 waits")
        await a.exchange([a.numbered(report), a.numbered(waits)])
        row = await _activity(h, op)
        assert row["deadline_at"] == until + 600 + 60
        assert "deferred by the computer: install of item 0 waits" in str(row["reason"])
        h.clock.advance(2 * 3600)  # far past a step's own deadline (600 + 60)
        await h.tick()
        assert (await _activity(h, op))["state"] == "in_progress"  # waiting, not lost
