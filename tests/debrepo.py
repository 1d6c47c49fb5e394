"""Real .deb packages, a local apt repository of them and a throw-away system root, for
the packages tests (issue 13): apt-get and dpkg install, hold, upgrade and remove for
real, and nothing touches this machine's own package database or the network.

``build_repo(base)`` builds the packages with ``dpkg-deb --build`` and writes two flat
repositories, each with its ``Packages`` and ``Release`` files (written here):

* ``main`` (Label ``tf``, Suite ``stable``): tf-hello 1.0-1, tf-lib 1.0-1, tf-tool 1.0-1
  (Depends: tf-lib), tf-other 1.0-1 and 1.1-1, linux-image-tf 1.0-1 and 2.0-1;
* ``security`` (Label ``Debian-Security``, Suite ``stable-security``, so the inventory's
  rule and apt's simulation mark its upgrades as security ones): tf-hello 2.0-1.

``make_root(base, repo)`` makes a root with an empty dpkg database (``status``,
``available``, ``info/``, ``updates/``, ``triggers/``), apt's folders and a sources list
``deb [trusted=yes] file:///... ./`` per repository. ``APT_OPTIONS`` are the settings a
test passes as ``--apt-option``: the download runs as root (the root's folders are not
``_apt``'s). ``host_untouched()`` asserts a block left this machine's own dpkg and apt
state as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# (repository, name, version, depends)
PACKAGES = (
    ("main", "tf-hello", "1.0-1", ""),
    ("main", "tf-lib", "1.0-1", ""),
    ("main", "tf-tool", "1.0-1", "tf-lib (>= 1.0)"),
    ("main", "tf-other", "1.0-1", ""),
    ("main", "tf-other", "1.1-1", ""),
    ("main", "linux-image-tf", "1.0-1", ""),
    ("main", "linux-image-tf", "2.0-1", ""),
    ("security", "tf-hello", "2.0-1", ""),
)
RELEASES = {"main": ("tf", "stable"), "security": ("Debian-Security", "stable-security")}
APT_OPTIONS = ("APT::Sandbox::User=root",)
DATE = "Mon, 30 Nov 2026 00:00:00 UTC"


@dataclass(frozen=True)
class Repo:
    path: Path  # holds one folder per repository

    def sources(self) -> str:
        return "".join(f"deb [trusted=yes] file://{self.path / r} ./\n" for r in RELEASES)


def build_deb(folder: Path, work: Path, name: str, version: str, depends: str = "") -> str:
    """Build ``NAME_VERSION_all.deb`` into ``folder``; its ``Packages`` stanza."""
    tree = work / f"{name}_{version}"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "usr/share/tf").mkdir(parents=True)
    (tree / "usr/share/tf" / name).write_text(f"{version}\n")
    control = (
        f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
        f"Maintainer: taskfleet tests <tests@example.invalid>\n"
        + (f"Depends: {depends}\n" if depends else "")
        + f"Description: taskfleet test package {name}\n"
    )
    (tree / "DEBIAN/control").write_text(control)
    deb = folder / f"{name}_{version}_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(tree), str(deb)],
        check=True,
        capture_output=True,
    )
    data = deb.read_bytes()
    return (
        f"{control}Filename: ./{deb.name}\nSize: {len(data)}\n"
        f"SHA256: {hashlib.sha256(data).hexdigest()}\n"
    )


def build_repo(base: Path) -> Repo:
    repo = Repo(base / "repo")
    work = base / "build"
    stanzas: dict[str, list[str]] = {r: [] for r in RELEASES}
    for where, name, version, depends in PACKAGES:
        folder = repo.path / where
        folder.mkdir(parents=True, exist_ok=True)
        stanzas[where].append(build_deb(folder, work / where, name, version, depends))
    for where, (label, suite) in RELEASES.items():
        folder = repo.path / where
        packages = "\n".join(stanzas[where]).encode()
        (folder / "Packages").write_bytes(packages)
        (folder / "Release").write_text(
            f"Origin: {label}\nLabel: {label}\nSuite: {suite}\nCodename: {suite}\n"
            f"Date: {DATE}\nArchitectures: all amd64\n"
            f"SHA256:\n {hashlib.sha256(packages).hexdigest()} {len(packages)} Packages\n"
        )
    return repo


def make_root(base: Path, repo: Repo) -> Path:
    root = base / "root"
    for folder in (
        "etc/apt/apt.conf.d",
        "etc/apt/preferences.d",
        "etc/apt/sources.list.d",
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
        "var/lib/apt/lists/partial",
        "var/cache/apt/archives/partial",
        "var/log/apt",
        "tmp",
    ):
        (root / folder).mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text("")
    (root / "var/lib/dpkg/available").write_text("")
    (root / "etc/apt/sources.list").write_text(repo.sources())
    return root


def installed(root: Path) -> dict[str, tuple[str, bool]]:
    """The root's installed packages: name -> (version, held), read by dpkg-query."""
    out = subprocess.run(
        [
            "dpkg-query",
            f"--root={root}",
            f"--admindir={root / 'var/lib/dpkg'}",
            "-W",
            "-f=${Package}\\t${Version}\\t${Status}\\n",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result = {}
    for line in out.splitlines():
        name, version, status = line.split("\t")
        if status.endswith(" installed"):
            result[name] = (version, status.startswith("hold "))
    return result


# This machine's dpkg database, apt's lists and downloads, dpkg's log and debconf's
# answers. Not /var/log/apt: apt-get -s (the inventory of other tests' agents, which
# read this machine) writes its planner log there.
HOST_PATHS = (
    "/var/lib/dpkg/status",
    "/var/lib/dpkg",
    "/var/lib/dpkg/info",
    "/var/lib/dpkg/updates",
    "/var/log/dpkg.log",
    "/var/cache/apt/archives",
    "/var/lib/apt/lists",
    "/var/lib/apt/extended_states",
    "/var/cache/debconf",
)
OURS = re.compile(r"\b(?:tf-(?:hello|lib|tool|other)|linux-image-tf)\b")


def host_dpkg_state() -> dict[str, str]:
    """This machine's own dpkg/apt state: the status file's checksum and, for each path
    there is, its size and modification time."""
    state: dict[str, str] = {}
    with contextlib.suppress(OSError):
        state["status-sha256"] = hashlib.sha256(
            Path("/var/lib/dpkg/status").read_bytes()
        ).hexdigest()
    for path in HOST_PATHS:
        try:
            s = os.stat(path)
        except OSError:
            continue
        state[path] = f"{s.st_size}:{s.st_mtime_ns}"
    return state


def _read(path: str, start: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


@contextmanager
def host_untouched() -> Iterator[None]:
    """Assert that the block leaves this machine's own dpkg and apt state as it was: the
    same checksum and times of ``HOST_PATHS``. When they changed anyway (the machine is
    shared: another session may install something on it meanwhile), this block's doing
    shows by our packages' names: in dpkg's status or log lines written meanwhile, or
    in apt's lists and downloads. None may be there."""
    before = host_dpkg_state()
    log_size = os.stat("/var/log/dpkg.log").st_size if os.path.exists("/var/log/dpkg.log") else 0
    yield
    if host_dpkg_state() == before:
        return
    assert not OURS.search(_read("/var/log/dpkg.log", log_size)), "dpkg logged ours here"
    assert not re.search(r"^Package: (?:tf-|linux-image-tf)", _read("/var/lib/dpkg/status"), re.M)
    for folder in ("/var/lib/apt/lists", "/var/cache/apt/archives"):
        with contextlib.suppress(OSError):
            names = os.listdir(folder)
            assert not [n for n in names if OURS.search(n) or "_repo_" in n], folder


@contextmanager
def dpkg_lock_held(root: Path) -> Iterator[int]:
    """Hold ROOT/var/lib/dpkg/lock-frontend as apt and dpkg do (an fcntl write lock) from
    another process; yields its PID. The lock is released when the block ends."""
    lock = root / "var/lib/dpkg/lock-frontend"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys\n"
            f"f = open({str(lock)!r}, 'a')\n"
            "fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with open(lock, "a") as f:  # the lock is really held: a try from here fails
            try:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pass
            else:
                raise AssertionError("the dpkg lock was not held")
        yield holder.pid
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
