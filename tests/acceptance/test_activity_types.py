"""Typed activities through the real server and agents (issue 13): the agent's own
configuration has the last word, the server refuses up front what a target would refuse,
naming the computers, and Resynchronize re-reports the whole inventory.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx

from tests.acceptance.test_cli import tf
from tests.conftest import (
    Agent,
    Server,
    activities_of,
    enroll_token,
    post_action,
    request_done,
    wait_until,
)


def test_bad_parameters_are_refused_before_anything_is_stored(server: Server) -> None:
    for type_, params, says in [
        ("signal-process", {"pid": 1}, "pid must be an integer in [2"),
        ("signal-process", {"pid": 5, "process": "x"}, "exactly one of pid or process"),
        ("signal-process", {"process": "-9"}, "is not a valid process name"),
        ("signal-process", {"pid": True}, "pid must be an integer"),
        ("signal-process", {"pid": 2**63}, "pid must be an integer"),
        ("signal-process", {"pid": 5, "signal": "BOOM"}, "signal must be one of"),
        ("restart", {"delay": -1}, "delay must be a number in [0"),
        ("restart", {"delay": "soon"}, "delay must be a number in [0"),
        ("resync", {"full": True}, "unknown parameter(s): full"),
        ("no-such-type", {}, "unknown activity type 'no-such-type'"),
    ]:
        r = post_action(server, type_, "all", params)
        assert r.status_code == 400, (type_, params, r.text)
        assert says in r.json()["error"], (type_, params, r.text)
    with server.api() as api:  # a number JSON cannot hold is refused at the door
        r = api.post(
            "/requests",
            content=b'{"type": "restart", "target": "all", "params": {"delay": 1e999}}',
            headers={"content-type": "application/json"},
        )
        assert r.status_code in (400, 422), r.text
        assert api.get("/requests").json() == []


def test_resync_sends_the_whole_inventory_again_before_its_result(
    server: Server, start_agent: Callable[..., Agent]
) -> None:
    agent = start_agent(
        server, enroll_token(server), "--inventory-min-interval", "0", inventory=True
    )

    def wholes() -> int:
        return len(re.findall(r"inventory queued as message \d+ \(whole", agent.proc.text()))

    # Generous deadlines: a collection runs apt's simulation, slow on a loaded machine.
    before = wait_until(wholes, 120, "the whole inventory sent at start")
    r = post_action(server, "resync", f"computer:{agent.computer_id}")
    assert r.status_code == 201, r.text
    req = request_done(server, r.json()["id"], timeout=120)
    (act,) = activities_of(server, req["id"])
    assert act["state"] == "succeeded", act
    assert "Resynchronize" in act["result_line"] and "whole inventory" in act["result_line"]
    assert wholes() == before + 1


def test_resync_is_unsupported_where_inventory_reporting_is_off(
    server: Server, start_agent: Callable[..., Agent]
) -> None:
    agent = start_agent(server, enroll_token(server), name="quiet")  # --no-inventory
    r = post_action(server, "resync", f"computer:{agent.computer_id}")
    assert r.status_code == 409, r.text
    assert "resync is not supported on it: inventory reporting is off" in r.json()["error"]


def test_the_api_lists_every_type_with_its_parameter_schema(server: Server) -> None:
    from taskfleet.domain.actions import ACTION_TYPES

    with server.api() as api:
        listed = {t["type"]: t for t in api.get("/activity-types").json()}
    assert set(listed) == set(ACTION_TYPES)
    assert listed["resync"]["changes_system"] is False
    assert listed["signal-process"]["params"]["properties"]["signal"]["enum"][0] == "HUP"
    doc = httpx.get(f"{server.url}/openapi.json", timeout=10)
    schemas = doc.json()["components"]["schemas"]
    for name in ACTION_TYPES:
        assert f"ActivityParams.{name}" in schemas


def test_computer_show_says_what_the_agent_runs_and_what_it_cannot(
    server: Server, start_agent: Callable[..., Agent]
) -> None:
    agent = start_agent(server, enroll_token(server), name="quiet", allow_scripts=False)
    shown = tf(server, "computer", "show", str(agent.computer_id)).stdout
    assert re.search(r"scripts\s+no", shown), shown
    assert re.search(r"runs\s+nothing", shown), shown
    assert "cannot run" in shown and "resync (inventory reporting is off" in shown, shown


def test_a_typed_activity_goes_through_the_lifecycle_approval_and_schedule(
    server: Server, start_agent: Callable[..., Agent]
) -> None:
    agent = start_agent(
        server, enroll_token(server), "--inventory-min-interval", "0", inventory=True
    )
    target = f"computer:{agent.computer_id}"
    r = post_action(server, "resync", target, approval={"separation": False})
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    (act,) = activities_of(server, rid)
    assert act["state"] == "blocked", act
    out = tf(server, "request", "approve", str(rid)).stdout
    assert f"request {rid} approved" in out
    req = request_done(server, rid, timeout=120)
    assert activities_of(server, req["id"])[0]["state"] == "succeeded"
    with server.api() as api:
        ok = api.post(
            "/schedules",
            json={
                "cron": "0 3 * * *",
                "request": {"type": "resync", "target": target, "params": {}},
            },
        )
        assert ok.status_code == 201, ok.text
        bad = api.post(
            "/schedules",
            json={
                "cron": "0 3 * * *",
                "request": {"type": "resync", "target": target, "params": {"x": 1}},
            },
        )
        assert bad.status_code == 400 and "unknown parameter(s): x" in bad.json()["error"]


def test_a_type_an_agent_has_not_enabled_is_refused_up_front_naming_it(
    server: Server, start_agent: Callable[..., Agent]
) -> None:
    token = enroll_token(server)
    plain = start_agent(server, token, name="plain")
    enabled = start_agent(server, token, "--allow-type", "system", name="enabled")
    r = post_action(server, "signal-process", "all", {"process": "nosuchproc"})
    assert r.status_code == 409, r.text
    detail = r.json()["error"]
    assert "1 of 2 target computers would refuse this signal-process" in detail
    assert f"{plain.computer_id} (plain): activity type 'signal-process' is not enabled" in detail
    assert "(enabled)" not in detail
    with server.api() as api:
        assert api.get("/requests").json() == [] or all(
            q["type"] != "signal-process" for q in api.get("/requests").json()
        )
    ok = post_action(server, "signal-process", f"computer:{enabled.computer_id}", {"pid": 4194304})
    assert ok.status_code == 201, ok.text
