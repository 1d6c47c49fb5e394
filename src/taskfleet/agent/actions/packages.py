"""Packages activities on the agent: Change Packages, Upgrade Packages, Upgrade and
Downgrade Kernel Package (``domain/actions/packages.py`` for the parameters).

Contract:
* Every change runs apt-get (or apt-mark) as argv through ``ActionContext.run``
  with ``DEBIAN_FRONTEND=noninteractive``, ``-y``, dpkg told to keep changed
  configuration files (``--force-confdef``, ``--force-confold``), and
  ``-o DPkg::Lock::Timeout=LOCK_TIMEOUT``: apt waits that long for a dpkg lock another
  process holds. apt-mark does not wait, so it is tried again until that much time has
  passed. A lock still held then fails the activity saying so: "the dpkg lock is held
  by another process (pid N, NAME) after waiting T s".
* The managed system is ``ActionEnv.root`` with dpkg's database ``ActionEnv.admindir``.
  For a root other than ``/`` (a container's view of its host, a test's throw-away root)
  apt must not read the agent's own system's configuration (its ``apt.conf.d`` hooks
  run programs on this system: debconf, packagekit, docker's cache cleaning), so its
  configuration is a file given as ``APT_CONFIG`` that sets ``Dir`` to the root (then
  the root's own ``etc/apt`` is read, and the package lists, caches, logs and locks are
  the root's) and ``Dir::State::status``; dpkg gets ``--root``, ``--admindir`` and
  ``--log`` (its log is otherwise the agent system's ``/var/log/dpkg.log``). The
  agent's ``--apt-option NAME=VALUE`` settings come last.
* Each result line says what changed, read from dpkg's database before and after
  (``dpkg-query``, parsed as the inventory does): "installed tf-hello 2.0-1; upgraded
  tf-lib 1.0-1 -> 1.1-1; removed foo 1.0-1; held bar", or "nothing changed".
* ``change-packages``: unhold, then one apt-get transaction installing (``NAME=VERSION``
  for an exact version, downgrades allowed then) and removing (``--purge`` with
  ``purge``), then hold. The package lists are refreshed (``apt-get update``) first when
  something is installed; a failed refresh is said in the result, the old lists used.
* ``upgrade-packages``: ``apt-get upgrade`` (``dist-upgrade``); held packages stay.
  ``security_only``: the upgrades apt simulates whose candidate comes from a security
  archive (``agent/inventory.py``'s rule, the one the inventory marks them by), each
  installed at that version with ``--only-upgrade``.
* ``upgrade-kernel``: the package at its newest (or the given) version; without a
  package, every installed ``linux-image-*`` package upgraded. A version older than the
  installed one is refused (that is ``downgrade-kernel``). ``downgrade-kernel``: the
  package at the given version, which must be older than the installed one.
* ``unsupported``: apt-get, apt-mark, dpkg or dpkg-query missing, or no dpkg database.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskfleet.agent import inventory
from taskfleet.agent.actions.context import (
    ActionContext,
    ActionEnv,
    ActionOutcome,
    AgentAction,
    Ran,
)
from taskfleet.domain.actions.packages import (
    CHANGE_PACKAGES,
    DOWNGRADE_KERNEL,
    UPGRADE_KERNEL,
    UPGRADE_PACKAGES,
)
from taskfleet.domain.inventory import split_package_key
from taskfleet.domain.versions import compare

TOOLS = ("apt-get", "apt-mark", "dpkg", "dpkg-query")
LOCK_RETRY = 0.5  # seconds between apt-mark's tries while a dpkg lock is held
_LIST_MAX = 20  # packages named per kind of change in a result line
_APT_LOCK = re.compile(r"Could not get lock (\S+?)\.? It is held by process (\d+)(?: \(([^)]*)\))?")
_DPKG_LOCK = re.compile(r"lock was locked by another process with pid (\d+)")
_LOCK_TEXT = (
    "Could not get lock",
    "Unable to acquire the dpkg frontend lock",
    "Unable to lock the administration directory",
    "lock was locked by another process",
)


class PackagesError(Exception):
    """A step failed; the message is the result line."""

    def __init__(self, line: str, ran: Ran | None = None) -> None:
        super().__init__(line)
        self.ran = ran


@dataclass(frozen=True)
class Apt:
    """How apt-get, apt-mark and dpkg-query reach the managed system."""

    options: list[str]  # "-o", "NAME=VALUE", ... for apt-get and apt-mark
    env: dict[str, str]
    query: list[str]  # dpkg-query -W for the installed packages


def _config_value(path: Path) -> str:
    text = str(path)
    if any(c in text for c in '"\\') or not text.isprintable():
        raise PackagesError(f"the path {text!r} cannot be given to apt (quote or control)")
    return text


@contextlib.contextmanager
def apt_for(env: ActionEnv) -> Iterator[Apt]:
    """The options and environment for the managed system (an APT_CONFIG file for a
    root other than ``/``, removed afterwards)."""
    root = env.root.resolve()  # apt and dpkg take it from any working directory
    admindir = env.admindir.resolve() if env.admindir is not None else root / "var/lib/dpkg"
    lock = max(0, math.ceil(env.lock_timeout))
    options = [
        f"DPkg::Lock::Timeout={lock}",
        "DPkg::Options::=--force-confdef",
        "DPkg::Options::=--force-confold",
    ]
    run_env = {"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C", "LANG": "C"}
    config: Path | None = None
    if env.chrooted:
        text = (
            f'Dir "{_config_value(root)}/";\n'
            f'Dir::State::status "{_config_value(admindir / "status")}";\n'
        )
        folder = env.tmp_dir if env.tmp_dir is not None and env.tmp_dir.is_dir() else None
        fd, name = tempfile.mkstemp(prefix="apt-", suffix=".conf", dir=folder)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        config = Path(name)
        run_env["APT_CONFIG"] = name
        options += [
            f"Dir={root}/",
            f"DPkg::Options::=--root={root}",
            f"DPkg::Options::=--log={root / 'var/log/dpkg.log'}",
        ]
    if env.chrooted or admindir != root / "var/lib/dpkg":
        options += [
            f"Dir::State::status={admindir / 'status'}",
            f"DPkg::Options::=--admindir={admindir}",
        ]
    options += list(env.apt_options)
    try:
        yield Apt(
            [w for o in options for w in ("-o", o)],
            run_env,
            inventory.dpkg_query_argv(root, admindir),
        )
    finally:
        if config is not None:
            with contextlib.suppress(OSError):
                config.unlink()


# -- reading dpkg's database and saying what changed --------------------------------


async def installed(ctx: ActionContext, apt: Apt) -> dict[str, dict[str, Any]]:
    """The installed packages, keyed ``NAME:ARCH`` (``agent/inventory.py``'s parser)."""
    ran = await ctx.run(apt.query, env=apt.env)
    if not ran.ok:
        raise PackagesError(f"cannot read dpkg's database: {ran.why()}", ran)
    return inventory.parse_dpkg_query(ran.stdout)


def _names(items: list[str]) -> str:
    more = len(items) - _LIST_MAX
    return ", ".join(items[:_LIST_MAX]) + (f" and {more} more" if more > 0 else "")


def changes(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> str:
    """What changed between two readings of dpkg's database, for a result line."""
    names = [split_package_key(k)[0] for k in before.keys() | after.keys()]

    def shown(key: str) -> str:
        name = split_package_key(key)[0]
        return key if names.count(name) > 1 else name

    kinds: dict[str, list[str]] = {
        k: [] for k in ("installed", "upgraded", "downgraded", "removed", "held", "unheld")
    }
    for key in sorted(before.keys() | after.keys()):
        old, new = before.get(key), after.get(key)
        name = shown(key)
        if old is None and new is not None:
            kinds["installed"].append(f"{name} {new['version']}")
        elif new is None and old is not None:
            kinds["removed"].append(f"{name} {old['version']}")
        elif old is not None and new is not None and old["version"] != new["version"]:
            kind = "upgraded" if compare(new["version"], old["version"]) > 0 else "downgraded"
            kinds[kind].append(f"{name} {old['version']} -> {new['version']}")
        was_held = bool(old and old.get("held"))
        is_held = bool(new and new.get("held"))
        if is_held and not was_held:
            kinds["held"].append(name)
        elif was_held and not is_held and new is not None:
            kinds["unheld"].append(name)
    parts = [f"{kind} {_names(items)}" for kind, items in kinds.items() if items]
    return "; ".join(parts) or "nothing changed"


# -- running apt ----------------------------------------------------------------------


def lock_held(ran: Ran, waited: float) -> str | None:
    """The result line when ``ran`` failed because a dpkg lock is held, else None."""
    text = f"{ran.stdout}\n{ran.stderr}"
    if ran.ok or not any(t in text for t in _LOCK_TEXT):
        return None
    pid = name = None
    for m in _APT_LOCK.finditer(text):
        pid, name = m.group(2), m.group(3)
    if pid is None and (d := _DPKG_LOCK.search(text)) is not None:
        pid = d.group(1)
    if pid is not None and not name:
        with contextlib.suppress(OSError):
            name = Path(f"/proc/{pid}/comm").read_text().strip()
    who = f" (pid {pid}, {name})" if pid and name else f" (pid {pid})" if pid else ""
    return f"the dpkg lock is held by another process{who} after waiting {waited:g} s"


def _failed(ran: Ran, waited: float, what: str) -> PackagesError:
    why = lock_held(ran, waited)
    if why is None:
        why = f"{what} failed: {ran.why()}"
    return PackagesError(why, ran)


async def apt_get(
    ctx: ActionContext, apt: Apt, command: str, words: list[str], flags: tuple[str, ...] = ()
) -> Ran:
    """apt-get -y FLAGS COMMAND WORDS; PackagesError saying why if it fails."""
    ran = await ctx.run(["apt-get", "-y", *apt.options, *flags, command, *words], env=apt.env)
    if not ran.ok:
        raise _failed(ran, ctx.env.lock_timeout, f"apt-get {command}")
    return ran


async def apt_mark(ctx: ActionContext, apt: Apt, verb: str, names: list[str]) -> Ran:
    """apt-mark VERB NAMES, tried again while a dpkg lock is held (it does not wait)."""
    until = time.monotonic() + ctx.env.lock_timeout
    while True:
        ran = await ctx.run(["apt-mark", *apt.options, verb, *names], env=apt.env)
        if ran.ok:
            return ran
        left = until - time.monotonic()
        if lock_held(ran, 0) is None or left <= 0:
            raise _failed(ran, ctx.env.lock_timeout, f"apt-mark {verb}")
        await asyncio.sleep(min(LOCK_RETRY, left))


async def update(ctx: ActionContext, apt: Apt) -> str:
    """Refresh the package lists; "" or a note that it failed (the old lists are used)."""
    ran = await ctx.run(["apt-get", *apt.options, "update"], env=apt.env)
    if ran.ok:
        return ""
    why = lock_held(ran, ctx.env.lock_timeout) or ran.why()
    return f" (apt-get update failed, the package lists may be old: {why})"


Installed = dict[str, dict[str, Any]]
Steps = Callable[["Apt", Installed], Awaitable[tuple[Ran | None, str]]]


async def _changed(
    ctx: ActionContext, steps: Steps, *, empty: str = "nothing changed"
) -> ActionOutcome:
    """Run ``steps(apt)`` between two readings of dpkg's database; the outcome says what
    changed (and, on failure, why and what had changed before)."""
    try:
        with apt_for(ctx.env) as apt:
            before = await installed(ctx, apt)
            try:
                ran, note = await steps(apt, before)
            except PackagesError as exc:
                done = changes(before, await installed(ctx, apt))
                line = str(exc) if done == "nothing changed" else f"{exc}; changed: {done}"
                return ActionOutcome.failed(line, exc.ran)
            done = changes(before, await installed(ctx, apt))
    except PackagesError as exc:
        return ActionOutcome.failed(str(exc), exc.ran)
    line = empty if done == "nothing changed" else done
    return ActionOutcome.succeeded(line + note, ran)


def _spec(name: str, version: str | None) -> str:
    return name if version is None else f"{name}={version}"


async def change_packages(ctx: ActionContext) -> ActionOutcome:
    p = ctx.params

    async def steps(apt: Apt, before: Installed) -> tuple[Ran | None, str]:
        ran: Ran | None = None
        note = await update(ctx, apt) if p["install"] else ""
        if p["unhold"]:
            ran = await apt_mark(ctx, apt, "unhold", p["unhold"])
        if p["install"] or p["remove"]:
            flags: tuple[str, ...] = ("--purge",) if p["purge"] else ()
            if any(e["version"] for e in p["install"]):
                flags += ("--allow-downgrades",)
            if p["install"]:
                words = [_spec(e["name"], e["version"]) for e in p["install"]]
                words += [f"{n}-" for n in p["remove"]]  # removed in the same transaction
                ran = await apt_get(ctx, apt, "install", words, flags)
            else:
                ran = await apt_get(ctx, apt, "remove", p["remove"], flags)
        if p["hold"]:
            ran = await apt_mark(ctx, apt, "hold", p["hold"])
        return ran, note

    return await _changed(ctx, steps)


def _qualified(key: str) -> str:
    name, arch = split_package_key(key)
    return name if arch in ("", "all") else key


async def upgrade_packages(ctx: ActionContext) -> ActionOutcome:
    p = ctx.params
    command = "dist-upgrade" if p["dist_upgrade"] else "upgrade"

    async def steps(apt: Apt, before: Installed) -> tuple[Ran | None, str]:
        note = await update(ctx, apt)
        if not p["security_only"]:
            return await apt_get(ctx, apt, command, []), note
        sim = await ctx.run(
            ["apt-get", *apt.options, "-o", "Debug::NoLocking=1", "-s", command], env=apt.env
        )
        if not sim.ok:
            raise _failed(sim, ctx.env.lock_timeout, f"apt-get -s {command}")
        pending = inventory.parse_apt_simulation(sim.stdout)
        wanted = [
            f"{_qualified(key)}={entry['version']}"
            for key, entry in sorted(pending.items())
            if entry["security"] and key in before
        ]
        if not wanted:
            return sim, note
        return await apt_get(ctx, apt, "install", wanted, ("--only-upgrade",)), note

    empty = "no security upgrades pending" if p["security_only"] else "nothing to upgrade"
    return await _changed(ctx, steps, empty=empty)


def _installed_version(before: dict[str, dict[str, Any]], name: str) -> str | None:
    for key, entry in before.items():
        if split_package_key(key)[0] == name:
            return str(entry["version"])
    return None


async def upgrade_kernel(ctx: ActionContext) -> ActionOutcome:
    package, version = ctx.params["package"], ctx.params["version"]

    async def steps(apt: Apt, before: Installed) -> tuple[Ran | None, str]:
        if package is None:
            kernels = sorted(
                {
                    _qualified(key)
                    for key in before
                    if split_package_key(key)[0].startswith("linux-image-")
                }
            )
            if not kernels:
                raise PackagesError("no linux-image-* package is installed")
            note = await update(ctx, apt)
            return await apt_get(ctx, apt, "install", kernels, ("--only-upgrade",)), note
        current = _installed_version(before, package)
        if version is not None and current is not None and compare(version, current) < 0:
            raise PackagesError(
                f"{package} {version} is older than the installed {current}: "
                "that is downgrade-kernel"
            )
        note = await update(ctx, apt)
        return await apt_get(ctx, apt, "install", [_spec(package, version)]), note

    return await _changed(ctx, steps, empty="the kernel package is already the newest")


async def downgrade_kernel(ctx: ActionContext) -> ActionOutcome:
    package, version = ctx.params["package"], ctx.params["version"]

    async def steps(apt: Apt, before: Installed) -> tuple[Ran | None, str]:
        current = _installed_version(before, package)
        if current is None:
            raise PackagesError(f"{package} is not installed")
        if compare(version, current) >= 0:
            raise PackagesError(f"{package} {version} is not older than the installed {current}")
        note = await update(ctx, apt)
        ran = await apt_get(ctx, apt, "install", [_spec(package, version)], ("--allow-downgrades",))
        return ran, note

    return await _changed(ctx, steps)


def unsupported(env: ActionEnv) -> str | None:
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (not a Debian system?)"
    if not (env.dpkg_admindir / "status").is_file():
        return f"no dpkg database at {env.dpkg_admindir} (not a Debian system?)"
    try:
        _config_value(env.root)
        _config_value(env.dpkg_admindir)
    except PackagesError as exc:
        return str(exc)
    return None


HANDLERS: dict[str, AgentAction] = {
    CHANGE_PACKAGES: AgentAction(change_packages, unsupported),
    UPGRADE_PACKAGES: AgentAction(upgrade_packages, unsupported),
    UPGRADE_KERNEL: AgentAction(upgrade_kernel, unsupported),
    DOWNGRADE_KERNEL: AgentAction(downgrade_kernel, unsupported),
}
