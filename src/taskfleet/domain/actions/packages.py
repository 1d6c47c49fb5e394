"""Packages activities (SPEC 2.3): Change Packages, Upgrade All Packages, Upgrade and
Downgrade Kernel Package.

Contract: see ``domain/actions/base.py``. Names and versions are Debian's own rules
and nothing else, so no parameter can reach apt-get or dpkg as an option or a
shell word:

* a package name is ``[a-z0-9][a-z0-9+.-]+`` (Debian policy 5.6.1, at most 128
  characters, not ending in ``-``: apt-get reads ``NAME-`` as "remove NAME"),
  optionally ``:ARCH`` with ARCH one of Debian's architectures;
* a version is a Debian version (deb-version(7), ``domain/versions.py``): it
  starts with a digit, so never with ``-``, and holds no space or metacharacter.

* ``change-packages``: ``install`` (each a name, or ``{"name", "version"?}``),
  ``remove``, ``hold``, ``unhold`` (lists of names; at least one not empty; a
  package in two lists is an error), ``purge`` (remove with its configuration
  files; default false). Normalised: ``install`` as ``[{"name", "version"}]``
  (version ``None`` = the candidate).
* ``upgrade-packages``: ``security_only`` (default false: every upgrade),
  ``dist_upgrade`` (default false: may also install or remove packages to upgrade).
* ``upgrade-kernel``: ``package`` (a ``linux-image-*`` name; default every
  installed one) and ``version`` (default the newest; only with ``package``).
* ``downgrade-kernel``: ``package`` and ``version``, both required.
"""

from __future__ import annotations

import re
from typing import Any

from taskfleet.domain.actions.base import (
    MAX_ITEMS,
    ActionType,
    boolean,
    check_name,
    name_list,
    params_object,
)
from taskfleet.domain.versions import MAX_VERSION_CHARS, valid_version

CHANGE_PACKAGES = "change-packages"
UPGRADE_PACKAGES = "upgrade-packages"
UPGRADE_KERNEL = "upgrade-kernel"
DOWNGRADE_KERNEL = "downgrade-kernel"

# Debian's architectures (dpkg-architecture -L, the released and the ports ones).
ARCHITECTURES = (
    "all", "amd64", "arm64", "armel", "armhf", "i386", "mips64el", "mipsel", "ppc64el",
    "s390x", "riscv64", "alpha", "hppa", "ia64", "loong64", "m68k", "powerpc", "ppc64",
    "sh4", "sparc64", "x32", "hurd-i386", "hurd-amd64",
)  # fmt: skip
_ARCH = "|".join(re.escape(a) for a in ARCHITECTURES)
# Never ending in "-": apt-get install reads NAME- as "remove NAME".
PACKAGE_NAME = re.compile(rf"[a-z0-9][a-z0-9+.\-]{{0,126}}[a-z0-9+.](?::(?:{_ARCH}))?")
KERNEL_PACKAGE = re.compile(r"linux-image-[a-z0-9][a-z0-9+.\-]{0,115}")
LISTS = ("install", "remove", "hold", "unhold")


def check_version(value: Any, key: str) -> str:
    if not isinstance(value, str) or not valid_version(value):
        raise ValueError(
            f"{key}: {repr(value)[:80]} is not a Debian version "
            f"(EPOCH:UPSTREAM-REVISION, at most {MAX_VERSION_CHARS} characters)"
        )
    return value


def _install_list(raw: dict[str, Any]) -> list[dict[str, str | None]]:
    value = raw.get("install", [])
    if not isinstance(value, list) or len(value) > MAX_ITEMS:
        raise ValueError(f"install must be a list of at most {MAX_ITEMS} packages")
    out: dict[str, str | None] = {}
    for item in value:
        if isinstance(item, dict):
            entry = params_object(item, {"name", "version"}, frozenset({"name"}))
            name = check_name(entry["name"], PACKAGE_NAME, "package name", "install")
            version = entry.get("version")
            if version is not None:
                version = check_version(version, f"install: {name}")
        else:
            name, version = check_name(item, PACKAGE_NAME, "package name", "install"), None
        if name in out and out[name] != version:
            raise ValueError(f"install: {name} is given twice with different versions")
        out[name] = version
    return [{"name": n, "version": v} for n, v in out.items()]


def _base(name: str) -> str:
    return name.partition(":")[0]


def validate_change(raw: Any) -> dict[str, Any]:
    p = params_object(raw, {*LISTS, "purge"})
    install = _install_list(p)
    lists: dict[str, Any] = {"install": install}
    for key in LISTS[1:]:
        lists[key] = name_list(p, key, PACKAGE_NAME, "package name")
    if not any(lists.values()):
        raise ValueError("give at least one package to install, remove, hold or unhold")
    seen: dict[str, str] = {}
    for key in LISTS:
        names: list[str] = [str(e["name"]) for e in install] if key == "install" else lists[key]
        for name in names:
            other = seen.setdefault(_base(name), key)
            if other != key:
                raise ValueError(f"{_base(name)} is in both {other} and {key}")
    return {**lists, "purge": boolean(p, "purge")}


def validate_upgrade(raw: Any) -> dict[str, Any]:
    p = params_object(raw, {"security_only", "dist_upgrade"})
    return {
        "security_only": boolean(p, "security_only"),
        "dist_upgrade": boolean(p, "dist_upgrade"),
    }


def validate_upgrade_kernel(raw: Any) -> dict[str, Any]:
    p = params_object(raw, {"package", "version"})
    package = p.get("package")
    if package is not None:
        package = check_name(package, KERNEL_PACKAGE, "kernel package (linux-image-*)", "package")
    version = p.get("version")
    if version is not None:
        if package is None:
            raise ValueError("version needs package: the kernel package it is a version of")
        version = check_version(version, "version")
    return {"package": package, "version": version}


def validate_downgrade_kernel(raw: Any) -> dict[str, Any]:
    p = params_object(raw, {"package", "version"}, frozenset({"package", "version"}))
    return {
        "package": check_name(
            p["package"], KERNEL_PACKAGE, "kernel package (linux-image-*)", "package"
        ),
        "version": check_version(p["version"], "version"),
    }


_NAME_SCHEMA: dict[str, Any] = {
    "type": "string",
    "pattern": f"^{PACKAGE_NAME.pattern}$",
    "description": "a Debian package name, optionally :ARCH",
}
_VERSION_SCHEMA: dict[str, Any] = {
    "type": "string",
    "maxLength": MAX_VERSION_CHARS,
    "pattern": r"^([0-9]+:)?[0-9][A-Za-z0-9.+~:-]*$",
    "description": "a Debian version (deb-version(7))",
}
_NAMES_SCHEMA: dict[str, Any] = {
    "type": "array",
    "items": _NAME_SCHEMA,
    "maxItems": MAX_ITEMS,
    "uniqueItems": True,
}
_KERNEL_SCHEMA: dict[str, Any] = {
    "type": "string",
    "pattern": f"^{KERNEL_PACKAGE.pattern}$",
    "description": "a linux-image-* package",
}

TYPES: tuple[ActionType, ...] = (
    ActionType(
        CHANGE_PACKAGES,
        "Change packages",
        validate_change,
        {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "install": {
                    "type": "array",
                    "maxItems": MAX_ITEMS,
                    "items": {
                        "oneOf": [
                            _NAME_SCHEMA,
                            {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["name"],
                                "properties": {"name": _NAME_SCHEMA, "version": _VERSION_SCHEMA},
                            },
                        ]
                    },
                    "description": "packages to install (a version: exactly that one)",
                },
                "remove": _NAMES_SCHEMA,
                "hold": _NAMES_SCHEMA,
                "unhold": _NAMES_SCHEMA,
                "purge": {
                    "type": "boolean",
                    "default": False,
                    "description": "remove with configuration files",
                },
            },
            "minProperties": 1,
        },
        default_timeout=1800.0,
        description="install, remove, hold and unhold packages (apt-get, apt-mark)",
        tools=("apt-get", "apt-mark", "dpkg"),
    ),
    ActionType(
        UPGRADE_PACKAGES,
        "Upgrade packages",
        validate_upgrade,
        {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "security_only": {
                    "type": "boolean",
                    "default": False,
                    "description": "only upgrades from a security archive",
                },
                "dist_upgrade": {
                    "type": "boolean",
                    "default": False,
                    "description": "may install or remove packages to upgrade (dist-upgrade)",
                },
            },
        },
        default_timeout=3600.0,
        description="upgrade every package that has an upgrade (held ones stay)",
        tools=("apt-get", "dpkg"),
    ),
    ActionType(
        UPGRADE_KERNEL,
        "Upgrade kernel package",
        validate_upgrade_kernel,
        {
            "type": "object",
            "additionalProperties": False,
            "properties": {"package": _KERNEL_SCHEMA, "version": _VERSION_SCHEMA},
            "dependentRequired": {"version": ["package"]},
        },
        default_timeout=3600.0,
        description="install the newest (or the given) version of the kernel package; "
        "without a package, upgrade every installed linux-image-* package",
        tools=("apt-get", "dpkg"),
    ),
    ActionType(
        DOWNGRADE_KERNEL,
        "Downgrade kernel package",
        validate_downgrade_kernel,
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["package", "version"],
            "properties": {"package": _KERNEL_SCHEMA, "version": _VERSION_SCHEMA},
        },
        default_timeout=3600.0,
        description="install an older version of the kernel package",
        tools=("apt-get", "dpkg"),
    ),
)
