"""``taskfleet packages``: Debian packages on the computers.

Contract: each command posts one typed activity (``domain/actions/packages.py``;
docs/activity-types.md "Packages") through ``cli/typed.py``:
``install NAME[=VERSION]...`` (``change-packages`` install), ``remove NAME...
[--purge]``, ``hold NAME...``, ``unhold NAME...``, ``upgrade [--security-only]
[--dist-upgrade]`` (``upgrade-packages``), ``upgrade-kernel [--package P
[--version V]]`` and ``downgrade-kernel --package P --version V``. The server
validates names and versions.
"""

from __future__ import annotations

from typing import Any

import click

from taskfleet.cli.output import fail
from taskfleet.cli.typed import submit, typed_options


def _install(specs: tuple[str, ...]) -> list[Any]:
    """``NAME`` or ``NAME=VERSION`` as change-packages' install entries."""
    out: list[Any] = []
    for spec in specs:
        name, eq, version = spec.partition("=")
        out.append({"name": name, "version": version} if eq else name)
    return out


def _names(verb: str, names: tuple[str, ...]) -> list[str]:
    for name in names:
        if "=" in name:
            fail(f"packages {verb} takes package names, not NAME=VERSION ({name!r})")
    return list(names)


@click.group()
def packages() -> None:
    """Debian packages on the computers (typed activities: docs/activity-types.md)."""


@packages.command("install")
@click.argument("specs", metavar="NAME[=VERSION]...", nargs=-1, required=True)
@typed_options
def packages_install(specs: tuple[str, ...], **common: Any) -> None:
    """Install packages (NAME=VERSION: exactly that version, even an older one)."""
    submit("change-packages", {"install": _install(specs)}, **common)


@packages.command("remove")
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
@click.option("--purge", is_flag=True, help="Remove their configuration files too.")
@typed_options
def packages_remove(names: tuple[str, ...], purge: bool, **common: Any) -> None:
    """Remove packages."""
    submit("change-packages", {"remove": _names("remove", names), "purge": purge}, **common)


@packages.command("hold")
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
@typed_options
def packages_hold(names: tuple[str, ...], **common: Any) -> None:
    """Hold packages at their version: upgrades leave them alone."""
    submit("change-packages", {"hold": _names("hold", names)}, **common)


@packages.command("unhold")
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
@typed_options
def packages_unhold(names: tuple[str, ...], **common: Any) -> None:
    """Let held packages be upgraded again."""
    submit("change-packages", {"unhold": _names("unhold", names)}, **common)


@packages.command("upgrade")
@click.option(
    "--security-only/--all",
    default=False,
    show_default=True,
    help="Only the upgrades from a security archive, or every one.",
)
@click.option("--dist-upgrade", is_flag=True, help="May install or remove packages to upgrade.")
@typed_options
def packages_upgrade(security_only: bool, dist_upgrade: bool, **common: Any) -> None:
    """Upgrade the packages that have upgrades (held ones stay)."""
    params = {"security_only": security_only, "dist_upgrade": dist_upgrade}
    submit("upgrade-packages", params, **common)


@packages.command("upgrade-kernel")
@click.option("--package", default=None, help="A linux-image-* package [default: every one].")
@click.option("--version", default=None, help="Its version [default: the newest].")
@typed_options
def packages_upgrade_kernel(package: str | None, version: str | None, **common: Any) -> None:
    """Upgrade the kernel package."""
    params = {k: v for k, v in (("package", package), ("version", version)) if v is not None}
    submit("upgrade-kernel", params, **common)


@packages.command("downgrade-kernel")
@click.option("--package", required=True, help="A linux-image-* package.")
@click.option("--version", required=True, help="The older version to install.")
@typed_options
def packages_downgrade_kernel(package: str, version: str, **common: Any) -> None:
    """Downgrade the kernel package to an older version."""
    submit("downgrade-kernel", {"package": package, "version": version}, **common)
