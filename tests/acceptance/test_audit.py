"""The audit trail (issue 14, docs/audit.md) against a real server: who, what, when, from
which address and how it ended; refusals audited; filters; CSV and JSON-lines exports
(API and CLI); append-only in the database itself."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time

import httpx
import pytest
import sqlalchemy as sa

from taskfleet.store import db
from taskfleet.store.schema import audit_log, tenants
from tests.acceptance.test_cli import tf
from tests.raw_agent import snapshot


def entries(server, token=None, **params) -> list[dict]:
    with server.api(token) as api:
        r = api.get("/audit", params={"limit": 10000, **params})
    assert r.status_code == 200, r.text
    return r.json()


def new_token(server, role: str, name: str | None = None) -> dict:
    with server.api() as api:
        r = api.post("/tokens", json={"kind": "admin", "name": name or role, "role": role})
    assert r.status_code == 201, r.text
    return r.json()


def test_api_and_cli_actions_record_who_what_when_where_and_ok(server):
    t0 = time.time()
    with server.api() as api:
        assert api.post("/groups", json={"name": "web"}).status_code in (200, 201)
    tf(server, "group", "create", "db")
    by_object = {e["object"]: e for e in entries(server, action="group.create")}
    assert set(by_object) == {"group:web", "group:db"}
    for e in by_object.values():
        assert e["actor"] == "token:1"
        assert e["address"] == "127.0.0.1"
        assert e["outcome"] == "ok"
        assert t0 - 1 <= e["at"] <= time.time() + 1
    # Internal actors have no address: a token minted from the server's data folder.
    tf(
        server,
        "server",
        "mint-admin-token",
        "--data-dir",
        str(server.data_dir),
        "--database",
        server.database_url,
    )
    [mint] = entries(server, action="token.mint")
    assert mint["address"] is None and mint["object"] == f"token:{mint['detail']['id']}"


def test_refused_actions_are_audited_once_each_and_change_nothing(server):
    viewer = new_token(server, "viewer")
    before = snapshot(server)
    n_before = len(entries(server))
    with server.api(viewer["token"]) as api:  # the viewer tries to cancel
        r = api.post("/requests/5/cancel", json={})
        assert r.status_code == 403
    with server.api() as api:
        assert api.post("/requests/999999/cancel", json={}).status_code == 404  # unknown id
        assert api.post("/groups", json={"name": ""}).status_code == 400  # bad input
        assert api.delete("/groups/nope").status_code == 404
    with httpx.Client(base_url=server.url + "/api/v1") as anon:  # a bad token
        r = anon.post("/groups", json={"name": "x"}, headers={"Authorization": "Bearer tfa_bad"})
        assert r.status_code == 401

    assert snapshot(server) == before  # only ok entries: those did not change either
    refused = entries(server, outcome="refused")  # newest first
    assert len(entries(server)) == n_before + 5 == n_before + len(refused)
    by_action = {e["action"]: e for e in refused}
    cancel_unknown, cancel_viewer = [e for e in refused if e["action"] == "cancel_request"]
    assert cancel_unknown["object"] == "request:999999"
    assert cancel_unknown["detail"]["status"] == 404 and cancel_unknown["actor"] == "token:1"
    assert cancel_viewer["actor"] == f"token:{viewer['id']}"
    assert cancel_viewer["object"] == "request:5"
    assert cancel_viewer["detail"]["status"] == 403
    assert "operator role" in cancel_viewer["detail"]["error"]
    assert by_action["delete_group"]["object"] == "group:nope"
    bad_token, bad_input = [e for e in refused if e["action"] == "create_group"]
    assert bad_input["detail"]["status"] == 400 and bad_input["actor"] == "token:1"
    assert bad_token["actor"] == "unknown" and bad_token["detail"]["status"] == 401
    assert "tfa_bad" not in json.dumps(bad_token)
    for e in refused:
        assert e["address"] == "127.0.0.1" and e["outcome"] == "refused"
        assert e["detail"]["method"] in ("POST", "DELETE") and e["detail"]["error"]


def test_each_filter_narrows_and_pages_go_back_by_id(server):
    viewer = new_token(server, "viewer")
    with server.api() as api:
        for name in ("a1", "a2", "b1"):
            assert api.post("/groups", json={"name": name}).status_code in (200, 201)
        assert api.delete("/groups/b1").status_code == 204
    with server.api(viewer["token"]) as api:
        assert api.delete("/groups/a1").status_code == 403
    everything = entries(server)
    ids = [e["id"] for e in everything]
    assert ids == sorted(ids, reverse=True)  # newest first

    def actions(**params):
        return [(e["action"], e["object"]) for e in entries(server, **params)]

    assert actions(actor=f"token:{viewer['id']}") == [("delete_group", "group:a1")]
    assert actions(action="group.delete") == [("group.delete", "group:b1")]
    assert actions(action="group.*") == [
        ("group.delete", "group:b1"),
        ("group.create", "group:b1"),
        ("group.create", "group:a2"),
        ("group.create", "group:a1"),
    ]
    assert actions(object="group:a1") == [
        ("delete_group", "group:a1"),
        ("group.create", "group:a1"),
    ]
    assert actions(object="group:a*", outcome="ok") == [
        ("group.create", "group:a2"),
        ("group.create", "group:a1"),
    ]
    assert actions(outcome="refused") == [("delete_group", "group:a1")]
    assert actions(outcome="failed") == []
    # Time: since is inclusive, until exclusive; ISO 8601 (UTC) or epoch seconds.
    [a2] = entries(server, object="group:a2")
    assert [e["id"] for e in entries(server, since=a2["at"], until=a2["at"] + 1e-6)] == [a2["id"]]
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(a2["at"] + 3600))
    assert entries(server, since=iso) == []
    assert [e["id"] for e in entries(server, until=iso)] == ids
    # Pages: limit, then before_id.
    page1 = entries(server, limit=2)
    page2 = entries(server, limit=2, before_id=page1[-1]["id"])
    assert [e["id"] for e in page1 + page2] == ids[:4]


def test_bad_filters_are_refused_clearly(server):
    cases = [
        ({"since": "yesterday-ish"}, "since"),
        ({"until": "2026-13-45"}, "not a time"),
        ({"since": "1e20"}, "out of range"),
        ({"limit": -1}, "limit"),
        ({"limit": 10**30}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"actor": "token:1\x00"}, "control characters"),
        ({"object": "x" * 300}, "at most"),
        ({"outcome": "maybe"}, "outcome"),
        ({"format": "xml"}, "format"),
        ({"before_id": 0}, "before_id"),
    ]
    before = entries(server)
    with server.api() as api:
        for params, needle in cases:
            r = api.get("/audit", params=params)
            assert r.status_code == 400, (params, r.text)
            message = r.json()["error"]
            assert needle in message, (params, message)
    assert entries(server) == before


def _fill(server) -> None:
    """Entries with free text that CSV must escape: commas, quotes, newlines, formulas."""
    for name in ('=HYPERLINK("http://x"),1', "multi\nline, ü"):
        new_token(server, "viewer", name)
    with server.api() as api:
        for name in ("web", "db"):
            assert api.post("/groups", json={"name": name}).status_code in (200, 201)
        assert api.delete("/groups/nope").status_code == 404


def test_csv_and_jsonl_exports_hold_exactly_the_filtered_rows(server):
    _fill(server)
    filters = [{}, {"action": "token.create"}, {"outcome": "refused"}, {"object": "group:*"}]
    with server.api() as api:
        for f in filters:
            want = entries(server, **f)
            assert want or f == {}
            r = api.get("/audit", params={**f, "format": "csv"})
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
            rows = list(csv.DictReader(io.StringIO(r.text, newline="")))
            assert [int(x["id"]) for x in rows] == [e["id"] for e in want]
            for row, e in zip(rows, want, strict=True):
                assert json.loads(row["detail"]) == e["detail"]
                assert (row["actor"], row["action"], row["outcome"]) == (
                    e["actor"],
                    e["action"],
                    e["outcome"],
                )
                assert row["object"] == (e["object"] or "")
            r = api.get("/audit", params=f, headers={"Accept": "application/x-ndjson"})
            assert r.headers["content-type"].startswith("application/x-ndjson")
            lines = r.text.splitlines()
            assert [json.loads(x) for x in lines] == want
            r = api.get("/audit", params=f, headers={"Accept": "text/csv"})
            assert r.text.startswith("id,at,actor,")


def test_an_export_is_not_limited_to_a_page(server):
    with server.api() as api:
        for i in range(30):
            assert api.post("/groups", json={"name": f"g{i}"}).status_code in (200, 201)
        r = api.get("/audit", params={"action": "group.create", "format": "jsonl", "limit": 5})
    assert len(r.text.splitlines()) == 30


def test_the_cli_filters_and_exports(server, tmp_path):
    _fill(server)
    rows = json.loads(tf(server, "audit", "--action", "token.create", "--json").stdout)
    assert [e["action"] for e in rows] == ["token.create", "token.create"]
    out = tf(server, "audit", "--object", "group:*", "--since", "1h").stdout
    assert "group:web" in out and "group:db" in out and "refused" in out
    assert tf(server, "audit", "--since", "2099-01-01T00:00").stdout.count("group:") == 0
    text = tf(server, "audit", "--outcome", "refused", "--csv").stdout
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [r["object"] for r in rows] == ["group:nope"]
    lines = tf(server, "audit", "--action", "token.*", "--jsonl").stdout.splitlines()
    names = {json.loads(x)["detail"]["name"] for x in lines}
    assert names == {'=HYPERLINK("http://x"),1', "multi\nline, ü"}
    bad = tf(server, "audit", "--since", "yesterday-ish", check=False)
    assert bad.returncode == 2 and "--since" in bad.stderr
    viewer = new_token(server, "viewer")
    refused = tf(server, "audit", token=viewer["token"], check=False)
    assert refused.returncode == 2 and "admin role" in refused.stderr


def test_the_database_refuses_to_change_or_delete_audit_rows(database_url):
    db.upgrade_sync(database_url)

    async def run() -> None:
        engine = db.create_engine(database_url)
        try:
            async with engine.begin() as conn:
                tid = (
                    await conn.execute(
                        tenants.insert().values(name="t", created_at=1.0).returning(tenants.c.id)
                    )
                ).scalar_one()
                await conn.execute(
                    audit_log.insert().values(
                        tenant_id=tid, at=1.0, actor="a", action="x", detail={}
                    )
                )
            for statement in (
                audit_log.update().values(actor="someone else"),
                audit_log.delete(),
            ):
                with pytest.raises(sa.exc.DBAPIError, match="append-only"):
                    async with engine.begin() as conn:
                        await conn.execute(statement)
            async with engine.connect() as conn:
                rows = (await conn.execute(sa.select(audit_log))).all()
            assert [(r.actor, r.outcome, r.address, r.object) for r in rows] == [
                ("a", "ok", None, None)
            ]
        finally:
            await engine.dispose()

    asyncio.run(run())
