"""UDP "tickle": an authenticated, rate-limited hint that a computer should exchange now.

Contract: a tickle carries no command, only "exchange now"; losing one costs latency, never
correctness, so every doubtful case drops it. Datagram (47 bytes, big-endian):

    MAGIC b"TF"(2) | version 1 (1) | computer_id u64 (8) | timestamp ms u64 (8)
    | nonce (12) | MAC (16) = first 16 bytes of HMAC-SHA256(key, all preceding bytes)

The key is per computer: derive_tickle_key(master, computer_id, generation); a relay is tickled the
same way with its own id and derive_relay_tickle_key(master, relay_id, generation). The agent
checks, in order: length/magic/version ("malformed"), MAC in constant time ("bad-mac"), computer id
("wrong-computer"), |server-adjusted now - timestamp| <= max_skew ("stale"), nonce not seen and
timestamp above the replay floor ("replayed"). Of the tickles that pass, the agent acts on at
most one per min_interval ("rate-limited"). The nonce cache lives in memory, so an agent keeps
``high_water_ms`` (the newest timestamp that passed) in its durable state and restores it as
``replay_floor_ms`` after a restart: a tickle captured before the restart stays refused. The
server paces fleet-wide sends with a token bucket (TicklePacer) and sends at most one tickle per
computer per min_interval (PerComputerLimiter), so a tickle can never amplify traffic.
Everything here is pure: callers pass `now`.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import math
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final, Literal, get_args

TICKLE_MAGIC: Final = b"TF"
TICKLE_VERSION: Final = 1

NONCE_SIZE: Final = 12
MAC_SIZE: Final = 16
_HEADER = struct.Struct(">2sBQQ12s")
TICKLE_SIZE: Final = _HEADER.size + MAC_SIZE

_U64_MAX: Final = 2**64 - 1

TickleReason = Literal[
    "malformed", "bad-mac", "wrong-computer", "stale", "replayed", "rate-limited"
]
TICKLE_REASONS: Final[tuple[TickleReason, ...]] = get_args(TickleReason)


class TickleError(ValueError):
    def __init__(self, reason: TickleReason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason: TickleReason = reason


@dataclass(frozen=True)
class Tickle:
    computer_id: int
    timestamp: float
    nonce: bytes


def derive_tickle_key(master_key: bytes, computer_id: int, generation: int) -> bytes:
    # The generation lets the server revoke a leaked agent key by bumping it, without
    # storing any per-computer secret.
    label = b"taskfleet-tickle|%d|%d" % (computer_id, generation)
    return hmac.new(master_key, label, hashlib.sha256).digest()


def derive_relay_tickle_key(master_key: bytes, relay_id: int, generation: int) -> bytes:
    # Relays are tickled in the same datagram format, with the relay's id in the id
    # field. Their own label keeps a relay's key from ever being a computer's of the
    # same number (or the reverse): a relay cannot wake a computer with it.
    label = b"taskfleet-relay-tickle|%d|%d" % (relay_id, generation)
    return hmac.new(master_key, label, hashlib.sha256).digest()


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()[:MAC_SIZE]


def encode_tickle(key: bytes, computer_id: int, now: float, nonce: bytes | None = None) -> bytes:
    if not key:
        raise ValueError("tickle key must not be empty")
    if not 0 <= computer_id <= _U64_MAX:
        raise ValueError(f"computer_id out of uint64 range: {computer_id}")
    if not math.isfinite(now) or now < 0:
        raise ValueError(f"timestamp must be a finite non-negative time: {now}")
    timestamp_ms = round(now * 1000)
    if timestamp_ms > _U64_MAX:
        raise ValueError(f"timestamp out of range: {now}")
    if nonce is None:
        nonce = os.urandom(NONCE_SIZE)
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
    body = _HEADER.pack(TICKLE_MAGIC, TICKLE_VERSION, computer_id, timestamp_ms, nonce)
    return body + _mac(key, body)


class TickleVerifier:
    """Agent side.

    Replay cache: a nonce is kept until its own (authenticated) timestamp leaves the skew
    window, after which a replay would fail as "stale" anyway. The cache is bounded: when it
    is full of unexpired nonces, the entry with the oldest timestamp is evicted and the
    *replay floor* is raised to that timestamp, and every tickle at or below the floor is
    refused as "replayed". So a possibly-replayed tickle is never accepted, yet fresh ones keep
    working. The floor is also raised by ordinary expiry, which keeps replays out even if the
    clock offset or the local clock later moves backwards. The floor only ever holds server
    timestamps that passed the MAC, so a wrong local clock cannot push it into the future.
    """

    def __init__(
        self,
        key: bytes,
        computer_id: int,
        *,
        max_skew: float = 120.0,
        min_interval: float = 1.0,
        replay_cache_size: int = 4096,
        replay_floor_ms: int = -1,
    ) -> None:
        if not key:
            raise ValueError("tickle key must not be empty")
        if not max_skew > 0:
            raise ValueError(f"max_skew must be > 0, got {max_skew}")
        if not min_interval >= 0:
            raise ValueError(f"min_interval must be >= 0, got {min_interval}")
        if replay_cache_size < 1:
            raise ValueError(f"replay_cache_size must be >= 1, got {replay_cache_size}")
        self._key = key
        self._computer_id = computer_id
        self._max_skew = max_skew
        self._min_interval = min_interval
        self._cache_size = replay_cache_size
        self._offset = 0.0
        self._seen: set[bytes] = set()
        # Ordered by tickle timestamp, which is also expiry order.
        self._expiry: list[tuple[int, bytes]] = []
        self._floor_ms = replay_floor_ms
        self._high_ms = replay_floor_ms
        self._last_accept: float | None = None
        self.drops: dict[str, int] = dict.fromkeys(TICKLE_REASONS, 0)

    @property
    def high_water_ms(self) -> int:
        """The newest timestamp (ms, server clock) that passed, or the floor given at start."""
        return self._high_ms

    def set_clock_offset(self, offset: float) -> None:
        if not math.isfinite(offset):
            raise ValueError(f"clock offset must be finite, got {offset}")
        self._offset = offset

    def verify(self, datagram: bytes, now: float) -> Tickle:
        if len(datagram) != TICKLE_SIZE:
            raise TickleError("malformed", f"length {len(datagram)} != {TICKLE_SIZE}")
        body, mac = datagram[: _HEADER.size], datagram[_HEADER.size :]
        magic, version, computer_id, timestamp_ms, nonce = _HEADER.unpack(body)
        if magic != TICKLE_MAGIC:
            raise TickleError("malformed", "bad magic")
        if version != TICKLE_VERSION:
            raise TickleError("malformed", f"unsupported version {version}")
        if not hmac.compare_digest(mac, _mac(self._key, body)):
            raise TickleError("bad-mac")
        if computer_id != self._computer_id:
            raise TickleError("wrong-computer", f"addressed to {computer_id}")
        server_now = now + self._offset
        timestamp = timestamp_ms / 1000
        if not abs(server_now - timestamp) <= self._max_skew:
            raise TickleError("stale", f"skew {server_now - timestamp:.3f}s")
        self._expire(server_now)
        if timestamp_ms <= self._floor_ms or nonce in self._seen:
            raise TickleError("replayed")
        if len(self._seen) >= self._cache_size:
            oldest_ms, oldest_nonce = self._expiry[0]
            if timestamp_ms <= oldest_ms:
                # Evicting would raise the floor to or above this tickle, so refuse it instead.
                raise TickleError("replayed", "replay cache full")
            heapq.heappop(self._expiry)
            self._seen.discard(oldest_nonce)
            self._floor_ms = max(self._floor_ms, oldest_ms)
        heapq.heappush(self._expiry, (timestamp_ms, nonce))
        self._seen.add(nonce)
        self._high_ms = max(self._high_ms, timestamp_ms)
        return Tickle(computer_id=computer_id, timestamp=timestamp, nonce=nonce)

    def _expire(self, server_now: float) -> None:
        expiry = self._expiry
        while expiry and expiry[0][0] / 1000 + self._max_skew < server_now:
            ts_ms, nonce = heapq.heappop(expiry)
            self._seen.discard(nonce)
            self._floor_ms = max(self._floor_ms, ts_ms)

    def accept(self, datagram: bytes, now: float) -> bool:
        try:
            self.verify(datagram, now)
        except TickleError as exc:
            self.drops[exc.reason] += 1
            return False
        last = self._last_accept
        # A negative elapsed time means the local clock stepped back; waiting for it to catch
        # up could silence tickles for hours, so treat it as a fresh interval.
        if last is not None and 0 <= now - last < self._min_interval:
            self.drops["rate-limited"] += 1
            return False
        self._last_accept = now
        return True


class TicklePacer:
    """Server side, fleet-wide token bucket.

    Tokens may go negative: each reservation is granted immediately and the returned wait tells
    the caller when its send slot is, so concurrent senders queue without a lock-step loop.
    """

    def __init__(self, rate: float, burst: int | None = None) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a finite number > 0, got {rate}")
        if burst is None:
            burst = max(1, int(rate / 10))
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last: float | None = None

    def reserve(self, now: float) -> float:
        if self._last is not None and now > self._last:
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        # Never move the reference time back, or a clock step would mint extra tokens.
        if self._last is None or now > self._last:
            self._last = now
        self._tokens -= 1.0
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / self.rate


class PerComputerLimiter:
    """Server side: at most one tickle per computer per min_interval.

    Entries are kept in last-tickled order, so expired ones are popped from the front: amortised
    O(1) per call and memory proportional to the tickles of the last min_interval. If even that
    exceeds max_entries, new computers are refused (a tickle is only a hint; the agent's regular
    exchange still happens) rather than evicting live entries, which would allow double tickles.
    """

    def __init__(self, min_interval: float = 1.0, max_entries: int = 1_000_000) -> None:
        if not min_interval >= 0:
            raise ValueError(f"min_interval must be >= 0, got {min_interval}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self._min_interval = min_interval
        self._max_entries = max_entries
        self._last: OrderedDict[int, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._last)

    def allow(self, computer_id: int, now: float) -> bool:
        entries = self._last
        while entries:
            oldest_id, oldest_at = next(iter(entries.items()))
            if not now - oldest_at >= self._min_interval:
                break
            del entries[oldest_id]
        last = entries.get(computer_id)
        if last is not None:
            # Negative elapsed: the clock stepped back; see TickleVerifier.accept.
            if 0 <= now - last < self._min_interval:
                return False
            entries.move_to_end(computer_id)
        elif len(entries) >= self._max_entries:
            return False
        entries[computer_id] = now
        return True
