"""The relay's durable state (relay/spool.py): spool, cache, roster, acks, reopen."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from taskfleet.protocol.exchange import EXCHANGE_PATH, operation_result
from taskfleet.protocol.relay import (
    ComputerReply,
    EntryError,
    RelayReply,
    Roster,
    RosterEntry,
)
from taskfleet.relay.http import AgentApp
from taskfleet.relay.spool import RelayIdentity, Sent, Spool, SpoolError
from taskfleet.relay.upstream import Upstream, UpstreamConfig

KEY = "ab" * 32


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _result(seq: int, op: int = 5) -> tuple[int, str]:
    msg = {**operation_result(op, "succeeded", f"run {seq}", exit_code=0), "seq": seq}
    return seq, json.dumps(msg)


def _op(seq: int) -> dict[str, Any]:
    return {"seq": seq, "type": "cancel", "op": 100 + seq}


def _reply(
    computers: list[ComputerReply] | None = None,
    errors: list[EntryError] | None = None,
    roster: Roster | None = None,
    settings: dict[str, Any] | None = None,
) -> RelayReply:
    return RelayReply(computers or [], errors or [], roster, 1.0, settings or {}, {})


def _spool(tmp_path: Path, *ids: int) -> Spool:
    spool = Spool(tmp_path / "relay")
    spool.save_identity(
        RelayIdentity("http://server", 1, "tfr_secret", 1, bytes(32), "00" * 32), {}
    )
    for cid in ids:
        spool.enrolled(cid, 1, _hash(f"secret-{cid}"), bytes.fromhex(KEY), 50124)
    return spool


def _receive(spool: Spool, cid: int, ack: int, *seqs: int) -> int:
    return spool.receive(
        cid,
        ack=ack,
        messages=[_result(s) for s in seqs],
        agent_info=None,
        address="10.0.0.5",
        now=1000.0,
    )


def _sent(spool: Spool, cid: int) -> dict[int, Sent]:
    c = spool.computers[cid]
    return {cid: Sent(c.generation, c.agent_ack, c.address, c.agent_info, c.spooled)}


def test_new_agent_messages_are_spooled_once_and_survive_a_reopen(tmp_path: Path) -> None:
    spool = _spool(tmp_path, 7)
    assert _receive(spool, 7, 0, 1, 2) == 2
    assert _receive(spool, 7, 0, 1, 2, 3) == 1  # 1 and 2 are resends
    assert spool.computers[7].ack_for_agent == 3
    spool.close()
    again = Spool(tmp_path / "relay")
    c = again.computers[7]
    assert (c.spooled, c.up_top, c.address) == (3, 3, "10.0.0.5")
    texts = again.up_messages(7, 500, 1 << 20)
    assert [json.loads(t)["seq"] for t in texts] == [1, 2, 3]
    assert again.stats().spooled == 3 and again.stats().oldest == 1000.0


def test_the_state_file_is_private(tmp_path: Path) -> None:
    spool = _spool(tmp_path, 7)
    _receive(spool, 7, 0, 1)
    for f in (tmp_path / "relay").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_the_server_ack_drops_spooled_messages_and_its_messages_are_cached(
    tmp_path: Path,
) -> None:
    spool = _spool(tmp_path, 7)
    _receive(spool, 7, 0, 1, 2, 3)
    applied = spool.apply(_reply([ComputerReply(7, 2, [_op(1), _op(2)])]), _sent(spool, 7))
    c = spool.computers[7]
    assert applied.forwarded == 2 and applied.new_down == {7}
    assert (c.server_ack, c.spooled, c.down_top, c.have) == (2, 1, 2, 2)
    assert [json.loads(t)["seq"] for t in spool.up_messages(7, 500, 1 << 20)] == [3]
    out, more = spool.down_messages(7, 0, 1 << 20)
    assert [json.loads(t)["seq"] for t in out] == [1, 2] and not more
    # A resend of what is cached adds nothing; the agent's ack drops the cache below it.
    again = spool.apply(_reply([ComputerReply(7, 2, [_op(1), _op(2)])]), {})
    assert again.new_down == set() and c.cached == 2
    _receive(spool, 7, 1)
    assert c.cached == 1 and c.agent_ack == 1 and c.has_news  # the new ack is news
    assert [json.loads(t)["seq"] for t in spool.down_messages(7, 1, 1 << 20)[0]] == [2]


def test_a_reply_marks_what_was_reported_and_nothing_more(tmp_path: Path) -> None:
    spool = _spool(tmp_path, 7)
    _receive(spool, 7, 0, 1)
    sent = _sent(spool, 7)
    spool.apply(_reply([ComputerReply(7, 1, [])]), sent)
    assert not spool.computers[7].has_news
    _receive(spool, 7, 0, 2)
    assert spool.computers[7].has_news


def test_server_messages_the_agent_already_has_are_not_cached(tmp_path: Path) -> None:
    spool = _spool(tmp_path, 7)
    _receive(spool, 7, 3)  # the agent got 1..3 directly from the server (failover)
    applied = spool.apply(_reply([ComputerReply(7, 0, [_op(2), _op(3), _op(4)])]), {})
    assert applied.new_down == {7}
    out, _ = spool.down_messages(7, 3, 1 << 20)
    assert [json.loads(t)["seq"] for t in out] == [4] and spool.computers[7].cached == 1


def test_a_refused_entry_drops_its_spool_and_a_failed_one_keeps_it(tmp_path: Path) -> None:
    spool = _spool(tmp_path, 7, 8)
    _receive(spool, 7, 0, 1, 2)
    _receive(spool, 8, 0, 1)
    sent = {**_sent(spool, 7), **_sent(spool, 8)}
    applied = spool.apply(
        _reply(errors=[EntryError(7, 403, "not yours"), EntryError(8, 500, "later")]), sent
    )
    assert applied.dropped == {7: 2} and applied.retry == {8}
    assert spool.computers[7].spooled == 0 and not spool.computers[7].has_news
    assert spool.computers[8].spooled == 1 and spool.computers[8].has_news


def test_a_new_generation_in_the_roster_starts_the_computer_over(tmp_path: Path) -> None:
    spool = _spool(tmp_path, 7, 8)
    _receive(spool, 7, 0, 1, 2)
    spool.apply(_reply([ComputerReply(7, 0, [_op(1)])]), {})
    roster = Roster(
        "v2",
        [RosterEntry(7, 2, _hash("new"), KEY, None), RosterEntry(9, 1, _hash("nine"), KEY, 1)],
    )
    applied = spool.apply(
        _reply([ComputerReply(7, 0, [_op(1)])], roster=roster, settings={"poll_interval": 5}),
        {},
    )
    c = spool.computers[7]
    assert applied.roster_changed and spool.roster_version == "v2"
    assert (c.generation, c.spooled, c.up_top, c.secret_hash) == (2, 0, 0, _hash("new"))
    assert c.cached == 1 and c.down_top == 1  # the new generation's first message
    assert not spool.computers[8].in_roster and spool.computers[9].in_roster
    assert json.loads(spool.settings_json) == {"poll_interval": 5}
    spool.close()
    again = Spool(tmp_path / "relay")
    assert again.roster_version == "v2" and not again.computers[8].in_roster
    assert again.settings == {"poll_interval": 5}


def test_limits_on_what_one_request_or_reply_carries(tmp_path: Path) -> None:
    spool = _spool(tmp_path, 7)
    _receive(spool, 7, 0, *range(1, 11))
    assert len(spool.up_messages(7, 4, 1 << 20)) == 4
    one = len(spool.up_messages(7, 1, 1 << 20)[0])
    assert len(spool.up_messages(7, 500, one * 3)) == 3
    assert len(spool.up_messages(7, 500, 1)) == 1  # one, however large
    spool.apply(_reply([ComputerReply(7, 0, [_op(s) for s in range(1, 6)])]), {})
    out, more = spool.down_messages(7, 0, 1)
    assert len(out) == 1 and more


def test_revoked_is_remembered(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    spool.set_revoked(True)
    spool.close()
    assert Spool(tmp_path / "relay").revoked


# -- group commit: the writes of one event-loop iteration share one fsync ----------


def _other_reader(spool: Spool) -> sqlite3.Connection:
    """A second connection sees only what was committed (what a crash would leave)."""
    return sqlite3.connect(spool.path)


def _on_disk(spool: Spool) -> int:
    reader = _other_reader(spool)
    try:
        return int(reader.execute("SELECT count(*) FROM up").fetchone()[0])
    finally:
        reader.close()


async def test_agent_writes_of_one_loop_iteration_share_one_commit(tmp_path: Path) -> None:
    spool = _spool(tmp_path, *range(1, 6))
    before = spool.commits
    for cid in range(1, 6):
        assert _receive(spool, cid, 0, 1, 2) == 2
    assert _on_disk(spool) == 0  # not yet committed: nobody may be answered yet
    await spool.durable()
    assert _on_disk(spool) == 10
    assert spool.commits == before + 1


async def test_any_other_write_commits_the_open_group_before_itself(tmp_path: Path) -> None:
    spool = _spool(tmp_path, 7)
    _receive(spool, 7, 0, 1)
    spool.set_revoked(True)  # a plain write: durable when it returns, and so is the group
    assert _on_disk(spool) == 1
    await spool.durable()  # nothing left to wait for
    spool.close()
    again = Spool(tmp_path / "relay")
    assert again.revoked and again.computers[7].spooled == 1


class _FailingCommit:
    """The connection, except that its next COMMIT fails (a disk error at fsync time)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.fail = True

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT" and self.fail:
            self.fail = False
            raise sqlite3.OperationalError("disk I/O error")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


async def test_a_failed_group_commit_fails_its_waiters_and_takes_their_resends(
    tmp_path: Path,
) -> None:
    spool = _spool(tmp_path, 7)
    real = spool.db
    spool.db = _FailingCommit(real)  # type: ignore[assignment]
    assert _receive(spool, 7, 0, 1, 2) == 2
    with pytest.raises(SpoolError, match="disk I/O error"):
        await spool.durable()
    spool.db = real
    assert _on_disk(spool) == 0
    # memory was taken back from the file: the agent's resend is new again
    assert spool.computers[7].ack_for_agent == 0
    assert _receive(spool, 7, 0, 1, 2) == 2
    await spool.durable()
    assert _on_disk(spool) == 2


async def test_the_relay_answers_an_agent_only_once_its_messages_are_on_disk(
    tmp_path: Path,
) -> None:
    spool = _spool(tmp_path, 7)
    upstream = Upstream(spool, UpstreamConfig("http://server", None, "r", None, 0))
    upstream.ident = spool.identity()
    app = AgentApp(spool, upstream)
    body = json.dumps({"ack": 0, "messages": [json.loads(_result(1)[1])]}).encode()
    on_disk_at_reply: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200
            on_disk_at_reply.append(_on_disk(spool))

    scope = {
        "type": "http",
        "path": EXCHANGE_PATH,
        "method": "POST",
        "headers": [
            (b"x-taskfleet-computer", b"7"),
            (b"authorization", b"Bearer secret-7"),
            (b"content-length", b"%d" % len(body)),
        ],
        "client": ("10.0.0.5", 40000),
    }
    await app(scope, receive, send)
    assert on_disk_at_reply == [1]


async def test_a_computer_absent_from_a_stale_roster_is_asked_to_retry_not_sent_away(
    tmp_path: Path,
) -> None:
    """A roster built before a computer enrolled through the relay omits it: the relay
    answers 503 (retry) and fetches the roster, and says 410 (moved: ask the server)
    only once a roster fetched after the request still omits it (the job benchmark
    saw agents sent to the server 48 ms after enrolling)."""
    spool = _spool(tmp_path, 7, 8)
    upstream = Upstream(spool, UpstreamConfig("http://server", None, "r", None, 0))
    upstream.ident = spool.identity()
    app = AgentApp(spool, upstream)
    stale = Roster("v1", [RosterEntry(8, 1, _hash("secret-8"), KEY, 50124)])
    spool.apply(_reply(roster=stale), {})
    assert not spool.computers[7].in_roster

    async def exchange() -> int:
        body = json.dumps({"ack": 0, "messages": []}).encode()
        statuses: list[int] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        scope = {
            "type": "http",
            "path": EXCHANGE_PATH,
            "method": "POST",
            "headers": [(b"x-taskfleet-computer", b"7"), (b"authorization", b"Bearer secret-7")],
            "client": ("10.0.0.5", 40000),
        }
        await app(scope, receive, send)
        return statuses[0]

    assert await exchange() == 503
    assert upstream.roster_wanted
    upstream.confirmed_at = time.monotonic()  # a later exchange brought a roster ...
    assert await exchange() == 410  # ... that still omits it: it left this relay
    spool.apply(_reply(roster=Roster("v2", [RosterEntry(7, 1, _hash("secret-7"), KEY, 1)])), {})
    assert await exchange() == 200


def test_the_agents_own_tickle_port_is_kept_across_a_reopen_and_wins_over_the_rosters(
    tmp_path: Path,
) -> None:
    from taskfleet.relay.tickles import _tickle_port

    spool = _spool(tmp_path, 7)
    assert _tickle_port(spool.computers[7]) == 50124  # only the roster's so far
    info = json.dumps({"version": "1", "tickle_port": 40001})
    spool.receive(
        7, ack=0, messages=[], agent_info=info, address="10.0.0.7", now=1.0, agent_port=40001
    )
    spool.close()
    again = Spool(tmp_path / "relay")
    assert _tickle_port(again.computers[7]) == 40001
    # The roster is applied again with the server's older record: the agent's word stays.
    again.enrolled(7, 1, _hash("secret-7"), bytes.fromhex(KEY), 50124)
    assert _tickle_port(again.computers[7]) == 40001
    # It starts again with no UDP port (long poll): it is not tickled at the old one.
    again.receive(
        7,
        ack=0,
        messages=[],
        agent_info=json.dumps({"version": "1"}),
        address="10.0.0.7",
        now=2.0,
        agent_port=None,
    )
    assert _tickle_port(again.computers[7]) is None
    # An exchange without its "agent" object changes nothing.
    again.receive(7, ack=0, messages=[_result(1)], agent_info=None, address="10.0.0.7", now=3.0)
    assert _tickle_port(again.computers[7]) is None


def test_a_state_file_of_an_earlier_version_gets_the_agent_port_column(tmp_path: Path) -> None:
    spool = _spool(tmp_path, 7)
    spool.close()
    db = sqlite3.connect(tmp_path / "relay" / "relay.db")
    old = [r[1] for r in db.execute("PRAGMA table_info(computers)") if r[1] != "agent_port"]
    db.executescript(
        f"CREATE TABLE old AS SELECT {', '.join(old)} FROM computers;"
        "DROP TABLE computers; ALTER TABLE old RENAME TO computers;"
    )
    db.close()
    again = Spool(tmp_path / "relay")
    assert again.computers[7].agent_port is None
    again.receive(
        7, ack=0, messages=[], agent_info="{}", address="10.0.0.7", now=1.0, agent_port=40002
    )
    again.close()
    assert Spool(tmp_path / "relay").computers[7].agent_port == 40002


def test_a_servers_ask_for_the_whole_inventory_made_before_it_had_the_agents_is_not_passed_on(
    tmp_path: Path,
) -> None:
    spool = _spool(tmp_path, 7)
    c = spool.computers[7]
    spool.apply(_reply([ComputerReply(7, 0, [], inventory_full=True)]), {})
    assert c.inventory_full  # asked: the relay says so to its agent
    c.whole_at = 3  # the agent answered with its whole inventory as message 3 (http.py)
    c.inventory_full = False
    # A reply made before the server had message 3 still asks: not passed on again.
    spool.apply(_reply([ComputerReply(7, 2, [], inventory_full=True)]), {})
    assert not c.inventory_full
    # The server has it and asks again (it did not apply): passed on.
    spool.apply(_reply([ComputerReply(7, 3, [], inventory_full=True)]), {})
    assert c.inventory_full


def test_the_agents_whole_inventory_answers_the_ask_at_the_relay(tmp_path: Path) -> None:
    from taskfleet.relay.http import _whole_inventory

    assert _whole_inventory({"type": "inventory", "full": True, "seq": 3})
    assert not _whole_inventory({"type": "inventory", "full": False, "seq": 3})
    assert not _whole_inventory({"type": "result", "full": True, "seq": 3})
    assert not _whole_inventory(["inventory"])
