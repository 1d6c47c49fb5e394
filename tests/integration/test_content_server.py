"""Content by hash on the server (issue 12) over the real app, store and data folder.

Add, list, show, remove through the API (tests/inproc.py) on the selected database;
the same bytes twice are one file; bad input (a hash that does not match, too many
bytes, a bad hash in a path) changes nothing; remove is refused while an unfinished
job references the content (the job rows inserted through the store: the job API is
another branch's); tenants never see, fetch or delete each other's content; agents and
relays fetch with their exchange credentials, with Range.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from taskfleet.domain.jobs import JOB, validate_job_spec
from taskfleet.server import metrics
from taskfleet.server.api import content as content_api
from taskfleet.server.tokens import mint_admin_token
from taskfleet.store.schema import activities, audit_log, content, jobs, requests, tenants
from tests.inproc import Harness, inproc_server
from tests.raw_relay import enrolled_relay

DATA = b"patch bytes " * 1000
SHA = hashlib.sha256(DATA).hexdigest()


async def _add(
    h: Harness, data: bytes, name: str = "p.msi", token: str | None = None, **headers: str
) -> httpx.Response:
    return await h.client.post(
        "/api/v1/content",
        params={"name": name},
        content=data,
        headers={**h.headers(token), "content-type": "application/octet-stream", **headers},
    )


def _files(data_dir: Path) -> list[str]:
    root = data_dir / "content"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


async def _rows(h: Harness) -> list[Any]:
    async with h.rt.read.connect() as conn:
        return list(await conn.execute(sa.select(content)))


async def test_add_list_show_remove_and_the_same_bytes_twice(
    database_url: str, tmp_path: Path
) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        r = await _add(h, DATA)
        assert r.status_code == 201, r.text
        row = r.json()
        assert (row["sha256"], row["size"], row["name"]) == (SHA, len(DATA), "p.msi")
        path = tmp_path / "content" / SHA[:2] / SHA
        assert path.read_bytes() == DATA
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.parent.stat().st_mode & 0o777 == 0o700
        assert (tmp_path / "content").stat().st_mode & 0o777 == 0o700

        again = await _add(h, DATA, name="other-name")
        assert again.status_code == 200, again.text
        assert again.json() == row  # the row as it was
        assert _files(tmp_path) == [f"{SHA[:2]}/{SHA}"]
        assert len(await _rows(h)) == 1

        assert [c["sha256"] for c in await h.ok("GET", "/content")] == [SHA]
        shown = await h.ok("GET", f"/content/{SHA.upper()}")
        assert shown["jobs"] == [] and shown["size"] == len(DATA)

        out = await h.ok("DELETE", f"/content/{SHA}")
        assert out == {"sha256": SHA, "removed": True, "file_deleted": True}
        assert _files(tmp_path) == [] and await _rows(h) == []
        assert (await h.call("GET", f"/content/{SHA}")).status_code == 404
        assert (await h.call("DELETE", f"/content/{SHA}")).status_code == 404
        actions = [e["action"] for e in await h.ok("GET", "/audit?outcome=ok")]
        assert actions[:2] == ["content.remove", "content.add"]
        assert actions.count("content.add") == 1  # the second add added nothing


async def test_bad_input_changes_nothing(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        wrong = hashlib.sha256(b"something else").hexdigest()
        r = await _add(h, DATA, **{"X-Content-SHA256": wrong})
        assert r.status_code == 400 and "nothing stored" in r.json()["error"], r.text
        r = await _add(h, DATA, **{"X-Content-SHA256": "zz"})
        assert r.status_code == 400 and "64 hex digits" in r.json()["error"], r.text
        for name in ("", "a\nb", "x" * 256):
            assert (await _add(h, DATA, name=name)).status_code == 400
        monkeypatch.setattr(content_api, "CONTENT_MAX_BYTES", 1000)
        r = await _add(h, DATA)  # declared too large
        assert r.status_code == 413, r.text

        async def streamed() -> Any:  # no Content-Length: counted as it comes
            for _ in range(20):
                yield b"x" * 100

        r = await h.client.post(
            "/api/v1/content", params={"name": "big"}, content=streamed(), headers=h.headers()
        )
        assert r.status_code == 413, r.text
        for bad in ("nothex", "a" * 63, "g" * 64, SHA + "0"):
            r = await h.call("GET", f"/content/{bad}")
            assert r.status_code == 404 and "64 hex digits" in r.json()["error"], r.text
            assert (await h.call("DELETE", f"/content/{bad}")).status_code == 404
        viewer = await h.token("viewer")
        assert (await _add(h, DATA, token=viewer)).status_code == 403
        assert (await _add(h, DATA, token="tfa_nope")).status_code == 401
        assert _files(tmp_path) == [] and await _rows(h) == []
        async with h.rt.read.connect() as conn:
            actions = [r.action for r in await conn.execute(sa.select(audit_log.c.action))]
        assert not [a for a in actions if a.startswith("content.")]


async def _job(h: Harness, shas: list[str], state: str) -> tuple[int, int]:
    """A job request of the default tenant naming ``shas``, with one activity in
    ``state`` (rows inserted as the job API would: params = JobSpec.as_json())."""
    spec = validate_job_spec(
        {
            "name": "May patches",
            "phases": ["download", "install"],
            "items": [
                {
                    "name": "kb1",
                    "content": [
                        {"sha256": s, "size": len(DATA), "name": f"f{i}"}
                        for i, s in enumerate(shas)
                    ],
                    "install": {"argv": ["true"]},
                }
            ],
        }
    )
    now = h.clock()

    async def insert(conn: Any) -> tuple[int, int]:
        rid = (
            await conn.execute(
                requests.insert()
                .values(
                    tenant_id=1,
                    type=JOB,
                    params=spec.as_json(),
                    target="all",
                    created_by="token:1",
                    created_at=now,
                    timeout=60,
                    total=1,
                )
                .returning(requests.c.id)
            )
        ).scalar_one()
        await conn.execute(jobs.insert().values(request_id=rid, tenant_id=1, name=spec.name))
        aid = (
            await conn.execute(
                activities.insert()
                .values(
                    tenant_id=1,
                    request_id=rid,
                    kind="client",
                    type=JOB,
                    state=state,
                    created_at=now,
                    updated_at=now,
                )
                .returning(activities.c.id)
            )
        ).scalar_one()
        return int(rid), int(aid)

    return await h.rt.writer.run(insert)


async def test_remove_is_refused_while_an_unfinished_job_references_it(
    database_url: str, tmp_path: Path
) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        assert (await _add(h, DATA)).status_code == 201
        done_job, _ = await _job(h, [SHA], "succeeded")
        busy_job, aid = await _job(h, [SHA], "in_progress")
        shown = await h.ok("GET", f"/content/{SHA}")
        assert shown["jobs"] == [done_job, busy_job]
        assert shown["unfinished_jobs"] == [busy_job]
        r = await h.call("DELETE", f"/content/{SHA}")
        assert r.status_code == 409, r.text
        assert f"unfinished job(s) {busy_job}" in r.json()["error"]
        assert _files(tmp_path) == [f"{SHA[:2]}/{SHA}"] and len(await _rows(h)) == 1

        async def finish(conn: Any) -> None:
            await conn.execute(
                activities.update().where(activities.c.id == aid).values(state="canceled")
            )

        await h.rt.writer.run(finish)
        await h.ok("DELETE", f"/content/{SHA}")
        assert _files(tmp_path) == []


async def _other_tenant(h: Harness) -> str:
    """An admin token of a second tenant (tenants cannot be made through the API)."""
    now = h.clock()

    async def make(conn: Any) -> str:
        await conn.execute(tenants.insert().values(name="other", created_at=now))
        return (await mint_admin_token(conn, now, tenant="other", actor="test"))[1]

    return await h.rt.writer.run(make)


async def _agent(h: Harness, token: str | None = None) -> dict[str, str]:
    tok = (await h.ok("POST", "/tokens", {"kind": "enroll", "name": "e"}, token=token))["token"]
    r = await h.client.post(
        "/agent/v1/enroll", json={"token": tok, "hostname": "pc", "machine_id": tok[-12:]}
    )
    assert r.status_code == 201, r.text
    d = r.json()
    return {"x-taskfleet-computer": str(d["computer_id"]), "authorization": f"Bearer {d['secret']}"}


async def test_tenants_do_not_see_or_fetch_each_others_content(
    database_url: str, tmp_path: Path
) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        theirs = await _other_tenant(h)
        assert (await _add(h, DATA)).status_code == 201
        assert await h.ok("GET", "/content", token=theirs) == []
        assert (await h.call("GET", f"/content/{SHA}", token=theirs)).status_code == 404
        assert (await h.call("DELETE", f"/content/{SHA}", token=theirs)).status_code == 404
        their_agent = await _agent(h, theirs)
        r = await h.client.get(f"/agent/v1/content/{SHA}", headers=their_agent)
        assert r.status_code == 404, r.text
        relay_tok = (await h.ok("POST", "/tokens", {"kind": "relay", "name": "r"}, token=theirs))[
            "token"
        ]
        their_relay = await enrolled_relay(h.client, relay_tok, "theirs")
        r = await h.client.get(f"/relay/v1/content/{SHA}", headers=their_relay.headers())
        assert r.status_code == 404, r.text

        # The same bytes added by both: one file, kept until the last row goes.
        assert (await _add(h, DATA, token=theirs)).status_code == 201
        assert _files(tmp_path) == [f"{SHA[:2]}/{SHA}"]
        assert (await h.ok("DELETE", f"/content/{SHA}"))["file_deleted"] is False
        assert _files(tmp_path) == [f"{SHA[:2]}/{SHA}"]
        r = await h.client.get(f"/agent/v1/content/{SHA}", headers=their_agent)
        assert r.status_code == 200 and r.content == DATA
        assert (await h.ok("DELETE", f"/content/{SHA}", token=theirs))["file_deleted"] is True
        assert _files(tmp_path) == []


async def test_agents_and_relays_fetch_with_their_credentials_and_range(
    database_url: str, tmp_path: Path
) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        assert (await _add(h, DATA)).status_code == 201
        me = await _agent(h)
        path = f"/agent/v1/content/{SHA}"
        before = metrics.CONTENT_TO_AGENTS._value.get()
        r = await h.client.get(path, headers=me)
        assert r.status_code == 200 and r.content == DATA
        assert r.headers["content-length"] == str(len(DATA))
        assert r.headers["accept-ranges"] == "bytes"
        r = await h.client.get(path, headers={**me, "range": "bytes=100-"})
        assert r.status_code == 206 and r.content == DATA[100:]
        assert r.headers["content-range"] == f"bytes 100-{len(DATA) - 1}/{len(DATA)}"
        assert metrics.CONTENT_TO_AGENTS._value.get() - before == 2 * len(DATA) - 100
        r = await h.client.get(path, headers={**me, "range": f"bytes={len(DATA)}-"})
        assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(DATA)}"
        r = await h.client.get(path, headers={**me, "range": "bytes=-5"})  # ignored: all of it
        assert r.status_code == 200 and r.content == DATA
        for bad in ({}, {**me, "authorization": "Bearer tfc_wrong"}, {"x-taskfleet-computer": "x"}):
            assert (await h.client.get(path, headers=bad)).status_code == 401
        assert (await h.client.get(f"/agent/v1/content/{'0' * 64}", headers=me)).status_code == 404
        assert (await h.client.get("/agent/v1/content/nothex", headers=me)).status_code == 404

        relay_tok = (await h.ok("POST", "/tokens", {"kind": "relay", "name": "r"}))["token"]
        relay = await enrolled_relay(h.client, relay_tok, "branch")
        rpath = f"/relay/v1/content/{SHA}"
        before = metrics.CONTENT_TO_RELAYS._value.get()
        r = await h.client.get(rpath, headers=relay.headers())
        assert r.status_code == 200 and r.content == DATA
        assert metrics.CONTENT_TO_RELAYS._value.get() - before == len(DATA)
        bad = relay.headers("tfrs_wrong")
        assert (await h.client.get(rpath, headers=bad)).status_code == 401
        # An agent's credentials are not a relay's, nor the other way round.
        assert (await h.client.get(rpath, headers=me)).status_code == 401
        assert (await h.client.get(path, headers=relay.headers())).status_code == 401
