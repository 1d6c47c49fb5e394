"""Relay endpoints (``/relay/v1/*``): a relay enrolls, enrolls its agents, and makes
relay exchanges (``server/relays.py``; the wire contract is ``protocol/relay.py``).

Contract: a relay authenticates with ``X-Taskfleet-Relay: ID`` and
``Authorization: Bearer SECRET`` (401 when unknown, wrong or revoked). The
exchange is a hot path like the agent's: ``server/app.py`` answers it before
FastAPI's stack, a body over ``MAX_RELAY_BODY_BYTES`` is refused (413) before
it is parsed, a malformed one is refused whole (400) with nothing applied, and
a quiet exchange (nothing to say, nothing to get, roster current) is answered
from memory, or held as a long poll (``wait``) until there is work.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from fastapi import Request, Response
from pydantic import BaseModel

from taskfleet.aio import wait_set
from taskfleet.protocol.exchange import ProtocolError, loads_body
from taskfleet.protocol.relay import (
    MAX_RELAY_BODY_BYTES,
    RELAY_ENROLL_COMPUTER_PATH,
    RELAY_ENROLL_PATH,
    RELAY_EXCHANGE_PATH,
    RelayRequest,
    parse_relay_request,
    relay_reply_body,
)
from taskfleet.protocol.tickle import derive_relay_tickle_key
from taskfleet.server import enrollment, identity, metrics, relays
from taskfleet.server.api.agent import EnrollIn, enrolled, enrollment_reply, read_body
from taskfleet.server.api.deps import Rt, client_address, guarded, header_id, router_for
from taskfleet.server.fleet import RelayState
from taskfleet.server.kernel import ApiError
from taskfleet.server.runtime import Runtime, fleet_changed
from taskfleet.settings import RELAY_MOVED_WAKE_DELAY
from taskfleet.store.unavailable import unavailable

log = logging.getLogger("taskfleet.server")
router = router_for()


class RelayEnrollIn(BaseModel):
    token: str
    name: str
    url: str | None = None  # what its agents are told to use (advertised); none: unknown
    tickle_port: int | None = None
    version: str = ""


def relay_id_of(request: Request) -> int | None:
    return header_id(request, "x-taskfleet-relay")


def authenticate(rt: Runtime, request: Request) -> RelayState | None:
    """The relay a request comes from, or None (unknown, wrong secret, revoked)."""
    relay_id = relay_id_of(request)
    if relay_id is None:
        return None
    auth = request.headers.get("authorization", "")
    rs = rt.fleet.relays.get(relay_id)
    if rs is None or rs.revoked or not auth.startswith("Bearer "):
        return None
    return rs if rs.check_secret(auth[7:]) else None


@router.post(RELAY_ENROLL_PATH, tags=["relay"], status_code=201)
async def enroll(rt: Rt, body: RelayEnrollIn, request: Request) -> dict[str, Any]:
    """Enroll a relay with a relay enrollment token; its secret is shown once."""
    address = client_address(request.scope)

    def after(res: relays.RelayEnrolled) -> None:
        rt.fleet.put_relay(res.state)
        fleet_changed(rt, relay_ids=[res.state.id])
        metrics.RELAYS.set(sum(1 for r in rt.fleet.relays.values() if not r.revoked))

    res = await guarded(
        request.app.state.guards,
        "enroll",
        address or "unknown",
        rt.writer.run(
            lambda c: relays.enroll_relay(
                c,
                rt.now(),
                token=body.token,
                name=body.name,
                url=body.url or "",
                tickle_port=body.tickle_port,
                version=body.version,
                address=address,
            ),
            after=after,
        ),
    )
    rs = res.state
    log.info("relay %d %s (%s)", rs.id, "re-enrolled" if res.reenrolled else "enrolled", rs.name)
    return {
        "relay_id": rs.id,
        "secret": res.secret,
        "generation": rs.generation,
        "tickle_key": derive_relay_tickle_key(rt.tickle_master, rs.id, rs.generation).hex(),
        "server_public_key": rt.signer.public_key_hex,
        "relay_settings": orjson.loads(rt.relay_settings_json),
        "settings": orjson.loads(rt.settings_json),
        "reenrolled": res.reenrolled,
    }


@router.post(RELAY_ENROLL_COMPUTER_PATH, tags=["relay"], status_code=201)
async def enroll_computer(rt: Rt, body: EnrollIn, request: Request) -> dict[str, Any]:
    """Enroll a computer through its relay: the agent's enrollment body, forwarded."""
    rs = authenticate(rt, request)
    if rs is None:
        raise ApiError(401, "unknown relay, wrong secret or revoked")

    def after(res: enrollment.Enrolled) -> None:
        enrolled(rt, res, via_relay=True)

    res = await rt.writer.run(
        lambda c: relays.enroll_computer(
            c,
            rt.now(),
            rs,
            token=body.token,
            hostname=body.hostname,
            machine_id=body.machine_id,
            tickle_port=body.tickle_port,
            version=body.version,
            policy=body.policy,
        ),
        after=after,
    )
    return enrollment_reply(rt, res, body.hostname)


async def _exchange_route(request: Request) -> Response:
    return await exchange(request.app.state.rt, request)


# Also routed normally (for tools that walk the router); the app answers it first.
router.add_route(RELAY_EXCHANGE_PATH, _exchange_route, methods=["POST"], include_in_schema=False)


# -- the relay exchange hot path ---------------------------------------------------


async def exchange(rt: Runtime, request: Request) -> Response:
    """One relay exchange: from memory when quiet, else through ``relays.exchange``."""
    rs = authenticate(rt, request)
    if rs is None and rt.loader is not None:
        # Enrolled (again) through another server process: load it, then try again.
        rid = relay_id_of(request)
        if rid is not None and await rt.loader.miss("relay", rid):
            rs = authenticate(rt, request)
    if rs is None:
        return _refuse("auth", 401, "unknown relay, wrong secret or revoked")
    body = await read_body(request, MAX_RELAY_BODY_BYTES)
    if body is None:
        return _refuse("too-large", 413, f"relay exchange body over {MAX_RELAY_BODY_BYTES} bytes")
    try:
        req = parse_relay_request(loads_body(bytes(body)))
    except (orjson.JSONDecodeError, ProtocolError) as exc:
        kind = "malformed" if isinstance(exc, orjson.JSONDecodeError) else "invalid"
        return _refuse(kind, 400, f"bad relay exchange: {exc}")
    now = rt.config.clock()
    rs.last_seen = rs.served_at = now
    rt.fleet.reach_relay(rs, request.client.host if request.client else rs.address)
    rs.dirty = True
    if req.stats:
        rs.stats = {**req.stats, "reported_at": now}
    if rt.loader is not None:
        # Computers enrolled through it via another server process, or assigned to it
        # there: loaded before its entries are refused as "not behind this relay".
        unknown = [e.id for e in req.entries if _not_behind(rt, rs, e.id)]
        if unknown:
            await rt.loader.misses("computer", unknown)
    if relays.quiet(rs, req) and req.wait > 0:
        rs.waiter = asyncio.Event()
        try:
            await wait_set(rs.waiter, req.wait)
        finally:
            rs.waiter = None
        if rt.fleet.relays.get(rs.id) is not rs or rs.revoked:  # revoked or re-enrolled
            return _refuse("auth", 401, "unknown relay, wrong secret or revoked")
    if relays.quiet(rs, req):
        metrics.FAST_RELAY_EXCHANGES.inc()
        return _reply(rt, rs, req, relays.Outcome([], [], False))
    metrics.SLOW_RELAY_EXCHANGES.inc()
    try:
        await _conflicts(rt, rs, req, now)
        out = await relays.exchange(rt.exchange, rt.fleet, rs, req)
    except Exception as exc:
        problem = unavailable(exc)
        if problem is None:
            raise
        # The database is full or down: nothing of it was applied, the relay keeps
        # its spool and retries (store/unavailable.py).
        log.warning("exchange of relay %d refused: %s (%s)", rs.id, problem, exc)
        return _refuse("unavailable", 503, problem)
    return _reply(rt, rs, req, out)


async def _conflicts(rt: Runtime, rs: RelayState, req: RelayRequest, now: float) -> None:
    """Identity conflicts the relay caught (``conflict`` on an entry): each computer
    behind THIS relay is flagged (server/identity.py ``report``); an entry for any
    other computer is refused 403 by ``relays.exchange`` and flags nothing."""
    flagged = []
    for e in req.entries:
        if e.conflict is None or _not_behind(rt, rs, e.id):
            continue
        cs = rt.fleet.get(e.id)
        if cs is None or identity.blocked(cs):
            continue
        if await identity.report(rt.writer, cs, rs.id, e.conflict, now):
            flagged.append(cs.id)
    if flagged:
        fleet_changed(rt, computer_ids=flagged)  # no other process hands them work


def _not_behind(rt: Runtime, rs: RelayState, computer_id: int) -> bool:
    cs = rt.fleet.get(computer_id)
    return cs is None or cs.relay is not rs


def _reply(rt: Runtime, rs: RelayState, req: RelayRequest, out: relays.Outcome) -> Response:
    stale = req.roster != rs.roster_version
    if stale and rs.moved_out:
        # Computers assigned to another relay: woken directly once this relay has its
        # new roster (it applies it as it reads this reply), so their agents ask it,
        # are answered 503, fail over to the server and are told their new relay.
        moved = rt.fleet.take_moved_out(rs)
        asyncio.get_running_loop().call_later(RELAY_MOVED_WAKE_DELAY, rt.tickler.wake, moved)
    return Response(
        relay_reply_body(
            out.computers,
            out.errors,
            relays.roster(rs, rt.tickle_master) if stale else None,
            server_time=rt.config.clock(),
            settings_json=rt.settings_json,
            relay_settings_json=rt.relay_settings_json,
            more=out.more,
        ),
        media_type="application/json",
    )


def _refuse(reason: str, status: int, message: str) -> Response:
    metrics.RELAY_EXCHANGE_ERRORS.labels(reason).inc()
    return Response(
        orjson.dumps({"error": message}), status_code=status, media_type="application/json"
    )
