"""The agent's download client (agent/content.py) over real HTTP against a small server
of this test's own that can lie: resume with Range (after a cut connection too), hash
and size mismatches (the .part removed, nothing at dest), refusals and an unreachable
source (the .part kept to resume), a full disk (a real ENOSPC on a 1 MiB tmpfs when the
test may mount one, and the OSError injected at the write call either way), and paths
that try to leave the staging folder (refused, nothing written outside)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from taskfleet.agent import content as agent_content
from taskfleet.agent.content import ContentError, download
from tests.conftest import free_port

DATA = bytes(range(256)) * 4000  # 1,024,000 bytes
SHA = hashlib.sha256(DATA).hexdigest()


class Source:
    """What the fake server does: serve ``data`` (with Range), or lie."""

    def __init__(self) -> None:
        self.data = DATA
        self.status = 200
        self.corrupt = False
        self.extra = 0  # bytes more than the content, declared and sent
        self.cut_after: int | None = None  # send this many body bytes, then close
        self.ignore_range = False
        self.ranges: list[str | None] = []
        self.auth: list[tuple[str | None, str | None]] = []


@pytest.fixture
def source() -> Iterator[tuple[str, Source]]:
    src = Source()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            src.ranges.append(self.headers.get("range"))
            src.auth.append(
                (self.headers.get("x-taskfleet-computer"), self.headers.get("authorization"))
            )
            if src.status != 200:
                body = b'{"error": "told to refuse"}'
                self.send_response(src.status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            data = src.data + b"\0" * src.extra
            if src.corrupt:
                data = data[:-1] + bytes([data[-1] ^ 1])
            start = 0
            rng = self.headers.get("range")
            if rng and not src.ignore_range:
                start = int(rng.removeprefix("bytes=").rstrip("-"))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if src.cut_after is not None:
                body = body[: src.cut_after]
            self.wfile.write(body)
            self.wfile.flush()
            self.close_connection = True

    class Server(ThreadingHTTPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            # A download that gives up (too big, corrupt, timed out) hangs up while
            # the body is still being written: expected here, not worth a traceback
            # on the terminal (it can come after the test, past pytest's capture).
            if not isinstance(sys.exc_info()[1], ConnectionError):
                super().handle_error(request, client_address)

    port = free_port()
    httpd = Server(("127.0.0.1", port), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{port}", src
    httpd.shutdown()
    httpd.server_close()


def _get(url: str, dest: Path, root: Path | None = None, size: int = len(DATA)) -> None:
    asyncio.run(download(url, 7, "tfc_secret", SHA, size, dest, timeout=10, root=root))


def _fails(url: str, dest: Path, root: Path | None = None, size: int = len(DATA)) -> ContentError:
    with pytest.raises(ContentError) as err:
        _get(url, dest, root, size)
    return err.value


def test_a_download_sends_the_exchange_credentials_and_resumes_a_part(
    source: tuple[str, Source], tmp_path: Path
) -> None:
    url, src = source
    dest = tmp_path / "pkg.bin"
    dest.with_name("pkg.bin.part").write_bytes(DATA[:400_000])
    _get(url, dest)
    assert dest.read_bytes() == DATA and not dest.with_name("pkg.bin.part").exists()
    assert src.ranges == ["bytes=400000-"]
    assert src.auth == [("7", "Bearer tfc_secret")]
    assert dest.stat().st_mode & 0o777 == 0o600


def test_a_cut_connection_keeps_the_part_and_the_next_attempt_resumes(
    source: tuple[str, Source], tmp_path: Path
) -> None:
    url, src = source
    dest = tmp_path / "pkg.bin"
    src.cut_after = 300_000
    err = _fails(url, dest)
    assert err.kind == "unreachable" and "unreachable" in err.reason
    assert dest.with_name("pkg.bin.part").stat().st_size == 300_000
    assert not dest.exists()
    src.cut_after = None
    _get(url, dest)
    assert dest.read_bytes() == DATA
    assert src.ranges == [None, "bytes=300000-"]


def test_a_source_that_ignores_the_range_starts_the_part_over(
    source: tuple[str, Source], tmp_path: Path
) -> None:
    url, src = source
    src.ignore_range = True
    dest = tmp_path / "pkg.bin"
    dest.with_name("pkg.bin.part").write_bytes(DATA[:1000])
    _get(url, dest)
    assert dest.read_bytes() == DATA


def test_a_hash_mismatch_removes_the_part(source: tuple[str, Source], tmp_path: Path) -> None:
    url, src = source
    src.corrupt = True
    dest = tmp_path / "pkg.bin"
    err = _fails(url, dest)
    assert err.kind == "hash" and err.reason.startswith("hash mismatch: expected sha256 " + SHA)
    assert not dest.exists() and not dest.with_name("pkg.bin.part").exists()
    # A part left by another content under the same name: resumed, then found wrong.
    src.corrupt = False
    dest.with_name("pkg.bin.part").write_bytes(b"not this content")
    err = _fails(url, dest)
    assert err.kind == "hash"
    assert not dest.exists() and not dest.with_name("pkg.bin.part").exists()


def test_a_size_mismatch_removes_the_part(source: tuple[str, Source], tmp_path: Path) -> None:
    url, src = source
    dest = tmp_path / "pkg.bin"
    src.extra = 10  # the source has more than the job says
    err = _fails(url, dest)
    assert err.kind == "size" and err.reason.startswith("size mismatch: expected 1024000 bytes")
    assert not dest.exists() and not dest.with_name("pkg.bin.part").exists()
    src.extra = 0
    err = _fails(url, dest, size=len(DATA) + 5)  # the job says more than there is
    assert err.kind == "size"
    assert not dest.exists() and not dest.with_name("pkg.bin.part").exists()


@pytest.mark.parametrize(
    ("status", "kind", "start"),
    [(404, "not-found", "not found"), (401, "refused", "refused"), (403, "refused", "refused")],
)
def test_refusals_say_what_they_were(
    source: tuple[str, Source], tmp_path: Path, status: int, kind: str, start: str
) -> None:
    url, src = source
    src.status = status
    err = _fails(url, tmp_path / "pkg.bin")
    assert err.kind == kind and err.reason.startswith(start) and "told to refuse" in err.reason


def test_an_unreachable_source(tmp_path: Path) -> None:
    err = _fails(f"http://127.0.0.1:{free_port()}", tmp_path / "pkg.bin")
    assert err.kind == "unreachable" and err.reason.startswith("unreachable")


@contextlib.contextmanager
def _tiny_tmpfs(where: Path) -> Iterator[bool]:
    """A 1 MiB tmpfs at ``where`` when this process may mount one (root); else False."""
    where.mkdir()
    if os.geteuid() != 0:
        yield False
        return
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(where)], capture_output=True
    )
    try:
        yield made.returncode == 0
    finally:
        if made.returncode == 0:
            subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("how", ["real", "injected"])
def test_a_full_disk_fails_the_download_and_removes_the_part(
    source: tuple[str, Source], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    url, _ = source
    staging = tmp_path / "staging"
    if how == "real":
        with _tiny_tmpfs(staging) as mounted:
            if not mounted:
                pytest.skip("cannot mount a tmpfs here (not root): the injected case covers it")
            err = _fails(url, staging / "pkg.bin", root=staging)
            left = sorted(p.name for p in staging.iterdir())
    else:

        def full(fd: int, data: bytes) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(agent_content, "_write_all", full)
        err = _fails(url, staging / "pkg.bin", root=staging)
        left = sorted(p.name for p in staging.iterdir())
    assert err.kind == "disk" and err.reason.startswith("disk full"), err.reason
    assert left == []


def test_paths_that_leave_the_staging_folder_are_refused(
    source: tuple[str, Source], tmp_path: Path
) -> None:
    url, src = source
    staging = tmp_path / "staging"
    outside = tmp_path / "outside"
    staging.mkdir()
    outside.mkdir()
    # A folder inside the staging folder that is a symlink out of it.
    (staging / "sub").symlink_to(outside)
    err = _fails(url, staging / "sub" / "pkg.bin", root=staging)
    assert err.kind == "unsafe" and "outside" in err.reason
    # A name that climbs out.
    err = _fails(url, staging / ".." / "outside" / "pkg.bin", root=staging)
    assert err.kind == "unsafe"
    # A .part planted as a symlink to a file elsewhere: never followed, never written.
    victim = outside / "victim"
    victim.write_bytes(b"keep me")
    (staging / "pkg.bin.part").symlink_to(victim)
    err = _fails(url, staging / "pkg.bin", root=staging)
    assert err.kind == "unsafe" and "symlink" in err.reason
    assert victim.read_bytes() == b"keep me"
    assert list(outside.iterdir()) == [victim]
    assert src.ranges == []  # nothing was even asked for
