"""An agent behind a relay: which peer it talks to, and what each peer holds of its messages.

Contract: pure rules (no I/O, no clock: callers pass ``now``, monotonic seconds), used
by ``agent/main.py``; RELAY.md "Truth and dedup" says why they keep nothing lost or
doubled.

* ``PeerAcks``: the agent keeps each of its messages until the SERVER acknowledged it
  (its outbox holds everything above ``server``). A relay's reply says what the relay
  holds (``ack``: send that relay only what is above it) and what the server
  acknowledged (``server_ack``: prune up to it); a direct reply's ``ack`` is the
  server's. What a relay holds is kept in memory only: after a restart the agent
  sends it everything the server has not acknowledged, and the relay drops what it
  already has. After a switch to the server, everything above the server's ack goes
  to it; the relay's later forward of the same sequence numbers is dropped by the
  server as a duplicate.
* ``Failover``: with a relay, the agent exchanges with it; when the relay has failed
  (unreachable, timeout, 5xx) for ``failover_after`` seconds without an answer in
  between, the agent exchanges with the server directly. While direct, every
  ``probe_every`` seconds one exchange goes to the relay (a probe: an ordinary
  exchange); when it answers, the agent is back behind its relay. A failed probe
  changes nothing but the time of the next one. A relay that says it no longer
  serves this computer (``released``: it was moved to another relay or taken off
  relays) is left at once: the server's reply then names the relay to move to.
* ``reassigned``: the server's own replies name the relay the computer is assigned
  to (``relay assign``). An agent that talks to the server directly (failed over, or
  without a relay) and is told of another relay than the one it uses moves behind
  it: a new ``Failover`` (behind the relay) and ``PeerAcks.moved`` (the new relay
  holds nothing: it gets everything the server has not acknowledged). A relay's
  reply never moves an agent (a relay is not trusted to name its successor), nor
  does a server reply naming no relay (no assignment, or one without a URL).
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from enum import StrEnum


class Peer(StrEnum):
    RELAY = "relay"
    SERVER = "server"


class Switch(StrEnum):
    """A change of peer, which the agent logs once."""

    FAILED_OVER = "failed-over"  # the relay failed long enough: now direct
    RETURNED = "returned"  # a probe answered: back behind the relay


@dataclass
class PeerAcks:
    server: int = 0  # the highest agent message the server acknowledged
    relay: int = 0  # the highest agent message the relay said it holds (memory only)

    def send_above(self, peer: Peer) -> int:
        """Send ``peer`` the messages above this sequence number."""
        return self.server if peer is Peer.SERVER else max(self.server, self.relay)

    def replied(self, peer: Peer, ack: int, server_ack: int | None) -> int:
        """Record a reply's acks; returns what the server acknowledged (prune up to it).

        A relay's ``ack`` replaces what it held before (a relay that lost its spool says
        less, and gets those messages again); a relay reply without ``server_ack`` says
        nothing of the server, so nothing is pruned on it."""
        if peer is Peer.SERVER:
            self.server = max(self.server, ack)
        else:
            self.relay = ack
            if server_ack is not None:
                self.server = max(self.server, server_ack)
        return self.server

    def moved(self) -> None:
        """Behind another relay now: it holds none of this agent's messages yet."""
        self.relay = 0


def _url_key(url: str) -> tuple[str, str, str]:
    u = urllib.parse.urlsplit(url)
    return u.scheme.lower(), u.netloc.lower(), u.path.rstrip("/")


def reassigned(peer: Peer, current: str | None, assigned: str | None) -> str | None:
    """The relay to move behind after a reply from ``peer`` naming ``assigned``, while
    the agent uses relay ``current`` (None: none); None: stay. The same URL spelled
    with another case of scheme or host, or a trailing slash, is the same relay."""
    if peer is not Peer.SERVER or assigned is None:
        return None
    if current is not None and _url_key(current) == _url_key(assigned):
        return None
    return assigned


@dataclass
class Failover:
    failover_after: float  # seconds of relay failures before the agent goes direct
    probe_every: float  # while direct, seconds between two probes of the relay
    direct: bool = False
    failing_since: float | None = None  # first relay failure with no answer since
    next_probe: float = 0.0

    def choose(self, now: float) -> tuple[Peer, Switch | None]:
        """The peer of the next exchange, and the switch choosing it made, if any."""
        if not self.direct:
            if self.failing_since is None or now - self.failing_since < self.failover_after:
                return Peer.RELAY, None
            self.direct = True
            self.next_probe = now + self.probe_every
            return Peer.SERVER, Switch.FAILED_OVER
        return (Peer.RELAY if now >= self.next_probe else Peer.SERVER), None

    def answered(self, peer: Peer) -> Switch | None:
        """An exchange with ``peer`` succeeded."""
        if peer is not Peer.RELAY:
            return None
        self.failing_since = None
        if self.direct:
            self.direct = False
            return Switch.RETURNED
        return None

    def failed(self, peer: Peer, now: float) -> bool:
        """An exchange with ``peer`` failed (the relay: unreachable, timeout, 5xx).
        Returns whether the next exchange should go at once (a failed probe: the
        server is the peer meanwhile, and a failover is due)."""
        if peer is not Peer.RELAY:
            return False
        if self.direct:
            self.next_probe = now + self.probe_every
            return True
        if self.failing_since is None:
            self.failing_since = now
        return now - self.failing_since >= self.failover_after

    def released(self, now: float) -> None:
        """The relay no longer serves this computer: exchange with the server now."""
        self.direct = True
        self.failing_since = None
        self.next_probe = now + self.probe_every

    def wait_limit(self, now: float) -> float | None:
        """Seconds until the next exchange must happen for a failover or a probe
        (None: nothing due)."""
        if self.direct:
            return max(0.0, self.next_probe - now)
        if self.failing_since is not None:
            return max(0.0, self.failing_since + self.failover_after - now)
        return None
