"""Collecting this computer's inventory (issue 13; docs/inventory.md). Stdlib only.

Contract:

* ``collect(root, admindir)`` returns a snapshot (``domain/inventory.py``): OS
  (``/etc/os-release``: ID, VERSION_ID, PRETTY_NAME), kernel (``os.uname``; for
  another root its ``proc/sys/kernel``), CPU (``/proc/cpuinfo``: model, count),
  memory (``/proc/meminfo``: totals), disks (``/proc/mounts``, real filesystems
  only, with ``os.statvfs``), network addresses (``ip -j addr``, else
  ``/proc/net/if_inet6`` and ``/proc/net/fib_trie``), installed packages
  (``dpkg-query -W``), pending upgrades (``apt-get -s dist-upgrade``; security
  ones marked) and users and groups (``/etc/passwd``, ``/etc/group``; the
  password fields are never kept, ``/etc/shadow`` never read).
* Every path is under ``root`` (``/`` by default; tests point it at captured
  files) and dpkg's database is ``admindir`` (default ``ROOT/var/lib/dpkg``).
  Tools run without a shell, with ``LC_ALL=C``, a time limit
  (``INVENTORY_TOOL_TIMEOUT``) and a cap on what is read (``INVENTORY_TOOL_OUTPUT``).
* A source that fails is left out and named in the ``missing`` section with
  the reason; it never fails the whole inventory.
* The simulated upgrade costs seconds of CPU, so its output is cached by what
  it depends on (dpkg's status file, apt's package lists): in a folder of the
  system's temporary directory that only this user owns, under a lock, so many
  agents on one machine (tests, benchmarks) run it once per change.
* Run as ``python -m taskfleet.agent.inventory --state FILE [--full]`` it is the
  agent's collector process (``agent/inventory_reports.py``): it collects,
  compares with the snapshot kept in ``FILE``, writes the new one to
  ``FILE.next`` and prints the ``inventory`` message to send (one JSON line),
  or nothing when nothing changed. The agent itself never holds the inventory
  in memory, so its idle size does not grow.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from taskfleet.domain import inventory as inv
from taskfleet.protocol.inventory import MAX_INVENTORY_BYTES, inventory_message
from taskfleet.settings import (
    INVENTORY_CACHE_ENTRIES,
    INVENTORY_TOOL_OUTPUT,
    INVENTORY_TOOL_TIMEOUT,
)

REAL_FILESYSTEMS = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "vfat", "exfat", "ntfs", "ntfs3", "f2fs"}
    | {"jfs", "reiserfs", "hfsplus", "nfs", "nfs4", "cifs", "smb3", "fuseblk"}
)
_INST = re.compile(
    r"^Inst (?P<name>\S+)(?: \[(?P<old>[^\]]*)\])? \((?P<new>\S+) (?P<origin>.*?)"
    r"(?: \[(?P<arch>[^\]]+)\])?\)"
)


class SourceError(Exception):
    """One source could not be read; its message is the reason shown."""


# -- parsers: pure functions over a tool's or a file's text ------------------------


def parse_os_release(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, eq, value = line.strip().partition("=")
        if not eq or key.startswith("#"):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        values[key] = value
    return {
        "id": values.get("ID", "linux"),
        "version_id": values.get("VERSION_ID", ""),
        "pretty_name": values.get("PRETTY_NAME", ""),
    }


def parse_cpuinfo(text: str) -> dict[str, Any]:
    count = 0
    model = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            count += 1
        elif not model and key in ("model name", "Hardware", "cpu model", "Model"):
            model = value.strip()
    return {"model": model, "count": count}


def parse_meminfo(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    names = {"MemTotal": "total_kb", "SwapTotal": "swap_kb"}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in names:
            out[names[key]] = int(value.split()[0])
    return out


def _unescape_mount(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mounts(text: str) -> list[dict[str, str]]:
    """Real filesystems of ``/proc/mounts``, each device once (bind mounts left out)."""
    out: list[dict[str, str]] = []
    devices: set[str] = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or parts[2] not in REAL_FILESYSTEMS or parts[0] in devices:
            continue
        devices.add(parts[0])
        out.append({"device": _unescape_mount(parts[0]), "mount": _unescape_mount(parts[1])})
        out[-1]["fs"] = parts[2]
    return out


def parse_ip_addr(text: str) -> list[dict[str, Any]]:
    """``ip -j addr``: each interface but loopback with its MAC and addresses (CIDR)."""
    out = []
    for link in json.loads(text):
        if "LOOPBACK" in link.get("flags", ()):
            continue
        addresses = [
            f"{a['local']}/{a['prefixlen']}"
            for a in link.get("addr_info", ())
            if "local" in a and not a.get("temporary")
        ]
        out.append(
            {"interface": link["ifname"], "mac": link.get("address", ""), "addresses": addresses}
        )
    return out


def parse_proc_net(if_inet6: str, fib_trie: str) -> list[dict[str, Any]]:
    """The fallback without ``ip``: IPv6 addresses by interface (``if_inet6``) and the
    local IPv4 addresses (``fib_trie``, which does not name interfaces: ``""``)."""
    by_if: dict[str, list[str]] = {}
    for line in if_inet6.splitlines():
        parts = line.split()
        if len(parts) != 6 or parts[5] == "lo":
            continue
        h = parts[0]
        addr = ":".join(h[i : i + 4] for i in range(0, 32, 4))
        by_if.setdefault(parts[5], []).append(f"{_short_v6(addr)}/{int(parts[2], 16)}")
    v4: list[str] = []
    last = ""
    for line in fib_trie.splitlines():
        s = line.strip()
        if s.startswith("|--"):
            last = s[3:].strip()
        elif s == "/32 host LOCAL" and last and not last.startswith("127.") and last not in v4:
            v4.append(last)
    out = [{"interface": n, "mac": "", "addresses": a} for n, a in sorted(by_if.items())]
    if v4:
        out.append({"interface": "", "mac": "", "addresses": v4})
    return out


def _short_v6(addr: str) -> str:
    import ipaddress

    return str(ipaddress.IPv6Address(addr))


def parse_dpkg_query(text: str) -> dict[str, dict[str, Any]]:
    """``dpkg-query -W -f='${Package}\\t${Version}\\t${Architecture}\\t${Status}\\n'``:
    installed packages (status ``... installed``) keyed ``NAME:ARCH``; held ones marked."""
    out: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 4:
            continue
        name, version, arch, status = parts
        words = status.split()
        if len(words) != 3 or words[2] != "installed":
            continue
        entry: dict[str, Any] = {"version": version}
        if words[0] == "hold":
            entry["held"] = True
        out[inv.package_key(name, arch)] = entry
    return out


def parse_apt_simulation(text: str, default_arch: str = "") -> dict[str, dict[str, Any]]:
    """``apt-get -s dist-upgrade``: each ``Inst NAME [OLD] (NEW ORIGINS [ARCH])`` keyed
    ``NAME:ARCH``; ``security`` when an origin is a security archive."""
    out: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        m = _INST.match(line)
        if m is None:
            continue
        name, _, arch = m.group("name").partition(":")
        arch = arch or m.group("arch") or default_arch
        out[inv.package_key(name, arch)] = {
            "version": m.group("new"),
            "security": "security" in m.group("origin").lower(),
        }
    return out


def parse_passwd(text: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) != 7 or not parts[0] or parts[0].startswith(("#", "+", "-")):
            continue
        name, _password, uid, gid, gecos, home, shell = parts
        if not (uid.isdigit() and gid.isdigit()):
            continue
        out[name] = {"uid": int(uid), "gid": int(gid), "name": gecos, "home": home}
        out[name]["shell"] = shell
    return out


def parse_group(text: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) != 4 or not parts[0] or not parts[2].isdigit():
            continue
        members = sorted(m for m in parts[3].split(",") if m)
        out[parts[0]] = {"gid": int(parts[2]), "members": members}
    return out


# -- sources: read files and run tools under ``root`` --------------------------------


def _read(root: Path, rel: str) -> str:
    path = root / rel.lstrip("/")
    try:
        with open(path, "rb") as f:
            data = f.read(INVENTORY_TOOL_OUTPUT + 1)
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > INVENTORY_TOOL_OUTPUT:
        raise SourceError(f"{path} is over {INVENTORY_TOOL_OUTPUT} bytes")
    return data.decode("utf-8", "replace")


def run_tool(argv: list[str]) -> str:
    """Run ``argv`` (no shell), its standard output; SourceError if it is missing, fails,
    takes too long or says too much."""
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
    except OSError as exc:
        raise SourceError(f"cannot run {argv[0]}: {exc.strerror}") from None
    try:
        out, err = proc.communicate(timeout=INVENTORY_TOOL_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise SourceError(f"{argv[0]} took over {INVENTORY_TOOL_TIMEOUT:g}s") from None
    if len(out) > INVENTORY_TOOL_OUTPUT:
        raise SourceError(f"{argv[0]} wrote over {INVENTORY_TOOL_OUTPUT} bytes")
    if proc.returncode != 0:
        last = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        raise SourceError(f"{argv[0]} exited {proc.returncode}: {last[0][:300]}")
    return out.decode("utf-8", "replace")


def kernel(root: Path) -> dict[str, str]:
    if root == Path("/"):
        u = os.uname()
        return {"name": u.sysname, "release": u.release, "version": u.version}
    return {
        "name": _read(root, "proc/sys/kernel/ostype").strip(),
        "release": _read(root, "proc/sys/kernel/osrelease").strip(),
        "version": _read(root, "proc/sys/kernel/version").strip(),
    }


def disks(root: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for d in parse_mounts(_read(root, "proc/mounts")):
        try:
            s = os.statvfs(root / d["mount"].lstrip("/"))
        except OSError:
            continue  # listed, not reachable from here (another root, a dead NFS server)
        size = s.f_frsize * s.f_blocks
        used = size - s.f_frsize * s.f_bavail
        # Percent, not bytes: bytes free change at every write and would make a delta each time.
        out.append({**d, "size": size, "used_percent": round(100 * used / size) if size else 0})
    return out


def network(root: Path) -> list[dict[str, Any]]:
    if root == Path("/"):
        with contextlib.suppress(SourceError):
            return parse_ip_addr(run_tool(["ip", "-j", "addr"]))
    return parse_proc_net(_read(root, "proc/net/if_inet6"), _read(root, "proc/net/fib_trie"))


def _dpkg_database(admindir: Path) -> None:
    # dpkg-query and apt-get answer "nothing installed" without one: unknown, not empty.
    if not (admindir / "status").is_file():
        raise SourceError(f"no dpkg database at {admindir} (not a Debian system?)")


def dpkg_query_argv(root: Path, admindir: Path) -> list[str]:
    """The ``dpkg-query`` command whose output :func:`parse_dpkg_query` reads."""
    fmt = "${Package}\\t${Version}\\t${Architecture}\\t${Status}\\n"
    argv = ["dpkg-query", f"--admindir={admindir}", "-W", f"-f={fmt}"]
    if root != Path("/"):
        argv.insert(1, f"--root={root}")
    return argv


def packages(root: Path, admindir: Path) -> dict[str, dict[str, Any]]:
    _dpkg_database(admindir)
    return parse_dpkg_query(run_tool(dpkg_query_argv(root, admindir)))


def upgrades(root: Path, admindir: Path) -> dict[str, dict[str, Any]]:
    _dpkg_database(admindir)
    argv = ["apt-get", "-s", "-o", "Debug::NoLocking=1"]
    if root != Path("/"):
        argv += ["-o", f"Dir={root}"]
    argv += ["-o", f"Dir::State::status={admindir / 'status'}", "dist-upgrade"]
    key = [str(root), str(admindir)]
    for path in (admindir / "status", root / "var/lib/apt/lists"):
        try:
            s = path.stat()
        except OSError:
            continue
        key.append(f"{path}:{s.st_ino}:{s.st_size}:{s.st_mtime_ns}")
    return parse_apt_simulation(_cached(argv, hashlib.sha256("|".join(key).encode()).hexdigest()))


def _cache_dir() -> Path | None:
    """This user's cache folder in the temporary directory, or None if it is not safe
    (not ours, a link, open to others): then nothing is cached."""
    path = Path(tempfile.gettempdir()) / f"taskfleet-inventory-{os.getuid()}"
    with contextlib.suppress(FileExistsError, OSError):
        path.mkdir(mode=0o700)
    try:
        s = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(s.st_mode) or s.st_uid != os.getuid() or s.st_mode & 0o077:
        return None
    return path


def _cached(argv: list[str], key: str) -> str:
    folder = _cache_dir()
    if folder is None:
        return run_tool(argv)
    entry = folder / f"{key[:32]}.out"
    # One lock per answer: the agents that want the same one wait for one run and read it,
    # and those that want another (another dpkg database) do not wait for this one.
    with open(entry.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.suppress(OSError):
            return entry.read_text()
        text = run_tool(argv)
        tmp = entry.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, entry)
    _prune(folder)
    return text


def _prune(folder: Path) -> None:
    """Keep the newest answers only (a machine's dpkg state changes; old ones are dead)."""
    entries = []
    for path in folder.glob("*.out"):
        with contextlib.suppress(OSError):
            entries.append((path.stat().st_mtime, path))
    for _, old in sorted(entries, reverse=True)[INVENTORY_CACHE_ENTRIES:]:
        for stale in (old, old.with_suffix(".lock")):
            with contextlib.suppress(OSError):
                stale.unlink()


def collect(root: Path = Path("/"), admindir: Path | None = None) -> inv.Snapshot:
    admindir = admindir or root / "var/lib/dpkg"
    sources: dict[str, Any] = {
        "os": lambda: parse_os_release(_os_release(root)),
        "kernel": lambda: kernel(root),
        "cpu": lambda: parse_cpuinfo(_read(root, "proc/cpuinfo")),
        "memory": lambda: parse_meminfo(_read(root, "proc/meminfo")),
        "disks": lambda: disks(root),
        "network": lambda: network(root),
        "packages": lambda: packages(root, admindir),
        "upgrades": lambda: upgrades(root, admindir),
        "users": lambda: parse_passwd(_read(root, "etc/passwd")),
        "groups": lambda: parse_group(_read(root, "etc/group")),
    }
    snapshot: inv.Snapshot = {}
    missing: dict[str, str] = {}
    for name, read in sources.items():
        try:
            snapshot[name] = read()
        except SourceError as exc:
            missing[name] = str(exc)
        except (ValueError, KeyError, TypeError, OSError) as exc:  # output we cannot read
            missing[name] = f"unreadable: {type(exc).__name__}: {exc}"[:300]
    if missing:
        snapshot["missing"] = missing
    return snapshot


def _os_release(root: Path) -> str:
    try:
        return _read(root, "etc/os-release")
    except SourceError:
        return _read(root, "usr/lib/os-release")


def fit(snapshot: inv.Snapshot, limit: int = MAX_INVENTORY_BYTES) -> inv.Snapshot:
    """The snapshot, with its largest keyed sections left out (and named in ``missing``)
    until a full message of it fits ``limit`` bytes."""
    snapshot = dict(snapshot)
    while len(json.dumps(inventory_message(True, "", "", snapshot))) > limit:
        sizes = {n: len(json.dumps(snapshot[n])) for n in inv.KEYED if n in snapshot}
        if not sizes:
            break
        name = max(sizes, key=lambda n: sizes[n])
        count = len(snapshot.pop(name))
        missing = dict(snapshot.get("missing") or {})
        missing[name] = f"{count} entries: over the {limit}-byte limit of one inventory message"
        snapshot["missing"] = missing
    return snapshot


def report(state: Path, root: Path, admindir: Path | None, full: bool) -> str:
    """The ``inventory`` message to send (JSON text, no ``seq``), "" when nothing changed;
    the new snapshot is written to ``STATE.next`` (the agent keeps it once queued)."""
    base: dict[str, Any] = {}
    if not full:
        with contextlib.suppress(OSError, ValueError):
            base = json.loads(state.read_text())
    new = fit(collect(root, admindir))
    new_digest = inv.digest(new)
    if base and isinstance(base.get("snapshot"), dict) and isinstance(base.get("digest"), str):
        if base["digest"] == new_digest:
            return ""
        message = inventory_message(
            False, base["digest"], new_digest, inv.delta(base["snapshot"], new)
        )
    else:
        message = inventory_message(True, "", new_digest, new)
    nxt = state.with_name(state.name + ".next")
    nxt.write_text(json.dumps({"digest": new_digest, "snapshot": new}, separators=(",", ":")))
    return json.dumps(message, separators=(",", ":"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m taskfleet.agent.inventory")
    p.add_argument("--state", type=Path, help="the snapshot last sent (JSON file)")
    p.add_argument("--root", type=Path, default=Path("/"))
    p.add_argument("--admindir", type=Path, default=None)
    p.add_argument("--full", action="store_true", help="send the whole inventory")
    p.add_argument("--print", action="store_true", help="print the snapshot and stop")
    args = p.parse_args(argv)
    if args.print or args.state is None:
        json.dump(collect(args.root, args.admindir), sys.stdout, indent=1, sort_keys=True)
        print()
        return 0
    sys.stdout.write(report(args.state, args.root, args.admindir, args.full))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
