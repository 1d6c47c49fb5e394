"""Agent-side signature check: ``.venv/bin/python benchmarks/bench_verify.py``.

Times the pure-Python Ed25519 verifier the agent uses (``protocol/ed25519.py``
through ``protocol/signing.Verifier``) on operation bodies signed by the
server's ``Signer`` (libsodium), beside libsodium's own verify for scale:
importing the verifier, building a ``Verifier`` (decoding the server key),
the first verify (it builds the base point's table), then the median and p99
of 300 verifies per body size (a small script operation, a 4 KiB one, and one
at the 1 Mi-character script limit). Target: a verify of an ordinary
operation costs at most 5 ms ("a few ms", issue 11). Pure in-process work.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

REPEATS = 300
TARGET_MS = 5.0


def _body(script_chars: int) -> str:
    script = "#!/bin/sh\n" + "echo hello\n" * (script_chars // 11)
    return (
        '{"computer":17,"generation":1,"op":121,"type":"execute-script","params":'
        f'{{"script":{json.dumps(script)},"argv":[],"output_cap":65536}},"timeout":60.0,'
        '"issued_at":1795310000.0}'
    )


def _times_ms(fn: Any, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    t0 = time.perf_counter()
    from taskfleet.protocol.signing import Signer, Verifier

    import_ms = (time.perf_counter() - t0) * 1000
    assert "nacl" not in sys.modules, "importing the verifier must not load nacl"
    import nacl.signing

    signer = Signer(b"bench-verify-seed-32-bytes-long!")
    build_ms = statistics.median(_times_ms(lambda: Verifier(signer.public_key_hex), REPEATS))
    verifier = Verifier(signer.public_key_hex)
    small = _body(200)
    t0 = time.perf_counter()
    verifier.verify(small, signer.sign(small))
    first_ms = (time.perf_counter() - t0) * 1000

    key = nacl.signing.VerifyKey(bytes.fromhex(signer.public_key_hex))
    print(
        f"import the verifier: {import_ms:.1f} ms; Verifier(key): {build_ms:.3f} ms; "
        f"first verify (builds the base table): {first_ms:.2f} ms"
    )
    print(f"{'operation body':<34} {'median ms':>10} {'p99 ms':>8} {'libsodium ms':>13}  target")
    worst = 0.0
    for label, chars in (("small", 200), ("4 KiB script", 4000), ("1 Mi script (limit)", 1 << 20)):
        text = _body(chars)
        sig = signer.sign(text)
        ours = sorted(_times_ms(lambda t=text, s=sig: verifier.verify(t, s), REPEATS))
        raw = bytes.fromhex(sig)
        theirs = _times_ms(lambda t=text, r=raw: key.verify(t.encode(), r), REPEATS)
        median = statistics.median(ours)
        p99 = ours[int(len(ours) * 0.99) - 1]
        verdict = "PASS" if median <= TARGET_MS else "MISS"
        if chars < 1 << 20:
            worst = max(worst, median)
        else:
            verdict = "(info)"
        print(
            f"{f'{label}, {len(text):,} B':<34} {median:>10.3f} {p99:>8.3f} "
            f"{statistics.median(theirs):>13.3f}  {verdict}"
        )
    overall = "PASS" if worst <= TARGET_MS else "MISS"
    print(f"target: an ordinary operation verifies in <= {TARGET_MS:.0f} ms (median): {overall}")


if __name__ == "__main__":
    main()
