"""Content by hash (``server/content.py``): add, list, show, remove; agents and relays fetch it.

Contract:

* ``POST /api/v1/content?name=NAME`` (operator): the raw body is the content
  (``application/octet-stream``), streamed from the connection to disk, never read
  whole (``server/app.py`` lets this one route's body past its buffering limit); at most
  ``settings.CONTENT_MAX_BYTES`` (413); an ``X-Content-SHA256`` header is checked
  against the bytes (400, nothing stored). 201 with the row when added, 200 when the
  tenant had these bytes already (the row as it was).
* ``GET /api/v1/content`` and ``GET /api/v1/content/{sha256}`` (viewer): the
  tenant's content; one item adds the ids of the jobs that reference it (``jobs``)
  and of those not finished (``unfinished_jobs``).
* ``DELETE /api/v1/content/{sha256}`` (operator): 409 naming the unfinished jobs (or
  job schedules) that reference it; else the row goes (and the file, once no tenant
  has a row for it).
* ``GET /agent/v1/content/{sha256}``: a computer's own tenant's content, authenticated
  like its exchange (``api/agent.authenticate``); ``GET /relay/v1/content/{sha256}``:
  a relay's tenant's, authenticated like its exchange
  (``api/relay_exchange.authenticate``). Both stream the file and answer
  ``Range: bytes=N-`` with 206 (``protocol/content.py``); bytes sent are counted in
  ``taskfleet_content_served_bytes_total{to="agent"|"relay"}``.
* A hash that is not 64 hex digits, or that the tenant has no content for, is 404.
  A computer whose identity is flagged (``server/identity.py``) is refused with 409.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import IO, Annotated, Any

from fastapi import Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from taskfleet.protocol.content import SHA256_HEADER, span, valid_sha256
from taskfleet.protocol.jobs import CONTENT_PATH, RELAY_CONTENT_PATH
from taskfleet.server import content, identity, metrics
from taskfleet.server.api import agent, relay_exchange
from taskfleet.server.api.deps import Operator, Rt, Viewer, read, router_for
from taskfleet.server.kernel import ApiError
from taskfleet.server.runtime import Runtime
from taskfleet.settings import CONTENT_CHUNK, CONTENT_MAX_BYTES

log = logging.getLogger("taskfleet.server")
router = router_for()

UPLOAD_PATH = "/api/v1/content"

_OCTETS = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
_UPLOAD_DOC: dict[str, Any] = {
    "requestBody": {"required": True, "content": _OCTETS},
    "parameters": [
        {
            "name": SHA256_HEADER,
            "in": "header",
            "required": False,
            "description": "the SHA-256 the bytes must have (64 hex digits): else 400, "
            "nothing stored",
            "schema": {"type": "string"},
        }
    ],
}
_FETCH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the content", "content": _OCTETS},
    206: {"description": "the content from the Range's first byte on", "content": _OCTETS},
    416: {"description": "the Range starts at or beyond the content's size"},
}


def _fetch_doc(header: str, scheme: str, who: str) -> dict[str, Any]:
    return {
        "security": [{scheme: []}],
        "parameters": [
            {
                "name": header,
                "in": "header",
                "required": True,
                "description": f"the {who} id from enrollment",
                "schema": {"type": "integer", "minimum": 1},
            },
            {
                "name": "Range",
                "in": "header",
                "required": False,
                "description": "bytes=N- to resume from byte N",
                "schema": {"type": "string"},
            },
        ],
    }


@router.post(
    UPLOAD_PATH,
    status_code=201,
    tags=["content"],
    openapi_extra=_UPLOAD_DOC,
    responses={200: {"description": "the tenant had these bytes already: nothing new"}},
)
async def add_content(
    rt: Rt,
    p: Operator,
    request: Request,
    response: Response,
    name: Annotated[str, Query(description="what the content is called (a label)")],
) -> dict[str, Any]:
    """Add content: the request body, stored by its SHA-256."""
    content.check_name(name)
    expected = request.headers.get(SHA256_HEADER)
    if expected is not None:
        expected = expected.strip().lower()
        if not valid_sha256(expected):
            raise ApiError(400, f"the {SHA256_HEADER} header must be 64 hex digits")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > CONTENT_MAX_BYTES:
        raise ApiError(413, f"content over {CONTENT_MAX_BYTES} bytes")
    store = rt.content_store
    try:
        got = await store.receive(request.stream(), limit=CONTENT_MAX_BYTES, expected=expected)
    except ClientDisconnect:
        raise ApiError(400, "the upload was cut off: nothing stored") from None
    try:
        async with store.lock(got.sha256):
            placed = store.place(got)
            try:
                row, created = await rt.writer.run(
                    lambda c: content.add(c, p, got.sha256, got.size, name, rt.now())
                )
            except BaseException:
                if placed:  # nobody else can have a row for it: we hold its lock
                    still = await read(rt, lambda c: content.referenced(c, got.sha256))
                    if not still:
                        store.discard(got.sha256)
                raise
    finally:
        got.tmp.unlink(missing_ok=True)
    if created:
        log.info("content %s added (%d bytes, %s) by %s", got.sha256, got.size, name, p.actor)
    else:
        response.status_code = 200
    return row


@router.get(UPLOAD_PATH, tags=["content"])
async def list_content(rt: Rt, p: Viewer) -> list[dict[str, Any]]:
    return await read(rt, lambda c: content.list_content(c, p))


@router.get(UPLOAD_PATH + "/{sha256}", tags=["content"])
async def get_content(rt: Rt, sha256: str, p: Viewer) -> dict[str, Any]:
    sha = content.check_sha(sha256)
    return await read(rt, lambda c: content.get_content(c, p, sha))


@router.delete(UPLOAD_PATH + "/{sha256}", tags=["content"])
async def remove_content(rt: Rt, sha256: str, p: Operator) -> dict[str, Any]:
    sha = content.check_sha(sha256)
    store = rt.content_store
    async with store.lock(sha):
        orphan = await rt.writer.run(lambda c: content.remove(c, p, sha, rt.now()))
        if orphan:
            store.discard(sha)
    log.info("content %s removed by %s%s", sha, p.actor, " (file deleted)" if orphan else "")
    return {"sha256": sha, "removed": True, "file_deleted": orphan}


# -- fetches by agents and relays ------------------------------------------------------


@router.get(
    CONTENT_PATH + "{sha256}",
    tags=["agent"],
    response_class=Response,
    responses=_FETCH_RESPONSES,
    openapi_extra=_fetch_doc("X-Taskfleet-Computer", "ComputerSecret", "computer"),
)
async def agent_fetch(rt: Rt, sha256: str, request: Request) -> Response:
    """Content of the computer's own tenant, for its job's Download phase."""
    cs = agent.authenticate(rt, request)
    if isinstance(cs, str):
        raise ApiError(401, cs)
    if identity.blocked(cs):  # two agents hold this identity: neither gets anything
        raise ApiError(
            409,
            f"computer {cs.id} refused: its identity is flagged (two agents use it); an "
            "administrator must decide (taskfleet computer identity-reset, or remove it)",
        )
    return await _serve(rt, cs.tenant_id, sha256, request, metrics.CONTENT_TO_AGENTS)


@router.get(
    RELAY_CONTENT_PATH + "{sha256}",
    tags=["relay"],
    response_class=Response,
    responses=_FETCH_RESPONSES,
    openapi_extra=_fetch_doc("X-Taskfleet-Relay", "RelaySecret", "relay"),
)
async def relay_fetch(rt: Rt, sha256: str, request: Request) -> Response:
    """Content of the relay's tenant, for the relay's cache."""
    rs = relay_exchange.authenticate(rt, request)
    if rs is None:
        raise ApiError(401, "unknown relay, wrong secret or revoked")
    return await _serve(rt, rs.tenant_id, sha256, request, metrics.CONTENT_TO_RELAYS)


async def _serve(
    rt: Runtime, tenant_id: int, sha256: str, request: Request, counter: Any
) -> Response:
    sha = content.check_sha(sha256)
    size = await read(rt, lambda c: content.size_of(c, tenant_id, sha))
    if size is None:
        raise ApiError(404, f"no content {sha}")
    try:
        f = open(rt.content_store.path(sha), "rb")  # noqa: SIM115 (closed by _stream)
    except FileNotFoundError:
        log.error("content %s has a row but no file under %s", sha, rt.content_store.root)
        raise ApiError(404, f"no content {sha} (its file is missing on the server)") from None
    part = span(request.headers.get("range"), size)
    if part.unsatisfiable:
        f.close()
        return Response(status_code=416, headers=part.headers())
    return StreamingResponse(
        _stream(f, part.start, part.length, counter),
        status_code=part.status,
        headers=part.headers(),
        media_type="application/octet-stream",
    )


async def _stream(f: IO[bytes], start: int, length: int, counter: Any) -> AsyncIterator[bytes]:
    """``length`` bytes of ``f`` from ``start``, a chunk at a time; reads off the event
    loop (a cold disk must not stall the exchanges)."""
    try:
        f.seek(start)
        left = length
        while left > 0:
            piece = await asyncio.to_thread(f.read, min(CONTENT_CHUNK, left))
            if not piece:
                break  # cannot happen for a file that is never rewritten; do not spin
            left -= len(piece)
            counter.inc(len(piece))
            yield piece
    finally:
        f.close()
