"""The pure-Python Ed25519 verifier against RFC 8032 and libsodium (PyNaCl).

libsodium signs here and builds the odd points (mixed-order keys, small-order
points), so the verifier is checked against an independent implementation,
including where the Ed25519 variants disagree (cofactorless vs cofactored).
"""

from __future__ import annotations

import hashlib

import nacl.bindings
import nacl.exceptions
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskfleet.protocol.ed25519 import L, P, PublicKey, SignatureError, decode_point, encode_point
from taskfleet.protocol.signing import Signer, Verifier

# RFC 8032 section 7.1, TEST 1, 2 and 3: (secret key, public key, message, signature).
RFC8032_VECTORS = [
    (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
        "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    (
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
        "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
]

# A point of order 8; its multiples are the 8 points of small order.
ORDER_8 = bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")
IDENTITY = (1).to_bytes(32, "little")

seeds = st.binary(min_size=32, max_size=32)
messages = st.binary(max_size=2000)


def small_order_points() -> list[bytes]:
    points = [ORDER_8]
    for _ in range(7):
        points.append(nacl.bindings.crypto_core_ed25519_add(points[-1], ORDER_8))
    return points


def secret_scalar(seed: bytes) -> int:
    """The signing scalar a (A = [a]B) that libsodium derives from a seed (RFC 8032 5.1.5)."""
    h = bytearray(hashlib.sha512(seed).digest()[:32])
    h[0] &= 248
    h[31] &= 127
    h[31] |= 64
    return int.from_bytes(h, "little")


def challenge(r: bytes, key: bytes, message: bytes) -> int:
    return int.from_bytes(hashlib.sha512(r + key + message).digest(), "little") % L


def libsodium_accepts(key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(key).verify(message, signature)
    except nacl.exceptions.BadSignatureError:
        return False
    return True


def our_verifier_accepts(key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        PublicKey(key).verify(message, signature)
    except SignatureError:
        return False
    return True


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@pytest.mark.parametrize(("secret", "public", "message", "signature"), RFC8032_VECTORS)
def test_rfc8032_vectors_signed_by_libsodium_verify(
    secret: str, public: str, message: str, signature: str
) -> None:
    signing_key = nacl.signing.SigningKey(bytes.fromhex(secret))
    signed = signing_key.sign(bytes.fromhex(message))
    assert bytes(signing_key.verify_key).hex() == public
    assert signed.signature.hex() == signature
    PublicKey(bytes.fromhex(public)).verify(bytes.fromhex(message), signed.signature)
    with pytest.raises(SignatureError):
        PublicKey(bytes.fromhex(public)).verify(b"x" + bytes.fromhex(message), signed.signature)


@settings(max_examples=60, deadline=None)
@given(
    seed=seeds,
    message=messages,
    part=st.sampled_from(["message", "signature", "key"]),
    data=st.data(),
)
def test_libsodium_signatures_verify_and_any_flipped_bit_is_refused(
    seed: bytes, message: bytes, part: str, data: st.DataObject
) -> None:
    signing_key = nacl.signing.SigningKey(seed)
    key = bytes(signing_key.verify_key)
    signature = signing_key.sign(message).signature
    PublicKey(key).verify(message, signature)
    if part == "message" and not message:
        part = "signature"
    original = {"message": message, "signature": signature, "key": key}[part]
    bit = data.draw(st.integers(0, len(original) * 8 - 1), label="bit")
    changed = {"message": message, "signature": signature, "key": key, part: flip(original, bit)}
    with pytest.raises(SignatureError):
        PublicKey(changed["key"]).verify(changed["message"], changed["signature"])


def test_s_plus_l_is_refused_though_the_equation_holds() -> None:
    signing_key = nacl.signing.SigningKey(b"s" * 32)
    key = bytes(signing_key.verify_key)
    signature = signing_key.sign(b"run this").signature
    s = int.from_bytes(signature[32:], "little")
    malleated = signature[:32] + (s + L).to_bytes(32, "little")
    with pytest.raises(SignatureError, match="S >= L"):
        PublicKey(key).verify(b"run this", malleated)
    assert not libsodium_accepts(key, b"run this", malleated)


def libsodium_on_curve(encoded: bytes) -> bool:
    try:
        nacl.bindings.crypto_core_ed25519_add(encoded, IDENTITY)
    except nacl.exceptions.RuntimeError:
        return False
    return True


def test_non_canonical_encodings_of_keys_and_r_are_refused() -> None:
    # y + p still fits in 255 bits only for y < 19; try every such y, both signs.
    refused_fine_keys = 0
    for y in range(19):
        for sign in (0, 1 << 255):
            with pytest.raises(SignatureError):
                PublicKey(((y + P) | sign).to_bytes(32, "little"))
            canonical = (y | sign).to_bytes(32, "little")
            if y > 1 and libsodium_on_curve(canonical):  # y = 0 and 1: small order
                PublicKey(canonical)  # the same point, canonically encoded, is a fine key
                refused_fine_keys += 1
    assert refused_fine_keys > 0
    signing_key = nacl.signing.SigningKey(b"r" * 32)
    signature = signing_key.sign(b"m").signature
    bad_r = ((P + 3) | 1 << 255).to_bytes(32, "little")
    with pytest.raises(SignatureError, match="non-canonical"):
        PublicKey(bytes(signing_key.verify_key)).verify(b"m", bad_r + signature[32:])


@settings(max_examples=300, deadline=None)
@given(y=st.integers(0, P - 1), sign=st.sampled_from([0, 1 << 255]))
def test_points_decode_as_libsodium_decodes_them_and_round_trip(y: int, sign: int) -> None:
    encoded = (y | sign).to_bytes(32, "little")
    try:
        point = decode_point(encoded)
    except SignatureError as exc:
        # RFC 8032 also refuses x = 0 with the sign bit set (y = 1 or p - 1).
        assert not libsodium_on_curve(encoded) or "x = 0" in str(exc)
    else:
        assert libsodium_on_curve(encoded)
        assert encode_point(point) == encoded


def test_small_order_keys_are_refused_as_libsodium_does() -> None:
    points = small_order_points()
    assert len(set(points)) == 8 and points[-1] == IDENTITY
    for point in points:
        with pytest.raises(SignatureError, match="small order"):
            PublicKey(point)
        # A = identity: R = [S]B satisfies [S]B == R + [k]A for every message.
        r = nacl.bindings.crypto_scalarmult_ed25519_base_noclamp((5).to_bytes(32, "little"))
        forged = r + (5).to_bytes(32, "little")
        assert not libsodium_accepts(point, b"any message", forged)


def test_small_order_r_is_refused_though_the_equation_holds() -> None:
    seed = b"a" * 32
    key = bytes(nacl.signing.SigningKey(seed).verify_key)
    a = secret_scalar(seed)
    # R = identity and S = k*a: [S]B - [k]A is the identity, whose encoding is R.
    k = challenge(IDENTITY, key, b"m")
    forged = IDENTITY + (k * a % L).to_bytes(32, "little")
    with pytest.raises(SignatureError, match="small order"):
        PublicKey(key).verify(b"m", forged)
    assert not libsodium_accepts(key, b"m", forged)


def test_mixed_order_keys_get_libsodiums_cofactorless_verdict() -> None:
    # A' = A + T (T of order 8), signed honestly with A's scalar a:
    # [S]B - [k]A' = R - [k]T, which is R only when 8 divides k. The cofactored
    # equation would accept all of these; libsodium and we accept 1 in 8.
    seed = b"b" * 32
    a = secret_scalar(seed)
    key = nacl.bindings.crypto_core_ed25519_add(
        bytes(nacl.signing.SigningKey(seed).verify_key), ORDER_8
    )
    verdicts = []
    for i in range(64):
        message = i.to_bytes(2, "big")
        r = (i + 1) * 7919
        r_bytes = nacl.bindings.crypto_scalarmult_ed25519_base_noclamp(r.to_bytes(32, "little"))
        k = challenge(r_bytes, key, message)
        signature = r_bytes + ((r + k * a) % L).to_bytes(32, "little")
        ours = our_verifier_accepts(key, message, signature)
        assert ours == libsodium_accepts(key, message, signature)
        assert ours == (k % 8 == 0)
        verdicts.append(ours)
    assert True in verdicts and False in verdicts


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_keys_of_the_wrong_length_are_refused(size: int) -> None:
    with pytest.raises(SignatureError, match="32 bytes"):
        PublicKey(bytes(size))


@pytest.mark.parametrize("size", [0, 32, 63, 65, 128])
def test_signatures_of_the_wrong_length_are_refused(size: int) -> None:
    key = PublicKey(bytes(nacl.signing.SigningKey(b"w" * 32).verify_key))
    with pytest.raises(SignatureError, match="64 bytes"):
        key.verify(b"m", bytes(size))


@settings(max_examples=300, deadline=None)
@given(
    key=st.binary(min_size=32, max_size=32) | st.binary(max_size=40),
    message=messages,
    signature=st.binary(min_size=64, max_size=64) | st.binary(max_size=80),
)
def test_any_bytes_raise_only_signature_error(key: bytes, message: bytes, signature: bytes) -> None:
    try:
        PublicKey(key).verify(message, signature)
    except SignatureError:
        return
    pytest.fail("random bytes verified")


@settings(max_examples=300, deadline=None)
@given(seed=seeds, r=st.binary(min_size=32, max_size=32), s=st.integers(0, L - 1))
def test_any_r_with_a_canonical_s_raises_only_signature_error(
    seed: bytes, r: bytes, s: int
) -> None:
    # Past the length and S checks: R decoding, the small-order check and the
    # arithmetic all see arbitrary input.
    key = PublicKey(bytes(nacl.signing.SigningKey(seed).verify_key))
    with pytest.raises(SignatureError):
        key.verify(b"m", r + s.to_bytes(32, "little"))


@settings(max_examples=200, deadline=None)
@given(key_hex=st.text(max_size=70), text=st.text(max_size=50), sig_hex=st.text(max_size=130))
def test_the_verifier_raises_only_signature_error_for_any_text(
    key_hex: str, text: str, sig_hex: str
) -> None:
    with pytest.raises(SignatureError):
        Verifier(key_hex).verify(text, sig_hex)


def test_the_servers_signer_and_the_agents_verifier_agree() -> None:
    signer = Signer(b"z" * 32)
    text = '{"computer":17,"op":121,"body":"caf\u00e9 \u2603"}'
    Verifier(signer.public_key_hex).verify(text, signer.sign(text))
    with pytest.raises(SignatureError):
        Verifier(signer.public_key_hex).verify(text + " ", signer.sign(text))
