"""Ed25519 signature verification (RFC 8032, section 5.1.7) in pure Python.

Contract: ``PublicKey(encoded)`` decodes a 32-byte public key once and
``PublicKey.verify(message, signature)`` returns None for a valid signature and
raises ``SignatureError`` for anything else; no other exception leaves this
module, whatever bytes it is given. Verification only: signing handles a secret
and stays with libsodium on the server (``protocol/signing.py``). Stdlib only
(hashlib.sha512, ints, ``pow``), so the agent needs no compiled dependency.

What is refused, strictly (RFC 8032 5.1.3 and 5.1.7, and libsodium's checks):

- a signature that is not 64 bytes, or a key that is not 32 bytes;
- S >= L (the group order): S + L would verify too (malleability);
- a key or an R whose y is not below p (a non-canonical encoding), that is not
  on the curve, or that encodes x = 0 with the sign bit set;
- a key or an R of small order (one of the 8 points whose order divides the
  cofactor 8). Honest keys and R are multiples of the base point and never
  small; a small-order key lets one signature verify for many messages
  (A = identity verifies [S]B against R = [S]B for every message). libsodium's
  verify refuses both since 1.0.16, so we keep its verdict.

The equation is the cofactorless one, [S]B == R + [k]A, checked as
libsodium does it: compute [S]B - [k]A and compare its encoding with the
signature's R bytes. RFC 8032 allows this or the cofactored [8][S]B ==
[8]R + [8][k]A; they agree on every honest signature and differ only for keys
or R with a small-order component, where this choice gives libsodium's answer
(the tests check it against libsodium on such mixed-order keys).

Speed: the double scalar multiplication is Straus's interleaving of two
width-w NAFs in extended coordinates (RFC 8032 5.1.4 formulas), with the
base point's odd multiples precomputed once per process and the key's once
per ``PublicKey``. Measured with ``benchmarks/bench_verify.py`` on the
project's 2-core machine (Python 3.11.7): 1.1 ms per verify of a 400-byte
or a 4.5 KB operation (median; libsodium: 0.04 ms), 2.9 ms at the 1 Mi-character
script limit (SHA-512 dominates; libsodium 2.5 ms); decoding a key 0.13 ms; the
first verify also builds the base point's table (+0.3 ms, once).

Not constant time, on purpose: verification handles only public data (the
server's public key, the operation text, the signature).
"""

from __future__ import annotations

import hashlib

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, -1, P) % P
D2 = 2 * D % P
SQRT_M1 = pow(2, (P - 1) // 4, P)

KEY_BYTES = 32
SIGNATURE_BYTES = 64

# Extended coordinates (X, Y, Z, T): x = X/Z, y = Y/Z, x*y = T/Z.
Point = tuple[int, int, int, int]
# A point ready to be added: (Y+X, Y-X, 2d*T, 2*Z); saves work per addition.
Cached = tuple[int, int, int, int]

IDENTITY: Point = (0, 1, 1, 0)
# Window widths of the NAFs: the base point's table is built once per process,
# so it can be wider (32 points) than the key's (8 points, once per key).
BASE_WINDOW = 7
KEY_WINDOW = 5


class SignatureError(ValueError):
    """A key or signature that is malformed or does not verify."""


def _recover_x(y: int, sign: int) -> int:
    """x for y on the curve -x^2 + y^2 = 1 + d x^2 y^2 (RFC 8032 5.1.3 step 2-4)."""
    u = (y * y - 1) % P
    v = (D * y * y + 1) % P
    x = u * pow(v, 3, P) * pow(u * pow(v, 7, P), (P - 5) // 8, P) % P
    vx2 = v * x * x % P
    if vx2 == (-u) % P and vx2 != u:
        x = x * SQRT_M1 % P
    elif vx2 != u:
        raise SignatureError("not a point on the curve")
    if x == 0 and sign:
        raise SignatureError("non-canonical point encoding (x = 0 with the sign bit set)")
    if x & 1 != sign:
        x = P - x
    return x


def decode_point(encoded: bytes) -> Point:
    if len(encoded) != KEY_BYTES:
        raise SignatureError(f"a point is {KEY_BYTES} bytes, not {len(encoded)}")
    n = int.from_bytes(encoded, "little")
    y = n & ((1 << 255) - 1)
    if y >= P:
        raise SignatureError("non-canonical point encoding (y >= p)")
    x = _recover_x(y, n >> 255)
    return (x, y, 1, x * y % P)


def encode_point(point: Point) -> bytes:
    x, y, z, _ = point
    z_inv = pow(z, P - 2, P)
    x = x * z_inv % P
    y = y * z_inv % P
    return (y | (x & 1) << 255).to_bytes(KEY_BYTES, "little")


def _double(point: Point) -> Point:
    x1, y1, z1, _ = point
    a = x1 * x1 % P
    b = y1 * y1 % P
    c = 2 * z1 * z1 % P
    h = a + b
    s = x1 + y1
    e = h - s * s % P
    g = a - b
    f = c + g
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _add(point: Point, other: Cached) -> Point:
    x1, y1, z1, t1 = point
    ypx2, ymx2, t2d2, z2_2 = other
    a = (y1 - x1) * ymx2 % P
    b = (y1 + x1) * ypx2 % P
    c = t1 * t2d2 % P
    d = z1 * z2_2 % P
    e = b - a
    f = d - c
    g = d + c
    h = b + a
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _cached(point: Point) -> Cached:
    x, y, z, t = point
    return ((y + x) % P, (y - x) % P, t * D2 % P, 2 * z % P)


def _odd_multiples(point: Point, window: int) -> dict[int, Cached]:
    """{d: [d]point} for the odd d with |d| < 2^(window-1), ready to add."""
    table: dict[int, Cached] = {}
    twice = _cached(_double(point))
    multiple = point
    for d in range(1, 1 << (window - 1), 2):
        ypx, ymx, t2d, z2 = _cached(multiple)
        table[d] = (ypx, ymx, t2d, z2)
        table[-d] = (ymx, ypx, (-t2d) % P, z2)  # -(x, y) = (-x, y)
        multiple = _add(multiple, twice)
    return table


def _naf(scalar: int, window: int) -> list[int]:
    """Width-w NAF digits of scalar, least significant first."""
    digits: list[int] = []
    full, half = 1 << window, 1 << (window - 1)
    while scalar:
        digit = 0
        if scalar & 1:
            digit = scalar & (full - 1)
            if digit >= half:
                digit -= full
            scalar -= digit
        digits.append(digit)
        scalar >>= 1
    return digits


def _is_small_order(point: Point) -> bool:
    """[8]point is the identity (x = 0, y = 1): its order divides the cofactor."""
    x, y, z, _ = _double(_double(_double(point)))
    return x % P == 0 and (y - z) % P == 0


def _base_point() -> Point:
    y = 4 * pow(5, -1, P) % P
    x = _recover_x(y, 0)
    return (x, y, 1, x * y % P)


B = _base_point()
# Built by the first verify, so that the server, which only signs, never pays for it.
_base_table: dict[int, Cached] = {}


def _double_scalar_mult(
    s: int,
    s_table: dict[int, Cached],
    s_window: int,
    k: int,
    k_table: dict[int, Cached],
    k_window: int,
) -> Point:
    """[s]X + [k]Y, X's and Y's odd multiples in the tables: one shared run of doublings."""
    s_digits = _naf(s, s_window)
    k_digits = _naf(k, k_window)
    n = max(len(s_digits), len(k_digits))
    s_digits += [0] * (n - len(s_digits))
    k_digits += [0] * (n - len(k_digits))
    q = IDENTITY
    for i in range(n - 1, -1, -1):
        q = _double(q)
        if s_digits[i]:
            q = _add(q, s_table[s_digits[i]])
        if k_digits[i]:
            q = _add(q, k_table[k_digits[i]])
    return q


class PublicKey:
    """An Ed25519 public key, decoded and checked once, that verifies signatures."""

    def __init__(self, encoded: bytes) -> None:
        encoded = bytes(encoded)
        point = decode_point(encoded)
        if _is_small_order(point):
            raise SignatureError("the public key has small order")
        self.encoded = encoded
        x, y, z, t = point
        # The check computes [S]B - [k]A, so keep the multiples of -A.
        self._minus_table = _odd_multiples(((-x) % P, y, z, (-t) % P), KEY_WINDOW)

    def verify(self, message: bytes, signature: bytes) -> None:
        if len(signature) != SIGNATURE_BYTES:
            raise SignatureError(f"a signature is {SIGNATURE_BYTES} bytes, not {len(signature)}")
        r_bytes = bytes(signature[:32])
        s = int.from_bytes(signature[32:], "little")
        if s >= L:
            raise SignatureError("non-canonical signature (S >= L)")
        if _is_small_order(decode_point(r_bytes)):
            raise SignatureError("the signature's R has small order")
        digest = hashlib.sha512(r_bytes + self.encoded + bytes(message)).digest()
        k = int.from_bytes(digest, "little") % L
        if not _base_table:
            _base_table.update(_odd_multiples(B, BASE_WINDOW))
        check = _double_scalar_mult(s, _base_table, BASE_WINDOW, k, self._minus_table, KEY_WINDOW)
        if encode_point(check) != r_bytes:
            raise SignatureError("the signature does not verify")
