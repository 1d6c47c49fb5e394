"""Inventory messages resent, replayed, out of step or bad (issue 13). Real server process,
agents simulated over HTTP; SQLite, or PostgreSQL with TASKFLEET_TEST_DB=postgresql.

A resent message is dropped by its sequence number; a delta already applied (the same
content under a new number) changes nothing; a delta made against another snapshot is
not applied and the reply asks for the whole inventory; a bad message (bad types,
oversized, names that are not package names) is acknowledged and applies nothing, and
the other messages of the exchange, and other computers' exchanges, go on.
"""

from __future__ import annotations

import concurrent.futures
import json
from typing import Any

import httpx

from taskfleet.domain import inventory as inv
from tests.acceptance.test_computer_removal import enrolled
from tests.conftest import Server, enroll_token


def whole(snap: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "inventory",
        "full": True,
        "base": "",
        "digest": inv.digest(snap),
        "sections": snap,
    }


def change(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "inventory",
        "full": False,
        "base": inv.digest(old),
        "digest": inv.digest(new),
        "sections": inv.delta(old, new),
    }


def send(server: Server, cid: int, secret: str, *numbered: tuple[int, dict[str, Any]]) -> dict:
    body = {"ack": 0, "messages": [{**m, "seq": seq} for seq, m in numbered]}
    # As the agent's stdlib encoder writes it: a lone surrogate as a \\ud800 escape.
    r = httpx.post(
        server.url + "/agent/v1/exchange",
        content=json.dumps(body).encode(),
        headers={"X-Taskfleet-Computer": str(cid), "Authorization": f"Bearer {secret}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def packages(server: Server, cid: int) -> dict[str, str | None]:
    with server.api() as api:
        rows = api.get(f"/computers/{cid}/packages").json()
    return {f"{r['name']}:{r['arch']}": r["version"] for r in rows}


def inventory(server: Server, cid: int) -> dict[str, Any]:
    with server.api() as api:
        return dict(api.get(f"/computers/{cid}").json()["inventory"])


S0 = {
    "os": {"id": "debian", "version_id": "12", "pretty_name": "Debian 12"},
    "packages": {"a:amd64": {"version": "1.0"}, "b:all": {"version": "2.0"}},
    "upgrades": {"a:amd64": {"version": "1.1", "security": True}},
    "users": {"root": {"uid": 0}},
}
S1 = {
    **S0,
    "packages": {"a:amd64": {"version": "1.1"}, "c:amd64": {"version": "3"}},
    "upgrades": {},
}
S2 = {**S1, "users": {"root": {"uid": 0}, "alice": {"uid": 1000}}}


def test_resent_and_replayed_deltas_change_nothing(server: Server) -> None:
    cid, secret = enrolled(server, enroll_token(server), "resend")
    out = send(server, cid, secret, (1, whole(S0)), (2, change(S0, S1)))
    assert out["ack"] == 2 and "inventory" not in out
    assert packages(server, cid) == {"a:amd64": "1.1", "c:amd64": "3"}
    # The reply was lost: the agent sends both again (the server drops them by seq) ...
    out = send(server, cid, secret, (1, whole(S0)), (2, change(S0, S1)))
    assert out["ack"] == 2 and packages(server, cid) == {"a:amd64": "1.1", "c:amd64": "3"}
    # ... and the same delta under a new number (a replay) is already applied: nothing.
    out = send(server, cid, secret, (3, change(S0, S1)))
    assert out["ack"] == 3 and "inventory" not in out
    assert packages(server, cid) == {"a:amd64": "1.1", "c:amd64": "3"}
    assert inventory(server, cid)["upgrades"] == [] and inventory(server, cid)["problem"] is None
    # Two deltas in one exchange are folded in order.
    s3 = {**S2, "packages": {"c:amd64": {"version": "4"}}}
    send(server, cid, secret, (4, change(S1, S2)), (5, change(S2, s3)))
    assert packages(server, cid) == {"c:amd64": "4"}
    assert set(inventory(server, cid)["users"]) == {"root", "alice"}


def test_a_delta_against_another_snapshot_asks_for_the_whole_inventory(server: Server) -> None:
    cid, secret = enrolled(server, enroll_token(server), "out-of-step")
    out = send(server, cid, secret, (1, change(S0, S1)))  # the server holds nothing
    assert out["ack"] == 1 and out["inventory"] == "full"
    with server.api() as api:
        assert api.get(f"/computers/{cid}").json()["inventory"] is None
    out = send(server, cid, secret, (2, whole(S1)))
    assert "inventory" not in out and packages(server, cid) == {"a:amd64": "1.1", "c:amd64": "3"}
    out = send(server, cid, secret, (3, change(S0, S2)))  # base S0: the server holds S1
    assert out["inventory"] == "full"
    assert "did not apply" in inventory(server, cid)["problem"]
    assert "alice" not in inventory(server, cid)["users"]
    # The ask stays on the quiet path too, until a whole one arrives.
    assert send(server, cid, secret)["inventory"] == "full"
    assert "inventory" not in send(server, cid, secret, (4, whole(S2)))
    assert inventory(server, cid)["problem"] is None and "alice" in inventory(server, cid)["users"]


BAD = [
    {"sections": {"packages": {"a b:amd64": {"version": "1"}}}},
    {"sections": {"packages": {"a:amd64": {"version": "1; rm -rf /"}}}},
    {"sections": {"packages": {"a:amd64": {"version": "--force"}}}},
    {"sections": {"users": {"root": 5}}},
    {"sections": {"os": "x" * 5000}},
    {"sections": {"users": {f"u{i}": {"home": "h" * 1000} for i in range(1100)}}},  # > 1 MiB
    {"full": "yes"},
    {"digest": None},
]


def test_bad_messages_apply_nothing_and_the_rest_goes_on(server: Server) -> None:
    token = enroll_token(server)
    cid, secret = enrolled(server, token, "bad")
    send(server, cid, secret, (1, whole(S0)))
    for i, bad in enumerate(BAD):
        seq = 2 + i
        out = send(server, cid, secret, (seq, {**whole(S1), **bad}))
        assert out["ack"] == seq and out["inventory"] == "full", (bad, out)
        assert packages(server, cid) == {"a:amd64": "1.0", "b:all": "2.0"}, bad
        assert inventory(server, cid)["problem"], bad
    # A bad one and a good one in one exchange: the good one (a whole inventory) applies.
    seq = 2 + len(BAD)
    out = send(server, cid, secret, (seq, {**whole(S1), **BAD[0]}), (seq + 1, whole(S1)))
    assert out["ack"] == seq + 1 and "inventory" not in out
    assert packages(server, cid) == {"a:amd64": "1.1", "c:amd64": "3"}


def test_text_is_cleaned_and_other_computers_are_not_held_up(server: Server) -> None:
    token = enroll_token(server)
    pairs = [enrolled(server, token, f"many-{i}") for i in range(6)]
    nasty = {**S0, "os": {"id": "debian", "version_id": "12", "pretty_name": "De\x00bian \ud800"}}
    bad = {**whole(S0), "sections": {"packages": {"x;y:amd64": {"version": "1"}}}}

    def one(i: int) -> dict:
        cid, secret = pairs[i]
        msg = bad if i == 0 else whole(nasty) if i == 1 else whole(S0)
        return send(server, cid, secret, (1, msg))

    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # in one writer batch, likely
        outs = list(pool.map(one, range(6)))
    assert outs[0]["inventory"] == "full"
    assert all("inventory" not in o for o in outs[1:])
    assert inventory(server, pairs[1][0])["os"]["pretty_name"] == "De\u2400bian \ufffd"
    for cid, _ in pairs[2:]:
        assert packages(server, cid) == {"a:amd64": "1.0", "b:all": "2.0"}


def test_package_listing_takes_any_query_text(server: Server) -> None:
    cid, secret = enrolled(server, enroll_token(server), "listing")
    send(server, cid, secret, (1, whole(S0)))
    with server.api() as api:
        for params in ({"name": "a\x00"}, {"after": "\x00"}, {"limit": -5}, {"limit": 10**12}):
            r = api.get(f"/computers/{cid}/packages", params=params)
            assert r.status_code == 200, (params, r.text)
        assert api.get("/computers/999999/packages").status_code == 404
        page = api.get(f"/computers/{cid}/packages", params={"limit": 1}).json()
        rest = api.get(f"/computers/{cid}/packages", params={"after": page[0]["name"]}).json()
        assert [r["name"] for r in page + rest] == ["a", "b"]
