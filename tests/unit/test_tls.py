"""taskfleet/tls.py: the plain-HTTP warning's addresses and the pinned CA's keeping."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import trustme

from taskfleet.tls import PINNED_CA, pin_ca, plain_http_warning


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"])
def test_loopback_is_quiet(host: str) -> None:
    assert plain_http_warning(host) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "192.168.0.5", "fleet.example"])
def test_anything_else_is_warned_about(host: str) -> None:
    warning = plain_http_warning(host)
    assert warning is not None and f"ON {host} WITHOUT TLS" in warning


def test_a_ca_given_once_is_kept_private_and_used_later(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    state = tmp_path / "state"
    assert pin_ca(state, None) is None  # never given: the system's CAs
    kept = pin_ca(state, ca)
    assert kept == state / PINNED_CA and kept.read_bytes() == ca.read_bytes()
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert pin_ca(state, None) == kept


@pytest.mark.parametrize("content", [b"", b"not a certificate", b"\xff\xfe\x00", b"-----BEGIN"])
def test_a_ca_file_that_cannot_be_used_is_refused_and_changes_nothing(
    tmp_path: Path, content: bytes
) -> None:
    good = tmp_path / "good.pem"
    trustme.CA().cert_pem.write_to_path(str(good))
    state = tmp_path / "state"
    kept = pin_ca(state, good)
    bad = tmp_path / "bad.pem"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match="cannot use --ca-file"):
        pin_ca(state, bad)
    assert kept.read_bytes() == good.read_bytes()
    with pytest.raises(ValueError, match="cannot use --ca-file"):
        pin_ca(state, tmp_path / "missing.pem")
