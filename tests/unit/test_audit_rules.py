"""The audit log's pure rules (domain/audit.py) and the object of every audited action."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest

from taskfleet.domain.audit import (
    COLUMNS,
    UnknownLimiter,
    csv_cell,
    csv_header,
    csv_line,
    filter_text,
    jsonl_line,
    parse_when,
)
from taskfleet.server.audit import Recorder, Refusal
from taskfleet.server.kernel import Principal, audit_object
from taskfleet.settings import AUDIT_UNKNOWN_LIMIT, TIME_MAX, TIME_MIN

SRC = Path(__file__).resolve().parents[2] / "src" / "taskfleet"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("=1+1", "'=1+1"),
        ("+cmd", "'+cmd"),
        ("-2", "'-2"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("plain", "plain"),
        ("a=b", "a=b"),
        (None, ""),
        (12, "12"),
        (1.0, "1"),
    ],
)
def test_csv_cells_that_would_run_as_formulas_are_quoted(text, expected):
    assert csv_cell(text) == expected


def test_a_csv_line_round_trips_commas_quotes_newlines_and_odd_text():
    row = {
        "id": 7,
        "at": 1_790_000_000.5,
        "actor": "token:1",
        "address": "::1",
        "action": "token.create",
        "object": '=HYPERLINK("http://evil")',
        "outcome": "ok",
        "detail": {"name": 'a,b\n"c"\r\nü \udcff', "n": 1},
    }
    text = csv_header() + csv_line(row)
    text.encode()  # valid UTF-8: the lone surrogate became U+FFFD
    header, cells = list(csv.reader(io.StringIO(text, newline="")))
    assert header == list(COLUMNS)
    out = dict(zip(header, cells, strict=True))
    assert out["at"] == "2026-09-21T14:13:20.500Z"
    assert out["object"] == '\'=HYPERLINK("http://evil")'
    assert json.loads(out["detail"]) == {"name": 'a,b\n"c"\r\nü \ufffd', "n": 1}


def test_a_jsonl_line_is_one_line_of_valid_utf8_json():
    row = {"id": 1, "at": 1.0, "detail": {"x": "a\nb \udcff"}, "actor": "token:1"}
    line = jsonl_line(row)
    assert line.endswith("\n") and line.count("\n") == 1
    line.encode()
    back = json.loads(line)
    assert list(back) == list(COLUMNS) and back["detail"] == {"x": "a\nb \ufffd"}


def test_times_are_epoch_seconds_or_iso_8601_utc_and_nothing_else():
    assert parse_when("1790000000", TIME_MIN, TIME_MAX) == 1_790_000_000.0
    assert parse_when("2026-09-21T14:13:20", TIME_MIN, TIME_MAX) == 1_790_000_000.0
    assert parse_when("2026-09-21T16:13:20+02:00", TIME_MIN, TIME_MAX) == 1_790_000_000.0
    assert parse_when("2026-09-21T14:13:20Z", TIME_MIN, TIME_MAX) == 1_790_000_000.0
    for bad in ("yesterday-ish", "", "nan", "inf", "1e20", "-5", "9999-01-01"):
        with pytest.raises(ValueError, match=r"not a time|out of range"):
            parse_when(bad, TIME_MIN, TIME_MAX)


def test_filter_text_refuses_control_characters_and_length():
    assert filter_text("actor", "token:1", 20) == "token:1"
    with pytest.raises(ValueError, match="actor: must not contain control characters"):
        filter_text("actor", "a\x00b", 20)
    with pytest.raises(ValueError, match="at most 20"):
        filter_text("actor", "x" * 21, 20)


def test_the_limiter_lets_a_bounded_number_through_per_window_and_counts_the_rest():
    now = [0.0]
    lim = UnknownLimiter(lambda: now[0], 3, 60.0)
    assert [lim.take() for _ in range(5)] == [0, 0, 0, None, None]
    now[0] = 59.9
    assert lim.take() is None
    now[0] = 60.0
    assert lim.take() == 3  # the first one through says how many were not written
    assert lim.take() == 0


def test_refusals_by_unknown_callers_are_bounded_and_by_known_ones_are_not():
    now = [0.0]
    rec = Recorder(lambda: now[0])
    r = Refusal("create_group", 401, "bad token", "POST", "/api/v1/groups", "10.0.0.9", None)
    entries = [rec.entry(None, r, 1.0) for _ in range(AUDIT_UNKNOWN_LIMIT + 5)]
    written = [e for e in entries if e is not None]
    assert len(written) == AUDIT_UNKNOWN_LIMIT
    assert {(e.actor, e.outcome, e.address) for e in written} == {
        ("unknown", "refused", "10.0.0.9")
    }
    p = Principal(3, 1, "viewer", "v", address="10.0.0.8")
    known = [rec.entry(p, r, 1.0) for _ in range(AUDIT_UNKNOWN_LIMIT + 5)]
    assert all(e is not None and e.actor == "token:3" for e in known)
    failed = rec.entry(p, Refusal("x", 500, "boom", "POST", "/api/v1/x", None, None), 1.0)
    assert failed is not None and failed.outcome == "failed"


def test_every_audited_action_in_the_source_names_its_object():
    """Each ``audit(...)`` call (and each direct entry) gets an object: derived from its
    detail by ``audit_object`` or given. This walks the source so a new call is seen."""
    calls = 0
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r'await audit\(\s*conn,\s*\w+,\s*"([a-z.\-]+)"[^)]*', text):
            action, args = m.group(1), m.group(0)
            keys = set(re.findall(r"(\w+)=", args))
            detail = {k: 1 for k in keys}
            calls += 1
            assert audit_object(action, detail) is not None, (path, action, keys)
    assert calls >= 20


@pytest.mark.parametrize(
    ("action", "detail", "obj"),
    [
        ("request.cancel", {"id": 12, "canceled": 3}, "request:12"),
        ("bulk.cancel", {"id": 12}, "request:12"),
        ("rollout.resume", {"id": 4}, "request:4"),
        ("activity.cancel", {"id": 9}, "activity:9"),
        ("group.create", {"name": "web"}, "group:web"),
        ("tag.set", {"computer": 3, "key": "k"}, "computer:3"),
        ("computer.remove", {"computer_id": 3}, "computer:3"),
        ("content.add", {"sha256": "ab", "size": 1}, "content:ab"),
        ("relay.assign", {"relay_id": 2, "group": "g"}, "relay:2"),
        ("agent.refused", {"computer": 5}, "computer:5"),
        ("token.create", {"id": 5, "kind": "admin"}, "token:5"),
        ("dashboard.login", {}, None),
    ],
)
def test_the_object_of_an_entry(action, detail, obj):
    assert audit_object(action, detail) == obj
