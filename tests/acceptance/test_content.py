"""Content by hash as an administrator and an agent meet it: a real server process,
``taskfleet content add | list | show | remove`` as typed, and the agent's download
client (``agent/content.py``) over real HTTP: resume with Range, streaming without the
server's memory growing with the file, and a real relay that fetches content once
however many of its agents ask for it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

import httpx

from taskfleet.agent.content import download
from tests.acceptance.test_cli import tf
from tests.conftest import Server, enroll_token
from tests.raw_agent import enrolled
from tests.relay_proc import Relay, enroll_through, start_relay

__all__ = ["start_relay"]  # the fixture, used by name


def _file(path: Path, size: int, seed: bytes = b"x") -> tuple[Path, str]:
    """A file of ``size`` bytes that is not all alike (a block counter and a seed)."""
    h = hashlib.sha256()
    with path.open("wb") as f:
        n = 0
        while n < size:
            block = (seed + n.to_bytes(8, "big")) * 4096
            block = block[: min(len(block), size - n)]
            f.write(block)
            h.update(block)
            n += len(block)
    return path, h.hexdigest()


def test_content_add_list_show_remove_from_the_cli(server: Server, tmp_path: Path) -> None:
    path, sha = _file(tmp_path / "kb123.msu", 300_000)
    out = tf(server, "content", "add", str(path)).stdout
    assert out.split() == [sha, "300000", "bytes", "kb123.msu"]
    again = json.loads(tf(server, "content", "add", str(path), "--name", "x", "--json").stdout)
    assert again["sha256"] == sha and again["name"] == "kb123.msu"  # one row, as it was
    stored = server.data_dir / "content" / sha[:2] / sha
    assert stored.read_bytes() == path.read_bytes()

    listed = tf(server, "content", "list").stdout
    assert sha in listed and "kb123.msu" in listed
    [row] = json.loads(tf(server, "content", "list", "--json").stdout)
    assert row["size"] == 300_000
    shown = tf(server, "content", "show", sha.upper()).stdout
    assert "kb123.msu" in shown and "unfinished jobs" in shown

    bad = tf(server, "content", "show", "../tokens", check=False)
    assert bad.returncode == 2 and "not a content hash" in bad.stderr
    missing = tf(server, "content", "show", "0" * 64, check=False)
    assert missing.returncode == 2 and "no content" in missing.stderr
    gone = tf(server, "content", "add", str(tmp_path / "nope"), check=False)
    assert gone.returncode == 2 and "cannot read" in gone.stderr

    assert f"content {sha} removed" in tf(server, "content", "remove", sha).stdout
    assert not stored.exists()
    assert json.loads(tf(server, "content", "list", "--json").stdout) == []
    again_rm = tf(server, "content", "remove", sha, check=False)
    assert again_rm.returncode == 2 and "no content" in again_rm.stderr


def _served(server: Server, to: str) -> float:
    return server.metric("taskfleet_content_served_bytes_total", f'to="{to}"')


def test_agent_download_resumes_with_range_from_a_real_server(
    server: Server, tmp_path: Path
) -> None:
    path, sha = _file(tmp_path / "pkg.bin", 3_000_000)
    tf(server, "content", "add", str(path))
    cid, secret = enrolled(server, enroll_token(server), "pc")
    staging = tmp_path / "staging"
    staging.mkdir()
    dest = staging / "pkg.bin"
    # What an earlier attempt left: the first 1,000,000 bytes.
    dest.with_name("pkg.bin.part").write_bytes(path.read_bytes()[:1_000_000])
    before = _served(server, "agent")
    asyncio.run(download(server.url, cid, secret, sha, 3_000_000, dest, timeout=30, root=staging))
    assert dest.read_bytes() == path.read_bytes()
    assert not dest.with_name("pkg.bin.part").exists()
    assert _served(server, "agent") - before == 2_000_000  # only the rest was sent


def _vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_content_is_streamed_not_held_in_the_servers_memory(server: Server, tmp_path: Path) -> None:
    size = 64 * 1024 * 1024
    path, sha = _file(tmp_path / "image.bin", size)
    cid, secret = enrolled(server, enroll_token(server), "pc")
    # Warm the paths once with a small file: imports and buffers are not the file's.
    small, small_sha = _file(tmp_path / "small.bin", 2_000_000, b"s")
    tf(server, "content", "add", str(small))
    asyncio.run(download(server.url, cid, secret, small_sha, 2_000_000, tmp_path / "s", timeout=30))
    pid = server.proc.popen.pid  # the server runs in the foreground of its session
    before = _vm_hwm_kb(pid)
    tf(server, "content", "add", str(path))
    dest = tmp_path / "got.bin"
    asyncio.run(download(server.url, cid, secret, sha, size, dest, timeout=60))
    assert os.path.getsize(dest) == size
    grown_mb = (_vm_hwm_kb(pid) - before) / 1024
    # Held whole, the peak would grow by 64 MB at least (twice, counting the hash pass);
    # streamed, by a few MiB of buffers.
    assert grown_mb < 24, f"server peak RSS grew by {grown_mb:.1f} MB for a 64 MB file"


def test_a_relay_fetches_content_once_for_all_its_agents(
    server: Server, start_relay, tmp_path: Path
) -> None:
    relay: Relay = start_relay(server)
    token = enroll_token(server)
    agents = [enroll_through(relay, token, f"pc{i}") for i in range(3)]
    size = 5_000_000
    path, sha = _file(tmp_path / "patch.msu", size)
    tf(server, "content", "add", str(path))
    before = _served(server, "relay")

    async def all_three() -> None:
        await asyncio.gather(
            *(
                download(
                    relay.url,
                    a["computer_id"],
                    a["secret"],
                    sha,
                    size,
                    tmp_path / f"agent{i}" / "patch.msu",
                    timeout=30,
                    root=tmp_path / f"agent{i}",
                )
                for i, a in enumerate(agents)
            )
        )

    asyncio.run(all_three())
    for i in range(3):
        assert (tmp_path / f"agent{i}" / "patch.msu").read_bytes() == path.read_bytes()
    assert _served(server, "relay") - before == size  # once, for the three
    assert _served(server, "agent") == 0  # nothing went around the relay
    assert relay.metric("taskfleet_relay_content_fetched_bytes_total") == size
    assert relay.metric("taskfleet_relay_content_served_bytes_total") == 3 * size
    assert relay.metric("taskfleet_relay_content_cache_bytes") == size
    assert (relay.state_dir / "content" / sha).stat().st_mode & 0o777 == 0o600

    # A fourth download, with a range, is a hit: still nothing more from the server.
    a = agents[0]
    headers = {
        "X-Taskfleet-Computer": str(a["computer_id"]),
        "Authorization": f"Bearer {a['secret']}",
        "Range": "bytes=4000000-",
    }
    r = httpx.get(f"{relay.url}/agent/v1/content/{sha}", headers=headers, timeout=30)
    assert r.status_code == 206 and r.content == path.read_bytes()[4_000_000:]
    assert r.headers["content-range"] == f"bytes 4000000-{size - 1}/{size}"
    assert relay.metric("taskfleet_relay_content_hits_total") >= 1
    assert _served(server, "relay") - before == size
    # Credentials are checked as the exchange checks them; unknown content is 404.
    wrong = {**headers, "Authorization": "Bearer tfc_wrong"}
    assert httpx.get(f"{relay.url}/agent/v1/content/{sha}", headers=wrong).status_code in (
        401,
        503,  # until a roster fetched after the refusal confirms it (docs/relays.md)
    )
    r = httpx.get(f"{relay.url}/agent/v1/content/{'0' * 64}", headers=headers, timeout=30)
    assert r.status_code == 404, r.text
