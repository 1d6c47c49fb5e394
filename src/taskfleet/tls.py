"""TLS for the server's listener and the trust of its clients (agents, relays).

Contract:

* ``check_server_files(cert, key)`` loads the pair the way the server will and
  returns None, or a sentence saying why it cannot be used (missing, unreadable,
  not PEM, key not matching the certificate, key readable by every user). The
  server refuses to start with that sentence: never half up on a broken pair.
* ``listener_problem(cert, key, host)``: both checks above for a server's or a
  relay's ``--tls-cert``/``--tls-key`` (given together, usable), or the warning.
* ``plain_http_warning(host)``: the loud warning for a server that listens on
  a non-loopback address without TLS (None on loopback: a TLS proxy in front, or
  a single machine).
* ``pin_ca(state_dir, ca_file)``: an agent's or relay's pinned CA. Given at
  enrollment (or any later start), the file is checked and copied into the state
  folder (``server-ca.pem``), so later starts verify the server with it without
  the option; without one ever given, the system's CAs are used.
"""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path

PINNED_CA = "server-ca.pem"


def listener_problem(
    cert: Path | None, key: Path | None, host: str
) -> tuple[str | None, str | None]:
    """A listener's (server's or relay's) TLS options, checked: (why it must not start,
    the warning to log). Both None: start, on HTTPS or on plain loopback HTTP."""
    if (cert is None) != (key is None):
        return "give --tls-cert and --tls-key together (or neither: plain HTTP)", None
    if cert is not None and key is not None:
        problem = check_server_files(cert, key)
        return (None if problem is None else f"refusing to start: {problem}"), None
    return None, plain_http_warning(host)


def check_server_files(cert: Path, key: Path) -> str | None:
    try:
        mode = os.stat(key).st_mode
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        return f"no such file: {exc.filename}"
    except (ssl.SSLError, OSError, ValueError) as exc:
        return f"cannot use --tls-cert {cert} with --tls-key {key}: {exc}"
    # ssh's rule, relaxed for Debian's ssl-cert group: never readable by every user.
    if mode & stat.S_IROTH:
        return (
            f"--tls-key {key} is readable by every user (mode {stat.S_IMODE(mode):04o}): "
            f"chmod 600 (or 640 with a group of its own) and start again"
        )
    return None


def plain_http_warning(host: str) -> str | None:
    import ipaddress  # here: agents and relays import this module too (memory)

    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (
        f"LISTENING ON {host} WITHOUT TLS: agent secrets, enrollment and admin tokens, "
        "scripts and their output cross the network in clear text. Start with "
        "--tls-cert and --tls-key, or listen on 127.0.0.1 behind a TLS proxy."
    )


def pin_ca(state_dir: Path, ca_file: Path | None) -> Path | None:
    """The CA file to verify the server with: ``ca_file`` (checked, then kept in the
    state folder), else the one kept at an earlier start, else None (system CAs).
    Raises ValueError with a clear sentence when ``ca_file`` cannot be used."""
    kept = state_dir / PINNED_CA
    if ca_file is None:
        return kept if kept.exists() else None
    try:
        pem = ca_file.read_bytes()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no system CAs: count only the file's
        if pem.strip():
            ctx.load_verify_locations(cadata=pem.decode("ascii"))
        if not ctx.get_ca_certs():
            raise ValueError("it holds no CA certificate (PEM)")
    except (OSError, UnicodeDecodeError, ssl.SSLError, ValueError) as exc:
        raise ValueError(f"cannot use --ca-file {ca_file}: {exc}") from None
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = kept.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, kept)
    return kept
