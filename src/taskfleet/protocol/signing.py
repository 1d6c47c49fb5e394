"""Ed25519 signatures on operation payloads (SPEC 3.3).

Contract: the server signs the canonical text of every operation it hands out
with its private key; the agent verifies it with the server public key it got
at enrollment before it stores or runs anything. The signed text names the
computer and the operation id, so a relay can delay work but cannot invent,
alter or redirect it. PyNaCl (libsodium) keeps the agent's footprint small.
"""

from __future__ import annotations

import nacl.exceptions
import nacl.signing


class SignatureError(ValueError):
    pass


def new_signing_seed() -> bytes:
    return bytes(nacl.signing.SigningKey.generate())


class Signer:
    def __init__(self, seed: bytes) -> None:
        self._key = nacl.signing.SigningKey(seed)
        self.public_key_hex: str = bytes(self._key.verify_key).hex()

    def sign(self, text: str) -> str:
        return self._key.sign(text.encode()).signature.hex()


class Verifier:
    def __init__(self, public_key_hex: str) -> None:
        try:
            self._key = nacl.signing.VerifyKey(bytes.fromhex(public_key_hex))
        except (ValueError, TypeError, nacl.exceptions.CryptoError) as exc:
            raise SignatureError(f"invalid server public key: {exc}") from None

    def verify(self, text: str, signature_hex: str) -> None:
        try:
            self._key.verify(text.encode(), bytes.fromhex(signature_hex))
        except (ValueError, TypeError, nacl.exceptions.BadSignatureError):
            raise SignatureError("payload signature does not verify") from None
