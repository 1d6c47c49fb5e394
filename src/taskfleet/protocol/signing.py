"""Ed25519 signatures on operation payloads (SPEC 3.3).

Contract: the server signs the canonical text of every operation it hands out
with its private key; the agent verifies it with the server public key it got
at enrollment before it stores or runs anything. The signed text names the
computer and the operation id, so a relay can delay work but cannot invent,
alter or redirect it. Signing (server only, a secret) uses PyNaCl (libsodium);
verifying (the agent) uses the pure-Python `protocol/ed25519.py`, so the agent
needs no compiled dependency: importing `Verifier` must not import `nacl`,
which only `Signer` and `new_signing_seed` load, when first called.
"""

from __future__ import annotations

from taskfleet.protocol.ed25519 import PublicKey
from taskfleet.protocol.ed25519 import SignatureError as SignatureError


def new_signing_seed() -> bytes:
    import nacl.signing  # server only: see the module docstring

    return bytes(nacl.signing.SigningKey.generate())


class Signer:
    def __init__(self, seed: bytes) -> None:
        import nacl.signing  # server only: see the module docstring

        self._key = nacl.signing.SigningKey(seed)
        self.public_key_hex: str = bytes(self._key.verify_key).hex()

    def sign(self, text: str) -> str:
        return self._key.sign(text.encode()).signature.hex()


class Verifier:
    def __init__(self, public_key_hex: str) -> None:
        try:
            self._key = PublicKey(bytes.fromhex(public_key_hex))
        except (ValueError, TypeError) as exc:
            raise SignatureError(f"invalid server public key: {exc}") from None

    def verify(self, text: str, signature_hex: str) -> None:
        try:
            self._key.verify(text.encode(), bytes.fromhex(signature_hex))
        except (ValueError, TypeError):
            raise SignatureError("payload signature does not verify") from None
