from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskfleet.protocol.tickle import (
    TICKLE_MAGIC,
    TICKLE_SIZE,
    TICKLE_VERSION,
    PerComputerLimiter,
    Tickle,
    TickleError,
    TicklePacer,
    TickleVerifier,
    derive_relay_tickle_key,
    derive_tickle_key,
    encode_tickle,
)

MASTER = b"m" * 32
CID = 42
KEY = derive_tickle_key(MASTER, CID, 1)
T0 = 1_700_000_000.0


def nonce(i: int) -> bytes:
    return i.to_bytes(12, "big")


def verifier(
    *, max_skew: float = 120.0, min_interval: float = 1.0, replay_cache_size: int = 4096
) -> TickleVerifier:
    return TickleVerifier(
        KEY,
        CID,
        max_skew=max_skew,
        min_interval=min_interval,
        replay_cache_size=replay_cache_size,
    )


def reason_of(v: TickleVerifier, datagram: bytes, now: float) -> str:
    with pytest.raises(TickleError) as info:
        v.verify(datagram, now)
    return info.value.reason


# --- keys and encoding -----------------------------------------------------------------------


def test_derived_key_is_hmac_sha256_of_labelled_id_and_generation() -> None:
    expected = hmac.new(MASTER, b"taskfleet-tickle|42|1", hashlib.sha256).digest()
    assert derive_tickle_key(MASTER, 42, 1) == expected
    assert len(KEY) == 32


def test_derived_keys_differ_per_computer_and_generation() -> None:
    keys = {derive_tickle_key(MASTER, c, g) for c in (1, 2) for g in (1, 2)}
    assert len(keys) == 4


def test_a_relay_key_has_its_own_label_and_is_never_a_computers() -> None:
    expected = hmac.new(MASTER, b"taskfleet-relay-tickle|42|1", hashlib.sha256).digest()
    assert derive_relay_tickle_key(MASTER, 42, 1) == expected
    computers = {derive_tickle_key(MASTER, c, g) for c in range(1, 20) for g in range(1, 4)}
    relays = {derive_relay_tickle_key(MASTER, r, g) for r in range(1, 20) for g in range(1, 4)}
    assert len(relays) == 57 and not computers & relays
    # A tickle made with a relay's key is refused by the computer of the same number.
    dg = encode_tickle(derive_relay_tickle_key(MASTER, CID, 1), CID, T0, nonce(1))
    with pytest.raises(TickleError) as err:
        TickleVerifier(KEY, CID).verify(dg, T0)
    assert err.value.reason == "bad-mac"


def test_encoded_datagram_has_documented_layout() -> None:
    dg = encode_tickle(KEY, CID, T0 + 0.5, nonce(7))
    assert len(dg) == TICKLE_SIZE == 47
    assert dg[:2] == TICKLE_MAGIC
    assert dg[2] == TICKLE_VERSION
    assert int.from_bytes(dg[3:11], "big") == CID
    assert int.from_bytes(dg[11:19], "big") == 1_700_000_000_500
    assert dg[19:31] == nonce(7)
    assert dg[31:] == hmac.new(KEY, dg[:31], hashlib.sha256).digest()[:16]


def test_encode_uses_fresh_random_nonce_when_none_given() -> None:
    assert encode_tickle(KEY, CID, T0) != encode_tickle(KEY, CID, T0)


@pytest.mark.parametrize(
    ("computer_id", "now", "nonce_"),
    [
        (-1, T0, None),
        (2**64, T0, None),
        (CID, -1.0, None),
        (CID, float("nan"), None),
        (CID, T0, b"short"),
    ],
)
def test_encode_rejects_unencodable_input(
    computer_id: int, now: float, nonce_: bytes | None
) -> None:
    with pytest.raises(ValueError):
        encode_tickle(KEY, computer_id, now, nonce_)


# --- verification ----------------------------------------------------------------------------


def test_round_trip_returns_tickle_fields() -> None:
    dg = encode_tickle(KEY, CID, T0, nonce(1))
    assert verifier().verify(dg, T0 + 3) == Tickle(computer_id=CID, timestamp=T0, nonce=nonce(1))


@pytest.mark.parametrize("length", [0, 1, 2, 3, TICKLE_SIZE - 1, TICKLE_SIZE + 1, 1500])
def test_truncated_or_extended_datagram_is_malformed(length: int) -> None:
    dg = encode_tickle(KEY, CID, T0, nonce(1))
    mangled = (dg + b"\0" * length)[:length]
    assert reason_of(verifier(), mangled, T0) == "malformed"


def test_wrong_magic_is_malformed() -> None:
    dg = encode_tickle(KEY, CID, T0, nonce(1))
    assert reason_of(verifier(), b"XX" + dg[2:], T0) == "malformed"


def test_wrong_version_is_malformed_even_with_valid_mac() -> None:
    body = TICKLE_MAGIC + bytes([2]) + encode_tickle(KEY, CID, T0, nonce(1))[3:31]
    dg = body + hmac.new(KEY, body, hashlib.sha256).digest()[:16]
    assert reason_of(verifier(), dg, T0) == "malformed"


def test_flipped_mac_bit_is_bad_mac() -> None:
    dg = bytearray(encode_tickle(KEY, CID, T0, nonce(1)))
    dg[-1] ^= 0x01
    assert reason_of(verifier(), bytes(dg), T0) == "bad-mac"


@pytest.mark.parametrize("index", [3, 10, 11, 18, 19, 30])
def test_flipped_payload_bit_is_bad_mac(index: int) -> None:
    dg = bytearray(encode_tickle(KEY, CID, T0, nonce(1)))
    dg[index] ^= 0x80
    assert reason_of(verifier(), bytes(dg), T0) == "bad-mac"


def test_tickle_under_another_key_is_bad_mac() -> None:
    other = derive_tickle_key(MASTER, CID, 2)
    assert reason_of(verifier(), encode_tickle(other, CID, T0, nonce(1)), T0) == "bad-mac"


def test_tickle_for_other_computer_is_wrong_computer() -> None:
    dg = encode_tickle(KEY, CID + 1, T0, nonce(1))
    assert reason_of(verifier(), dg, T0) == "wrong-computer"


def test_tickle_older_than_max_skew_is_stale_and_boundary_is_accepted() -> None:
    v = verifier(max_skew=120.0)
    assert reason_of(v, encode_tickle(KEY, CID, T0, nonce(1)), T0 + 120.001) == "stale"
    assert v.verify(encode_tickle(KEY, CID, T0, nonce(2)), T0 + 120.0).nonce == nonce(2)


def test_tickle_too_far_in_future_is_stale() -> None:
    v = verifier(max_skew=120.0)
    assert reason_of(v, encode_tickle(KEY, CID, T0 + 121, nonce(1)), T0) == "stale"


def test_exact_replay_is_refused() -> None:
    v = verifier()
    dg = encode_tickle(KEY, CID, T0, nonce(1))
    v.verify(dg, T0)
    assert reason_of(v, dg, T0 + 5) == "replayed"


def test_same_nonce_with_new_timestamp_is_refused() -> None:
    v = verifier()
    v.verify(encode_tickle(KEY, CID, T0, nonce(1)), T0)
    assert reason_of(v, encode_tickle(KEY, CID, T0 + 1, nonce(1)), T0 + 1) == "replayed"


def test_a_restarted_verifier_given_the_high_water_refuses_a_captured_tickle() -> None:
    before = verifier()
    captured = encode_tickle(KEY, CID, T0, nonce(1))
    before.verify(captured, T0)
    before.verify(encode_tickle(KEY, CID, T0 - 3, nonce(2)), T0)  # older: no new high water
    assert before.high_water_ms == round(T0 * 1000)
    # A restart loses the nonce cache: without the floor the replay passes...
    assert verifier().verify(captured, T0 + 5).nonce == nonce(1)
    # ...with the high water kept, it is refused, and a newer tickle still passes.
    after = TickleVerifier(KEY, CID, replay_floor_ms=before.high_water_ms)
    assert reason_of(after, captured, T0 + 5) == "replayed"
    assert reason_of(after, encode_tickle(KEY, CID, T0 - 1, nonce(3)), T0 + 5) == "replayed"
    after.verify(encode_tickle(KEY, CID, T0 + 0.001, nonce(4)), T0 + 5)
    assert after.high_water_ms == round(T0 * 1000) + 1


def test_high_water_moves_only_on_tickles_that_pass() -> None:
    v = TickleVerifier(KEY, CID, replay_floor_ms=5)
    assert v.high_water_ms == 5
    assert not v.accept(encode_tickle(b"other", CID, T0, nonce(1)), T0)  # bad MAC
    assert not v.accept(encode_tickle(KEY, CID, T0 + 500, nonce(2)), T0)  # stale
    assert v.high_water_ms == 5


def test_replay_after_capacity_eviction_inside_window_is_still_refused() -> None:
    v = verifier(replay_cache_size=4)
    first = encode_tickle(KEY, CID, T0, nonce(0))
    v.verify(first, T0)
    for i in range(1, 10):
        v.verify(encode_tickle(KEY, CID, T0 + i, nonce(i)), T0 + i)
    # nonce(0) has been pushed out of the 4-entry cache but is still inside the skew window.
    assert reason_of(v, first, T0 + 10) == "replayed"


def test_full_cache_refuses_tickle_older_than_everything_cached() -> None:
    v = verifier(replay_cache_size=2)
    v.verify(encode_tickle(KEY, CID, T0 + 10, nonce(1)), T0 + 10)
    v.verify(encode_tickle(KEY, CID, T0 + 11, nonce(2)), T0 + 11)
    late = encode_tickle(KEY, CID, T0 + 5, nonce(3))
    assert reason_of(v, late, T0 + 12) == "replayed"
    # Fresh tickles still get through a full cache.
    assert v.verify(encode_tickle(KEY, CID, T0 + 12, nonce(4)), T0 + 12).nonce == nonce(4)


def test_replay_after_time_pruning_stays_refused_when_clock_moves_back() -> None:
    v = verifier(max_skew=120.0)
    first = encode_tickle(KEY, CID, T0, nonce(0))
    v.verify(first, T0)
    # A later tickle prunes nonce(0) from the cache once it is outside the window...
    v.verify(encode_tickle(KEY, CID, T0 + 200, nonce(1)), T0 + 200)
    # ...and a backwards clock step that brings T0 back inside the window must not revive it.
    v.set_clock_offset(-150.0)
    assert reason_of(v, first, T0 + 200) == "replayed"


def test_replay_cache_memory_stays_bounded() -> None:
    v = verifier(replay_cache_size=16)
    for i in range(1000):
        v.verify(encode_tickle(KEY, CID, T0 + i, nonce(i)), T0 + i)
    assert len(v._seen) <= 16
    assert len(v._expiry) <= 16


def test_clock_offset_shifts_verification_time() -> None:
    # Local clock runs 300 s behind the server: without the offset the tickle looks stale.
    dg = encode_tickle(KEY, CID, T0, nonce(1))
    assert reason_of(verifier(), dg, T0 - 300) == "stale"
    v = verifier()
    v.set_clock_offset(300.0)
    assert v.verify(dg, T0 - 300).timestamp == T0


def test_verifier_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError):
        TickleVerifier(b"", CID)
    with pytest.raises(ValueError):
        verifier(max_skew=0)
    with pytest.raises(ValueError):
        verifier(replay_cache_size=0)


# --- accept ----------------------------------------------------------------------------------


def test_accept_allows_one_tickle_per_min_interval_and_counts_rate_limited() -> None:
    v = verifier(min_interval=1.0)
    assert v.accept(encode_tickle(KEY, CID, T0, nonce(1)), T0)
    assert not v.accept(encode_tickle(KEY, CID, T0 + 0.5, nonce(2)), T0 + 0.5)
    assert not v.accept(encode_tickle(KEY, CID, T0 + 0.9, nonce(3)), T0 + 0.9)
    assert v.accept(encode_tickle(KEY, CID, T0 + 1.0, nonce(4)), T0 + 1.0)
    assert v.drops["rate-limited"] == 2


def test_rate_limited_tickle_cannot_be_replayed_later() -> None:
    v = verifier(min_interval=1.0)
    v.accept(encode_tickle(KEY, CID, T0, nonce(1)), T0)
    dg = encode_tickle(KEY, CID, T0 + 0.5, nonce(2))
    assert not v.accept(dg, T0 + 0.5)
    assert not v.accept(dg, T0 + 2)
    assert v.drops["replayed"] == 1


def test_accept_never_raises_and_counts_every_drop_by_reason() -> None:
    v = verifier()
    good = encode_tickle(KEY, CID, T0, nonce(1))
    flipped = bytearray(good)
    flipped[-1] ^= 1
    assert not v.accept(b"junk", T0)
    assert not v.accept(bytes(flipped), T0)
    assert not v.accept(encode_tickle(KEY, CID + 1, T0, nonce(2)), T0)
    assert not v.accept(encode_tickle(KEY, CID, T0 - 1000, nonce(3)), T0)
    assert v.accept(good, T0)
    assert not v.accept(good, T0 + 5)
    assert v.drops == {
        "malformed": 1,
        "bad-mac": 1,
        "wrong-computer": 1,
        "stale": 1,
        "replayed": 1,
        "rate-limited": 0,
    }


def test_accept_after_local_clock_steps_back_is_not_silenced() -> None:
    v = verifier(min_interval=1.0)
    assert v.accept(encode_tickle(KEY, CID, T0, nonce(1)), T0)
    v.set_clock_offset(100.0)
    assert v.accept(encode_tickle(KEY, CID, T0 + 1, nonce(2)), T0 - 99)


@given(st.binary(max_size=100))
def test_accept_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    assert verifier().accept(data, T0) is False


@given(index=st.integers(0, TICKLE_SIZE - 1), delta=st.integers(1, 255))
def test_any_single_byte_change_is_rejected(index: int, delta: int) -> None:
    dg = bytearray(encode_tickle(KEY, CID, T0, nonce(9)))
    dg[index] ^= delta
    assert reason_of(verifier(), bytes(dg), T0) in {"malformed", "bad-mac"}


# --- pacer -----------------------------------------------------------------------------------


def test_pacer_allows_burst_then_spaces_reservations_by_one_over_rate() -> None:
    p = TicklePacer(rate=1000, burst=10)
    waits = [p.reserve(T0) for _ in range(15)]
    assert waits[:10] == [0.0] * 10
    assert waits[10:] == pytest.approx([0.001, 0.002, 0.003, 0.004, 0.005])


def test_pacer_refills_at_rate_up_to_burst() -> None:
    p = TicklePacer(rate=10, burst=2)
    assert [p.reserve(T0) for _ in range(2)] == [0.0, 0.0]
    # Epoch-sized floats carry ~1e-7 s of rounding, hence the tolerance.
    assert p.reserve(T0 + 0.1) == pytest.approx(0.0, abs=1e-6)
    assert p.reserve(T0 + 0.1) == pytest.approx(0.1)
    # A long idle period refills only up to the burst.
    assert [p.reserve(T0 + 100) for _ in range(3)] == pytest.approx([0.0, 0.0, 0.1])


def test_pacer_clock_step_back_does_not_mint_tokens() -> None:
    p = TicklePacer(rate=10, burst=1)
    assert p.reserve(T0) == 0.0
    assert p.reserve(T0 - 50) == pytest.approx(0.1)
    assert p.reserve(T0) == pytest.approx(0.2)


def test_pacer_default_burst_is_tenth_of_rate_at_least_one() -> None:
    assert TicklePacer(rate=1000).burst == 100
    assert TicklePacer(rate=5).burst == 1


@pytest.mark.parametrize("rate", [0, -1, float("nan"), float("inf")])
def test_pacer_rejects_non_positive_or_non_finite_rate(rate: float) -> None:
    with pytest.raises(ValueError):
        TicklePacer(rate)


def test_pacer_rejects_zero_burst() -> None:
    with pytest.raises(ValueError):
        TicklePacer(10, burst=0)


# --- per-computer limiter --------------------------------------------------------------------


def test_limiter_allows_each_computer_once_per_interval() -> None:
    lim = PerComputerLimiter(min_interval=1.0)
    assert lim.allow(1, T0)
    assert lim.allow(2, T0)
    assert not lim.allow(1, T0 + 0.5)
    assert not lim.allow(1, T0 + 0.999)
    assert lim.allow(1, T0 + 1.0)
    assert not lim.allow(1, T0 + 1.5)
    assert lim.allow(2, T0 + 1.5)


def test_limiter_refusal_does_not_extend_the_interval() -> None:
    lim = PerComputerLimiter(min_interval=1.0)
    assert lim.allow(1, T0)
    assert not lim.allow(1, T0 + 0.9)
    assert lim.allow(1, T0 + 1.0)


def test_limiter_memory_stays_bounded_under_100k_distinct_ids() -> None:
    lim = PerComputerLimiter(min_interval=1.0)
    peak = 0
    for i in range(100_000):
        assert lim.allow(i, T0 + i * 0.001)
        peak = max(peak, len(lim))
    # Only the ids tickled within the last second are kept.
    assert peak <= 1001


def test_limiter_at_capacity_refuses_new_ids_but_keeps_limiting_known_ones() -> None:
    lim = PerComputerLimiter(min_interval=1.0, max_entries=100)
    allowed = sum(lim.allow(i, T0) for i in range(100_000))
    assert allowed == 100
    assert len(lim) == 100
    assert not lim.allow(0, T0 + 0.5)
    # Once entries expire, room frees up again.
    assert lim.allow(100_000, T0 + 1.0)
