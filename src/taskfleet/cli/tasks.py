"""``taskfleet task``: server tasks (submit, approve, reject, list, show, cancel, types).

Contract: talks to the admin API only (``/tasks``, ``/task-types``).
"""

from __future__ import annotations

from typing import Any

import click

from taskfleet.cli.client import Api, acting_tenant, client_options
from taskfleet.cli.options import seconds_arg, when_arg
from taskfleet.cli.output import echo, emit, fail, print_fields, print_table, state_label, when


@click.group()
def task() -> None:
    """Server tasks: submit, list, show, cancel (run by workers under the batch scheduler)."""


_TASK_COLS = ["id", "task", "state", "scope", "dispatched", "worker", "result / waiting for"]


def _task_row(t: dict[str, Any]) -> list[Any]:
    scope = (
        (t.get("group_name") and f"group:{t['group_name']}")
        or (t.get("scope_tenant") and f"tenant:{t['scope_tenant']}")
        or "-"
    )
    return [
        t["id"],
        t["name"],
        state_label(t["state"]),
        scope,
        when(t["dispatched_at"]),
        t["claimed_by"],
        t.get("result_line") or t.get("waiting_for") or t.get("reason"),
    ]


@task.command("submit")
@click.argument("type_name", metavar="TYPE")
@click.option("--group", default=None)
@click.option("--param", "params", multiple=True, help="K=V (repeatable).")
@click.option("--not-before", default=None, help="Epoch seconds, ISO time or +DURATION.")
@click.option("--approval", is_flag=True, help="Blocked until an admin approves it.")
@click.option("--separate-approver", is_flag=True, help="The submitter may not approve.")
@click.option("--approval-expires-in", default=None, help="Canceled if not approved by (2h).")
@click.option("--after", "after_task", type=int, default=None, help="Wait for this task.")
@click.option(
    "--after-metric",
    type=click.Choice(["finished", "succeeded"]),
    default="finished",
    show_default=True,
)
@client_options
def task_submit(
    type_name: str,
    group: str | None,
    params: tuple[str, ...],
    not_before: str | None,
    approval: bool,
    separate_approver: bool,
    approval_expires_in: str | None,
    after_task: int | None,
    after_metric: str,
    server: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Submit a server task; a duplicate of a waiting one is not queued again."""
    values: dict[str, str] = {}
    for pair in params:
        k, eq, v = pair.partition("=")
        if not eq or not k:
            fail(f"--param expects K=V, got {pair!r}")
        values[k] = v
    out = Api(server, token).post(
        "/tasks",
        {
            "type": type_name,
            # A tenant-scoped type's tenant: --tenant (client_options), the caller's own.
            "tenant": acting_tenant(),
            "group": group,
            "params": values,
            "not_before": when_arg(not_before),
            "approval": {
                "separation": separate_approver,
                "expires_in": seconds_arg(approval_expires_in, "--approval-expires-in")
                if approval_expires_in
                else None,
            }
            if approval or separate_approver or approval_expires_in
            else None,
            "after": {"task": after_task, "metric": after_metric} if after_task else None,
        },
    )

    def human(d: dict[str, Any]) -> None:
        t = d["task"]
        if d["duplicate_of"] is not None:
            echo(f"duplicate of {t['name']} ({state_label(t['state'])}): not queued again")
        else:
            echo(f"submitted {t['name']} ({state_label(t['state'])})")

    emit(out, as_json, human)


@task.command("approve")
@click.argument("task_id", type=int)
@client_options
def task_approve(task_id: int, server: str | None, token: str | None, as_json: bool) -> None:
    """Approve a Blocked task (admin; maybe not its submitter)."""
    t = Api(server, token).post(f"/tasks/{task_id}/approve")
    emit(t, as_json, lambda t: echo(f"{t['name']} approved: {state_label(t['state'])}"))


@task.command("reject")
@click.argument("task_id", type=int)
@click.option("--reason", default="")
@client_options
def task_reject(
    task_id: int, reason: str, server: str | None, token: str | None, as_json: bool
) -> None:
    """Reject a Blocked task: it is Canceled."""
    t = Api(server, token).post(f"/tasks/{task_id}/reject", {"reason": reason})
    emit(t, as_json, lambda t: echo(f"{t['name']} rejected: {state_label(t['state'])}"))


@task.command("list")
@click.option("--state", default=None)
@click.option("--type", "type_name", default=None)
@click.option("--limit", type=int, default=100, show_default=True)
@client_options
def task_list(
    state: str | None,
    type_name: str | None,
    limit: int,
    server: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """List server tasks, newest first."""
    rows = Api(server, token).get("/tasks", state=state, type=type_name, limit=limit)
    emit(rows, as_json, lambda rs: print_table("tasks", _TASK_COLS, [_task_row(t) for t in rs]))


@task.command("show")
@click.argument("task_id", type=int)
@client_options
def task_show(task_id: int, server: str | None, token: str | None, as_json: bool) -> None:
    """Show one server task."""
    t = Api(server, token).get(f"/tasks/{task_id}")

    def human(t: dict[str, Any]) -> None:
        print_fields(
            t["name"],
            [
                ("state", state_label(t["state"])),
                ("params", t["params"]),
                ("tenant", t["scope_tenant"]),
                ("group", t["group_name"]),
                ("not before", when(t["not_before"])),
                ("dispatched", when(t["dispatched_at"])),
                ("worker", t["claimed_by"]),
                ("command line", t["command_line"]),
                ("waiting for", t.get("waiting_for")),
                ("result", t["result_line"]),
                ("return code", t["exit_code"]),
                ("reason", t["reason"]),
                *(
                    [("slot", "held: canceled, its worker has not confirmed the stop yet")]
                    if t.get("stopping")
                    else []
                ),
            ],
        )
        if t.get("stdout"):
            echo(f"--- output ---\n{t['stdout'].rstrip()}")

    emit(t, as_json, human)


@task.command("cancel")
@click.argument("task_id", type=int)
@click.option("--reason", default="")
@client_options
def task_cancel(
    task_id: int, reason: str, server: str | None, token: str | None, as_json: bool
) -> None:
    """Cancel a server task; a running one is stopped by its worker.

    A task In Progress is Canceled at once and its worker is told to stop it; it
    keeps its slot (its type's limit) until the worker confirms the stop."""
    t = Api(server, token).post(f"/tasks/{task_id}/cancel", {"reason": reason})

    def human(d: dict[str, Any]) -> None:
        line = f"{d['name']}: {state_label(d['state'])}"
        if d.get("stop_requested_at") is not None:
            line += f" ({d['reason']})"
        echo(line)

    emit(t, as_json, human)


@task.command("types")
@client_options
def task_types_cmd(server: str | None, token: str | None, as_json: bool) -> None:
    """List the declared server task types."""
    rows = Api(server, token).get("/task-types")
    emit(
        rows,
        as_json,
        lambda rs: print_table(
            "task types",
            ["name", "scope", "kind", "limit", "time limit", "excludes", "retry"],
            [
                [
                    r["name"],
                    r["scope"],
                    r["kind"],
                    r["concurrency"] or "-",
                    f"{r['time_limit']:g}s",
                    ",".join(r["excludes"]),
                    r["retry_safe"],
                ]
                for r in rs
            ],
        ),
    )
