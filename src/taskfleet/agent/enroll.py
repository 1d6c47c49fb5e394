"""Enrolling the agent: once, with the server directly or through its relay.

Contract: ``enroll`` posts the enrollment body to ``ENROLL_PATH`` of one peer (the
relay when the agent has one: the relay forwards it unchanged and the server
enrolls the computer behind that relay; otherwise the server) and retries with
backoff while the peer is unreachable or answers 5xx; a refusal (400, 401, 403,
422) ends the agent with the server's reason. The answer is checked before
anything is saved: an unreadable one, or one whose server key is not the pinned
``--server-key``, ends the agent and nothing is saved (a relay could swap the key;
the signatures the agent verifies are only as good as it). Without a pinned key
the first key is trusted, and the log says so when it came through a relay.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from taskfleet.agent.http import Connection, HttpError, error_text
from taskfleet.agent.state import Identity
from taskfleet.protocol.exchange import (
    ENROLL_PATH,
    ServerSettings,
    identity_field,
    parse_settings,
)
from taskfleet.settings import AGENT_RETRY_MAX, AGENT_RETRY_MIN

log = logging.getLogger("taskfleet.agent")


@dataclass(frozen=True)
class Enrolled:
    identity: Identity
    settings: ServerSettings
    reenrolled: bool
    nonce: str | None = None  # the first identity nonce (an older server sends none)


async def enroll(
    conn: Connection,
    body: bytes,
    *,
    server: str,
    peer: str,
    url: str,
    pinned_key: str | None,
    sleep: Callable[[float], Awaitable[None]],
) -> Enrolled:
    """Enroll through ``conn`` (``peer`` "server" or "relay" at ``url``); ``server`` is
    the URL the identity names. Raises SystemExit with the reason when refused."""
    delay = AGENT_RETRY_MIN
    while True:
        try:
            raw = await conn.post(ENROLL_PATH, body, {})
            break
        except HttpError as exc:
            if exc.status in (400, 401, 403, 422):
                raise SystemExit(f"enrollment refused: {error_text(exc)}") from None
            log.warning("enrollment failed (%s); retrying in %.0fs", exc, delay)
        except (TimeoutError, OSError) as exc:
            log.warning(
                "%s %s unreachable (%s); retrying enrollment in %.0fs",
                peer,
                url,
                exc or type(exc).__name__,
                delay,
            )
        await sleep(delay)
        delay = min(delay * 2, AGENT_RETRY_MAX)
    try:
        d = json.loads(raw)
        ident = Identity(
            server,
            int(d["computer_id"]),
            str(d["secret"]),
            int(d["generation"]),
            bytes.fromhex(d["tickle_key"]),
            str(d["server_public_key"]),
        )
        settings = parse_settings(d.get("settings", {}))
        nonce = identity_field(d)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SystemExit(
            f"the {peer} {url} sent an enrollment answer this agent cannot read ({exc!r}); "
            "nothing was saved"
        ) from None
    check_server_key(ident.server_public_key, pinned_key, peer, url)
    return Enrolled(ident, settings, d.get("reenrolled") is True, nonce)


def check_server_key(key: str, pinned: str | None, peer: str, url: str) -> None:
    """Refuse (SystemExit) an enrollment answer whose key is not the pinned one."""
    if pinned is None:
        if peer == "relay":
            log.warning(
                "server key %s trusted on first use: it came through relay %s "
                "(pin it with --server-key)",
                key,
                url,
            )
        return
    if key.lower() != pinned.lower():
        raise SystemExit(
            f"enrollment refused by this agent: the answer from {peer} {url} carries "
            f"server key {key}, not the pinned --server-key {pinned} (a relay may have "
            "swapped it); nothing was saved. The server may list the computer it "
            "enrolled: remove it there."
        )
    log.info("server key %s matches --server-key", key)
