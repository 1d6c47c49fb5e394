"""``taskfleet computer``: enrolled computers (list, show, remove, identity-reset).

Contract: talks to the admin API only (``/computers``); removing asks (or wants
--yes) first. ``show`` prints the computer's inventory (OS, kernel, CPU, memory,
disks, addresses, counts of packages, users and groups, pending upgrades with
the security ones marked) and, with ``--packages``, every package (read page
by page from ``/computers/ID/packages``). Tags are set through ``taskfleet
group tag`` (cli/groups.py).
"""

from __future__ import annotations

import sys
from typing import Any

import click

from taskfleet.cli.client import Api, client_options
from taskfleet.cli.output import (
    clean,
    echo,
    emit,
    fail,
    print_fields,
    print_table,
    state_label,
    when,
)


@click.group()
def computer() -> None:
    """Enrolled computers."""


@computer.command("list")
@click.option(
    "--removed", is_flag=True, help="The removed computers instead (records and history kept)."
)
@client_options
def computer_list(removed: bool, server: str | None, token: str | None, as_json: bool) -> None:
    """List enrolled computers (or, with --removed, those taken off the fleet)."""
    rows = Api(server, token).get("/computers", **({"removed": "true"} if removed else {}))
    emit(
        rows,
        as_json,
        lambda rs: print_table(
            "removed computers" if removed else "computers",
            [
                "id",
                "hostname",
                "removed" if removed else "last seen",
                "address",
                "scripts",
                "groups",
                "tags",
                "identity",
            ],
            [
                [
                    c["id"],
                    c["hostname"],
                    when(c["removed_at"] if removed else c["last_seen_at"]),
                    c["address"],
                    "yes" if (c["policy"] or {}).get("scripts") else "no",
                    ",".join(c["groups"]),
                    ",".join(f"{k}={v}" for k, v in c["tags"].items()),
                    "CONFLICT" if c.get("identity_conflict") else "ok",
                ]
                for c in rs
            ],
        ),
    )


@computer.command("show")
@click.argument("computer_id", type=int)
@click.option("--packages", "with_packages", is_flag=True, help="List every installed package.")
@client_options
def computer_show(
    computer_id: int, with_packages: bool, server: str | None, token: str | None, as_json: bool
) -> None:
    """Show a computer, its inventory and its recent activities."""
    api = Api(server, token)
    c = api.get(f"/computers/{computer_id}")
    if with_packages:
        c["package_list"] = _all_packages(api, computer_id)

    def table(c: dict[str, Any]) -> None:
        print_fields(
            f"computer {c['id']}",
            [
                ("hostname", c["hostname"]),
                ("enrolled", when(c["enrolled_at"])),
                ("last seen", when(c["last_seen_at"])),
                ("address", c["address"]),
                ("tickle port", c["tickle_port"]),
                ("agent", c["agent_version"]),
                ("generation", c["generation"]),
                ("removed", when(c["removed_at"]) if c.get("removed_at") else None),
                *_conflict_fields(c.get("identity_conflict")),
                *_policy_fields(c.get("policy")),
                ("groups", ", ".join(c["groups"])),
                ("tags", ", ".join(f"{k}={v}" for k, v in c["tags"].items())),
            ],
        )
        print_table(
            "recent activities",
            ["id", "request", "state", "exit", "result"],
            [
                [
                    a["id"],
                    a["request_id"],
                    state_label(a["state"]),
                    a["exit_code"],
                    a["result_line"] or a["reason"],
                ]
                for a in c["activities"]
            ],
        )
        print_inventory(c.get("inventory"))
        if "package_list" in c:
            print_table(
                "packages",
                ["name", "arch", "version", "held", "upgrade"],
                [
                    [r["name"], r["arch"], r["version"], "held" if r["held"] else "", _upgrade(r)]
                    for r in c["package_list"]
                ],
            )

    emit(c, as_json, table)


def _conflict_fields(conflict: dict[str, Any] | None) -> list[tuple[str, Any]]:
    if not conflict:
        return []
    return [
        ("IDENTITY CONFLICT", when(conflict["at"])),
        ("why", conflict["reason"]),
        ("no work runs", "until: taskfleet computer identity-reset ID (or remove it)"),
    ]


def _policy_fields(policy: Any) -> list[tuple[str, Any]]:
    """What the computer's agent reports of its own configuration, readably."""
    if not isinstance(policy, dict):
        return [("policy", "not reported yet")]
    users = ", ".join(map(str, policy.get("users") or [])) or "none"
    cannot = policy.get("unsupported") or {}
    return [
        ("scripts", f"yes (as {users})" if policy.get("scripts") else "no"),
        ("runs", ", ".join(map(str, policy.get("types") or [])) or "nothing"),
        *(
            [("cannot run", "; ".join(f"{k} ({v})" for k, v in sorted(cannot.items())))]
            if isinstance(cannot, dict) and cannot
            else []
        ),
    ]


def _all_packages(api: Api, computer_id: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    while True:
        after = rows[-1]["name"] if rows else ""
        page = api.get(f"/computers/{computer_id}/packages", after=after, limit=5000)
        rows += page
        if len(page) < 5000:
            return rows


def _upgrade(r: dict[str, Any]) -> str:
    if not r.get("upgrade_version"):
        return ""
    return str(r["upgrade_version"]) + (" (security)" if r.get("security") else "")


def print_inventory(inv: dict[str, Any] | None) -> None:
    """The inventory part of ``computer show`` (None: not reported yet)."""
    if inv is None:
        echo("inventory: not reported yet")
        return
    os_ = inv.get("os") or {}
    cpu = inv.get("cpu") or {}
    mem = inv.get("memory") or {}
    ups = inv.get("upgrades") or []
    security = [u for u in ups if u.get("security")]
    print_fields(
        "inventory",
        [
            ("os", os_.get("pretty_name") or f"{os_.get('id', '')} {os_.get('version_id', '')}"),
            ("kernel", (inv.get("kernel") or {}).get("release")),
            ("cpu", f"{cpu.get('count', '?')} x {cpu.get('model') or '?'}" if cpu else None),
            ("memory", _size(mem["total_kb"] * 1024) if "total_kb" in mem else None),
            ("disks", "; ".join(_disk(d) for d in inv.get("disks") or []) or None),
            ("addresses", "; ".join(_addresses(n) for n in inv.get("network") or []) or None),
            ("packages", f"{inv.get('packages', 0)} installed"),
            ("upgrades", f"{len(ups)} pending, {len(security)} security"),
            ("security", ", ".join(u["name"] for u in security) or None),
            ("users", len(inv["users"]) if "users" in inv else None),
            ("groups", len(inv["groups"]) if "groups" in inv else None),
            ("updated", when(inv.get("updated_at"))),
            (
                "not read",
                "; ".join(f"{k}: {v}" for k, v in (inv.get("missing") or {}).items()) or None,
            ),
            ("refused", inv.get("problem")),
        ],
    )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _disk(d: dict[str, Any]) -> str:
    return (
        f"{d.get('mount')} {d.get('fs')} {_size(d.get('size') or 0)} {d.get('used_percent')}% used"
    )


def _addresses(n: dict[str, Any]) -> str:
    return f"{n.get('interface') or '?'} {' '.join(n.get('addresses') or []) or '-'}"


@computer.command("remove")
@click.argument("computer_id", type=int)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@client_options
def computer_remove(
    computer_id: int, yes: bool, server: str | None, token: str | None, as_json: bool
) -> None:
    """Remove a computer (admin): its open work is Canceled, its credentials stop working.

    Its history stays readable (taskfleet activity list --computer ID); enrolling
    the machine again brings it back."""
    api = Api(server, token)
    c = api.get(f"/computers/{computer_id}")
    if c.get("removed_at"):
        fail(f"computer {computer_id} was already removed")
    if not yes:
        if not sys.stdin.isatty():
            fail(f"this removes computer {computer_id}; add --yes to do it")
        click.confirm(
            f"remove computer {computer_id} ({clean(c['hostname'])}) and cancel its open work?",
            abort=True,
        )
    out = api.call("DELETE", f"/computers/{computer_id}")
    emit(
        out,
        as_json,
        lambda d: echo(
            f"computer {d['id']} ({clean(d['hostname'])}) removed; "
            f"{len(d['canceled'])} open activities canceled"
        ),
    )


@computer.command("identity-reset")
@click.argument("computer_id", type=int)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@client_options
def computer_identity_reset(
    computer_id: int, yes: bool, server: str | None, token: str | None, as_json: bool
) -> None:
    """Reset a computer's identity (admin) after two agents used it (a copied state
    folder): the flag is cleared and the next agent that exchanges with its secret
    starts a new lineage. Stop the copy first: if it still runs, it is caught again.

    Removing the computer (and enrolling the machine again) is the other way."""
    api = Api(server, token)
    c = api.get(f"/computers/{computer_id}")
    if not yes:
        if not sys.stdin.isatty():
            fail(f"this resets the identity of computer {computer_id}; add --yes to do it")
        flagged = "flagged" if c.get("identity_conflict") else "not flagged"
        click.confirm(
            f"reset the identity of computer {computer_id} ({clean(c['hostname'])}, {flagged})?",
            abort=True,
        )
    out = api.post(f"/computers/{computer_id}/identity", {"decision": "reset"})
    emit(
        out,
        as_json,
        lambda d: echo(
            f"computer {d['id']}: identity reset"
            + ("" if d["was_flagged"] else " (it was not flagged)")
            + "; the next agent to exchange with its secret carries on"
        ),
    )
