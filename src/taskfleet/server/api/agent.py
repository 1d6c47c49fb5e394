"""Agent endpoints: enrollment and the exchange (the hot path; ``server/app.py``
answers it before FastAPI's stack, ``exchange`` here is what answers it).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from fastapi import Request, Response
from pydantic import BaseModel

from taskfleet.aio import wait_set
from taskfleet.protocol.exchange import (
    ENROLL_PATH,
    EXCHANGE_PATH,
    MAX_BODY_BYTES,
    AgentRequest,
    ProtocolError,
    loads_body,
    parse_agent_request,
)
from taskfleet.protocol.tickle import derive_tickle_key
from taskfleet.server import enrollment, identity, metrics
from taskfleet.server.api.deps import (
    Rt,
    client_address,
    guarded,
    header_id,
    router_for,
)
from taskfleet.server.exchange import ComputerGone, ExchangeJob
from taskfleet.server.fleet import ComputerState
from taskfleet.server.runtime import Runtime, fleet_changed
from taskfleet.settings import INT64_MAX
from taskfleet.store.unavailable import unavailable

log = logging.getLogger("taskfleet.server")
router = router_for()


class EnrollIn(BaseModel):
    token: str
    hostname: str
    machine_id: str
    tickle_port: int | None = None
    version: str = ""
    policy: dict[str, Any] = {}


async def _identity(
    rt: Runtime, cs: ComputerState, presented: str | None, now: float
) -> bytes | Response:
    """The identity check of a direct exchange (``server/identity.py``): the refusal to
    send, or the reply's ``"identity"`` field (a fresh nonce, stored before this
    reply; empty: none offered)."""
    try:
        checked = await identity.check(
            rt.writer,
            cs,
            presented,
            now,
            rotate=rt.config.identity_rotate,
            grace=rt.config.identity_grace,
        )
    except Exception:
        log.exception("identity check of computer %d failed", cs.id)
        return _refuse("server", 500, "the server could not check this identity; retry later")
    if checked.conflict is not None:
        if checked.flagged:  # no process hands it work any more, its relay's included
            fleet_changed(rt, computer_ids=[cs.id])
        metrics.EXCHANGE_ERRORS.labels(identity.REFUSAL_CODE).inc()
        return Response(
            orjson.dumps(
                {
                    "error": f"computer {cs.id} refused: {checked.conflict}; an administrator "
                    "must decide (taskfleet computer identity-reset, or remove it)",
                    "code": identity.REFUSAL_CODE,
                }
            ),
            status_code=409,
            media_type="application/json",
        )
    # The agent keeps it and presents it next.
    return b"" if checked.offer is None else b',"identity":"%s"' % checked.offer.encode()


@router.post(ENROLL_PATH, tags=["agent"], status_code=201)
async def enroll(rt: Rt, body: EnrollIn, request: Request) -> dict[str, Any]:
    address = client_address(request.scope)

    def after(res: enrollment.Enrolled) -> None:
        enrolled(rt, res, via_relay=False)

    res = await guarded(
        request.app.state.guards,
        "enroll",
        address or "unknown",
        rt.writer.run(
            lambda c: enrollment.enroll(
                c,
                rt.now(),
                token=body.token,
                hostname=body.hostname,
                machine_id=body.machine_id,
                tickle_port=body.tickle_port,
                version=body.version,
                policy=body.policy,
                address=address,
            ),
            after=after,
        ),
    )
    return enrollment_reply(rt, res, body.hostname)


def enrolled(rt: Runtime, res: enrollment.Enrolled, *, via_relay: bool) -> None:
    """After an enrollment commits (directly or through a relay): into the fleet."""
    rt.fleet.put(res.state, res.relay_id)
    if res.reenrolled or res.relay_id is not None:
        # The other server processes drop the old secret now, and put it in its relay's
        # roster (the relay may exchange with any of them). A new direct computer needs
        # no hint: a process loads it at its first exchange there (server/fleet_load.py).
        fleet_changed(rt, computer_ids=[res.state.id])
    res.state.via_relay = via_relay and res.state.relay is not None
    metrics.COMPUTERS.set(len(rt.fleet.computers))
    if rt.lifecycle_engine.has_windows:  # it may have joined a windowed group
        asyncio.get_running_loop().create_task(rt.lifecycle_engine.reload_windows())


def enrollment_reply(rt: Runtime, res: enrollment.Enrolled, hostname: str) -> dict[str, Any]:
    """What an enrolled agent is told (directly, or through its relay)."""
    log.info(
        "computer %d %s (%s)%s%s",
        res.state.id,
        "re-enrolled" if res.reenrolled else "enrolled",
        hostname,
        f" behind relay {res.relay_id}" if res.relay_id is not None else "",
        f", {res.canceled} open activities canceled" if res.canceled else "",
    )
    return {
        "computer_id": res.state.id,
        "secret": res.secret,
        "generation": res.state.generation,
        "tickle_key": derive_tickle_key(rt.tickle_master, res.state.id, res.state.generation).hex(),
        "server_public_key": rt.signer.public_key_hex,
        "settings": orjson.loads(rt.settings_json),
        "reenrolled": res.reenrolled,
        "identity": res.nonce,
    }


async def _exchange_route(request: Request) -> Response:
    return await exchange(request.app.state.rt, request)


# Also routed normally (for tools that walk the router); the app answers it first.
router.add_route(EXCHANGE_PATH, _exchange_route, methods=["POST"], include_in_schema=False)


# -- the exchange hot path ------------------------------------------------------


async def _apply(
    rt: Runtime, cs: ComputerState, req: AgentRequest, address: str | None
) -> dict[str, Any] | Response:
    """The exchange through the writer (``server/exchange.py``), or the refusal."""
    try:
        return await rt.exchange.exchange(ExchangeJob(cs, req, address))
    except ComputerGone:
        if rt.loader is not None:  # removed or enrolled again by another process
            await rt.loader.computers([cs.id])
        return _refuse("auth", 401, "unknown computer or wrong secret")
    except ProtocolError as exc:
        return _refuse("invalid", 400, f"bad exchange: {exc}")
    except Exception as exc:
        # The writer already failed this exchange alone (the others of its batch
        # went on); nothing of it was applied, the agent retries it.
        problem = unavailable(exc)
        if problem is not None:  # the database is full or down: not a bug, say so
            log.warning("exchange of computer %d refused: %s (%s)", cs.id, problem, exc)
            return _refuse("unavailable", 503, problem)
        log.exception("exchange of computer %d failed", cs.id)
        return _refuse("server", 500, "the server could not apply this exchange; retry later")


async def exchange(rt: Runtime, request: Request) -> Response:
    """The exchange hot path: answered from memory when there is nothing to do."""
    cs = await _authenticate_or_load(rt, request)
    if isinstance(cs, str):
        return _refuse("auth", 401, cs)
    computer_id = cs.id
    body = await read_body(request, MAX_BODY_BYTES)
    if body is None:
        return _refuse("too-large", 413, f"exchange body over {MAX_BODY_BYTES} bytes")
    # Several processes (PostgreSQL): memory's out_seq may be behind what another
    # process sent; the exchange checks the ack against the stored one.
    req = _parse_request(body, cs.out_seq if rt.loader is None else INT64_MAX)
    if isinstance(req, Response):
        return req
    address = request.client.host if request.client else None
    now = rt.config.clock()
    offer = await _identity(rt, cs, req.identity, now)
    if isinstance(offer, Response):
        return offer
    cs.last_seen = cs.served_at = now
    cs.dirty = True
    # It speaks to the server directly: wake it directly, where it is (an info
    # exchange stores its address and port in the database, with the rest).
    rt.fleet.reach(cs, address if req.agent is None else cs.address, cs.tickle_port, False)

    def quiet() -> bool:
        return (
            not cs.has_work
            and req.ack >= cs.out_seq
            and req.agent is None
            and req.max_seq <= cs.in_acked
        )

    if quiet() and req.wait > 0 and not offer:  # an offer is answered at once
        cs.waiter = asyncio.Event()
        metrics.LONG_POLLS.inc()
        try:
            await wait_set(cs.waiter, req.wait)
        finally:
            cs.waiter = None
            metrics.LONG_POLLS.dec()
        if rt.fleet.get(computer_id) is not cs:  # removed (or re-enrolled) while it waited
            return _refuse("auth", 401, "unknown computer or wrong secret")
    # The relay it is assigned to (``relay assign``): the agent moves behind it; and
    # whether the server wants its whole inventory (``protocol/inventory.py``).
    relay = b"" if cs.relay is None else cs.relay.reply_field
    if quiet():
        metrics.FAST_EXCHANGES.inc()
        return Response(
            b'{"ack":%d,"messages":[],"server_time":%.3f,"settings":%s%s%s%s}'
            % (
                cs.in_acked,
                rt.config.clock(),
                rt.settings_json,
                relay,
                _ask_inventory(cs),
                offer,
            ),
            media_type="application/json",
        )
    metrics.SLOW_EXCHANGES.inc()
    out = await _apply(rt, cs, req, address)
    if isinstance(out, Response):
        return out
    return Response(
        b'{"ack":%d,"messages":[%s],"server_time":%.3f,"settings":%s%s%s%s%s}'
        % (
            out["ack"],
            ",".join(out["messages"]).encode(),
            out["server_time"],
            rt.settings_json,
            b',"more":true' if out.get("more") else b"",
            b"" if cs.relay is None else cs.relay.reply_field,
            _ask_inventory(cs),
            offer,
        ),
        media_type="application/json",
    )


def _ask_inventory(cs: ComputerState) -> bytes:
    return b',"inventory":"full"' if cs.inventory_full else b""


async def _authenticate_or_load(rt: Runtime, request: Request) -> ComputerState | str:
    cs = authenticate(rt, request)
    if isinstance(cs, str) and rt.loader is not None:
        # Enrolled (again) through another server process: load it, then try again.
        cid = computer_id_of(request)
        if cid is not None and await rt.loader.miss("computer", cid):
            cs = authenticate(rt, request)
    return cs


def computer_id_of(request: Request) -> int | None:
    return header_id(request, "x-taskfleet-computer")


def authenticate(rt: Runtime, request: Request) -> ComputerState | str:
    """The computer a request comes from (``X-Taskfleet-Computer: ID`` and
    ``Authorization: Bearer SECRET``, as the exchange and content fetches use), or why
    it is refused (a 401)."""
    computer_id = computer_id_of(request)
    if computer_id is None:
        return "missing or malformed X-Taskfleet-Computer header"
    auth = request.headers.get("authorization", "")
    cs = rt.fleet.get(computer_id)
    if cs is None or not auth.startswith("Bearer ") or not cs.check_secret(auth[7:]):
        return "unknown computer or wrong secret"
    return cs


async def read_body(request: Request, limit: int) -> bytearray | None:
    """A hot path's request body, or None when it is over ``limit`` bytes, declared
    (Content-Length) or streamed: nothing beyond the limit is read."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return body


def _parse_request(body: bytearray, out_seq: int) -> AgentRequest | Response:
    """The agent's request, or the 400 refusal that answers it."""
    try:
        req = parse_agent_request(loads_body(bytes(body)))
        if req.ack > out_seq:
            raise ProtocolError(f"ack {req.ack} is beyond the last message sent ({out_seq})")
    except (orjson.JSONDecodeError, ProtocolError) as exc:
        kind = "malformed" if isinstance(exc, orjson.JSONDecodeError) else "invalid"
        return _refuse(kind, 400, f"bad exchange: {exc}")
    return req


def _refuse(reason: str, status: int, message: str) -> Response:
    metrics.EXCHANGE_ERRORS.labels(reason).inc()
    return Response(
        orjson.dumps({"error": message}), status_code=status, media_type="application/json"
    )
