"""TLS (issue 15): the server serves HTTPS with --tls-cert/--tls-key; agents and relays
verify its certificate against a CA pinned at enrollment (--ca-file, kept in their state
folder) or the system's CAs, and talk to nothing else; the server refuses a pair it
cannot use, and warns loudly when it listens beyond loopback in plain HTTP.

Real processes on loopback; the certificates come from a throw-away CA (trustme).
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trustme

from tests.conftest import (
    Agent,
    Server,
    _cli,
    activities_of,
    enroll_token,
    free_port,
    request_done,
    run_request,
    wait_until,
)
from tests.relay_proc import Relay, start_relay

__all__ = ["start_relay"]  # the fixture, used by name


@dataclass
class Pki:
    ca: str  # the CA that signed the server's certificate (PEM)
    other_ca: str  # a CA that signed nothing here
    cert: str
    key: str


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca, other = trustme.CA(), trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    folder = tmp_path / "pki"
    folder.mkdir()
    paths = Pki(*(str(folder / n) for n in ("ca.pem", "other-ca.pem", "server.pem", "server.key")))
    ca.cert_pem.write_to_path(paths.ca)
    other.cert_pem.write_to_path(paths.other_ca)
    leaf.private_key_and_cert_chain_pem.write_to_path(paths.cert)
    leaf.private_key_pem.write_to_path(paths.key)
    os.chmod(paths.key, 0o600)
    return paths


@pytest.fixture
def https_server(start_server: Callable[..., Server], pki: Pki) -> Server:
    return start_server("--tls-cert", pki.cert, "--tls-key", pki.key, ca=pki.ca)


def _ran(server: Server, argv: list[str]) -> list[dict]:
    req = run_request(server, "all", {"argv": argv})
    request_done(server, req["id"])
    return activities_of(server, req["id"])


def test_an_agent_with_the_pinned_ca_runs_scripts_over_https_and_keeps_the_ca(
    https_server: Server, pki: Pki, start_agent: Callable[..., Agent]
) -> None:
    assert https_server.url.startswith("https://")
    agent = start_agent(https_server, enroll_token(https_server), "--ca-file", pki.ca)
    [a] = _ran(https_server, ["echo", "over tls"])
    assert a["state"] == "succeeded" and a["stdout"] == "over tls\n"
    kept = agent.state_dir / "server-ca.pem"
    assert kept.read_bytes() == Path(pki.ca).read_bytes()
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    # A later start needs no --ca-file: the CA given at enrollment is kept.
    agent.proc.stop()
    start_agent(https_server, None, name="same-computer", state_dir=agent.state_dir)
    [b] = _ran(https_server, ["echo", "again"])
    assert b["state"] == "succeeded" and b["computer_id"] == a["computer_id"]


def test_an_agent_that_does_not_trust_the_certificate_never_talks_to_the_server(
    https_server: Server, pki: Pki, start_agent: Callable[..., Agent]
) -> None:
    token = enroll_token(https_server)
    wrong = start_agent(https_server, token, "--ca-file", pki.other_ca, wait_enrolled=False)
    system = start_agent(https_server, token, wait_enrolled=False)  # the system's CAs
    for agent in (wrong, system):
        wait_until(
            lambda agent=agent: "CERTIFICATE_VERIFY_FAILED" in agent.proc.text(),
            30,
            "the certificate refused",
        )
        assert agent.proc.alive()  # it keeps trying (an operator may fix the CA)
    with https_server.api() as api:
        assert api.get("/computers").json() == []  # nothing enrolled, no token used


def test_a_relay_with_the_pinned_ca_serves_its_agents_from_an_https_server(
    https_server: Server,
    pki: Pki,
    start_relay: Callable[..., Relay],
    start_agent: Callable[..., Agent],
) -> None:
    relay = start_relay(https_server, "--ca-file", pki.ca, "--poll-interval", "1")
    start_agent(relay.url, enroll_token(https_server))
    [a] = _ran(https_server, ["echo", "through the relay"])
    assert a["state"] == "succeeded" and a["stdout"] == "through the relay\n"


def test_a_relay_serves_its_agents_https_and_an_agent_that_does_not_trust_it_gets_nothing(
    https_server: Server,
    pki: Pki,
    start_relay: Callable[..., Relay],
    start_agent: Callable[..., Agent],
) -> None:
    # The relay's own pair, from the CA the agents pin (an organisation's CA).
    relay = start_relay(
        https_server,
        "--ca-file",
        pki.ca,
        "--poll-interval",
        "1",
        "--tls-cert",
        pki.cert,
        "--tls-key",
        pki.key,
    )
    assert relay.url.startswith("https://")
    token = enroll_token(https_server)
    wrong = start_agent(relay.url, token, "--ca-file", pki.other_ca, wait_enrolled=False)
    start_agent(relay.url, token, "--ca-file", pki.ca)
    wait_until(
        lambda: "CERTIFICATE_VERIFY_FAILED" in wrong.proc.text(), 30, "the relay's cert refused"
    )
    [a] = _ran(https_server, ["echo", "tls both ways"])  # only the trusting agent enrolled
    assert a["state"] == "succeeded" and a["stdout"] == "tls both ways\n"
    # Plain HTTP to an HTTPS relay gets nothing either.
    with pytest.raises(httpx.HTTPError):
        httpx.get(
            relay.url.replace("https://", "http://") + "/metrics", timeout=5
        ).raise_for_status()


def test_a_relay_refuses_a_tls_pair_it_cannot_use(tmp_path: Path, pki: Pki) -> None:
    out = subprocess.run(
        _cli(
            "relay",
            "--server",
            "http://127.0.0.1:9",
            "--state-dir",
            str(tmp_path / "r"),
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--tls-cert",
            pki.cert,
            "--tls-key",
            pki.ca,  # not the certificate's key
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "refusing to start: cannot use --tls-cert" in out.stderr
    assert not (tmp_path / "r").exists()  # nothing enrolled, nothing made


def _server_refuses(tmp_path: Path, *args: str) -> str:
    out = subprocess.run(
        _cli("server", "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "d"))
        + list(args),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0, out.stdout + out.stderr
    return out.stderr


def test_the_server_refuses_a_tls_pair_it_cannot_use(tmp_path: Path, pki: Pki) -> None:
    assert "together" in _server_refuses(tmp_path, "--tls-cert", pki.cert)
    other_key = trustme.CA().issue_cert("127.0.0.1").private_key_pem
    mismatched = tmp_path / "other.key"
    other_key.write_to_path(str(mismatched))
    os.chmod(mismatched, 0o600)
    err = _server_refuses(tmp_path, "--tls-cert", pki.cert, "--tls-key", str(mismatched))
    assert "cannot use --tls-cert" in err
    err = _server_refuses(tmp_path, "--tls-cert", pki.cert, "--tls-key", str(tmp_path / "none"))
    assert "no such file" in err
    os.chmod(pki.key, 0o644)
    assert "readable by every user" in _server_refuses(
        tmp_path, "--tls-cert", pki.cert, "--tls-key", pki.key
    )


def test_plain_http_beyond_loopback_is_warned_about_loudly(
    start_server: Callable[..., Server],
) -> None:
    port = free_port()
    loud = start_server("--listen", f"0.0.0.0:{port}", port=port)  # the last --listen wins
    wait_until(lambda: "WITHOUT TLS" in loud.proc.text(), 10, "the warning")
    # (loopback, or TLS, is quiet: tests/unit/test_tls.py)


def test_an_agent_refuses_a_ca_file_it_cannot_use(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    state = str(tmp_path / "s")
    out = subprocess.run(
        _cli(
            "agent", "--server", "https://127.0.0.1:1", "--state-dir", state, "--ca-file", str(bad)
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and f"cannot use --ca-file {bad}" in out.stderr
    assert not (tmp_path / "s" / "server-ca.pem").exists()
