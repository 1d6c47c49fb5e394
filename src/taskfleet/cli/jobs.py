"""``taskfleet job``: multi-phase jobs (create, list, show, terminate; docs/jobs.md).

Contract: talks to the admin API only (``/jobs``; ``--cron`` makes a schedule whose
request is of type ``job``). The items file is TOML, read here with ``tomllib``: a
file that cannot make a job is refused before anything is sent, with the item and
field that are wrong; the server checks the whole again (and the content hashes).
The lifecycle options are ``taskfleet run``'s (``cli/requests.py``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from taskfleet.cli.client import Api, client_options
from taskfleet.cli.lifecycle import lifecycle_fields, lifecycle_options, schedule
from taskfleet.cli.options import FINITE_FLOAT, seconds_arg
from taskfleet.cli.output import echo, emit, fail, print_fields, print_table, state_label, when

_ACTIONS = ("install", "uninstall", "remediate")
_ITEM_KEYS = {"name", "detect", "content", *_ACTIONS}
_CONTENT_KEYS = {"sha256", "size", "name"}
_DONE = {"succeeded", "failed", "canceled", "terminated"}  # job states that do not change


def load_items(path: Path) -> list[dict[str, Any]]:
    """The ``[[items]]`` of a TOML file, checked enough to name what is wrong (the item
    and the field); the server checks every rule again."""
    import tomllib

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        fail(f"{path} is not valid TOML: {exc}")
    extra = set(data) - {"items"}
    if extra:
        fail(f"{path}: unknown top-level key(s) {', '.join(sorted(extra))} (only [[items]])")
    items = data.get("items")
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        fail(f"{path}: expects one or more [[items]] tables")
    for i, item in enumerate(items):
        name = item.get("name")
        where = f"{path}: item {i}" + (f" ({name})" if isinstance(name, str) and name else "")
        if not isinstance(name, str) or not name.strip():
            fail(f"{where}: 'name' must be a non-empty string")
        unknown = set(item) - _ITEM_KEYS
        if unknown:
            fail(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        for key in ("detect", *_ACTIONS):
            if key in item:
                _check_command(item[key], f"{where}: {key}")
        content = item.get("content", [])
        if not isinstance(content, list):
            fail(f"{where}: 'content' must be a list of {{sha256 = ...}} tables")
        for k, ref in enumerate(content):
            _check_content(ref, f"{where}: content {k}")
    return items


def _check_command(raw: Any, where: str) -> None:
    if not isinstance(raw, dict):
        fail(f'{where} must be a table: {{argv = [...]}} or {{script = "..."}}')
    argv, script = raw.get("argv"), raw.get("script")
    if (argv is None) == (script is None):
        fail(f"{where} needs exactly one of argv or script")
    if argv is not None and (
        not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv)
    ):
        fail(f"{where}: argv must be a non-empty list of strings")
    if script is not None and not isinstance(script, str):
        fail(f"{where}: script must be a string")
    timeout = raw.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)):
        fail(f"{where}: timeout must be a number of seconds")


def _check_content(ref: Any, where: str) -> None:
    if not isinstance(ref, dict):
        fail(f'{where} must be a table {{sha256 = "..."}}')
    unknown = set(ref) - _CONTENT_KEYS
    if unknown:
        fail(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    sha = ref.get("sha256")
    if not isinstance(sha, str) or len(sha) != 64 or set(sha) - set("0123456789abcdef"):
        fail(f"{where}: sha256 must be 64 lowercase hex digits")
    if "size" in ref and (isinstance(ref["size"], bool) or not isinstance(ref["size"], int)):
        fail(f"{where}: size must be an integer (bytes)")
    if "name" in ref and not isinstance(ref["name"], str):
        fail(f"{where}: name must be a string (a relative file name)")


@click.group()
def job() -> None:
    """Multi-phase jobs: analyze, download, then install (or uninstall, remediate)."""


@job.command("create")
@click.option("--name", required=True, help="The job's name.")
@click.option(
    "--target", required=True, help="all | group:NAME | tag:KEY=VALUE | computer:ID[,ID...]"
)
@click.option(
    "--items",
    "items_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML file of [[items]]: name, detect, content, install|uninstall|remediate.",
)
@click.option(
    "--phases",
    default="analyze,download,install",
    show_default=True,
    help="Comma-separated, in order: analyze, download, then install|uninstall|remediate.",
)
@click.option(
    "--timeout",
    type=FINITE_FLOAT,
    default=None,
    help="Seconds the server waits between two reports of a computer before it declares "
    "it lost [default: the longest step's timeout].",
)
@lifecycle_options
@client_options
def job_create(
    name: str,
    target: str,
    items_file: Path,
    phases: str,
    timeout: float | None,
    cron: str | None,
    server: str | None,
    token: str | None,
    as_json: bool,
    **lifecycle: Any,
) -> None:
    """Create a job on target computers (--at, --cron, --approval, rollouts as for run)."""
    items = load_items(items_file)
    phase_list = [p.strip() for p in phases.split(",") if p.strip()]
    api = Api(server, token)
    fields = lifecycle_fields(**lifecycle)
    if cron is not None:
        params = {"name": name, "phases": phase_list, "items": items}
        body = {"type": "job", "target": target, "params": params, "timeout": timeout, **fields}
        schedule(api, cron, body, as_json)
        return
    body = {
        "name": name,
        "target": target,
        "phases": phase_list,
        "items": items,
        "timeout": timeout,
        **fields,
    }
    out = api.post("/jobs", body)
    emit(
        out,
        as_json,
        lambda d: echo(
            f"job {d['id']} created ({d['state']}): {d['total']} computers; "
            f"follow it with: taskfleet job show {d['id']} --watch"
        ),
    )


def _counts(d: dict[str, Any]) -> str:
    return ", ".join(f"{state_label(k)} {v}" for k, v in d["counts"].items())


def _terminate_text(t: dict[str, Any] | None) -> str:
    if not t:
        return "-"
    text = f"by {t['by']} at {when(t['at'])}: {t['reason']}"
    if t.get("terminated_at"):
        text += f"; all stopped at {when(t['terminated_at'])}"
    else:
        text += f"; waits until {when(t['deadline'])}"
    return text


_JOB_COLS = ["id", "name", "state", "computers", "states", "created", "terminated"]


def _job_row(d: dict[str, Any]) -> list[Any]:
    return [
        d["id"],
        d["name"],
        state_label(d["state"]),
        d["total"],
        _counts(d),
        when(d["created_at"]),
        _terminate_text(d["terminate"]),
    ]


@job.command("list")
@click.option("--limit", type=int, default=50, show_default=True)
@client_options
def job_list(limit: int, server: str | None, token: str | None, as_json: bool) -> None:
    """Recent jobs with their state and counts per activity state."""
    rows = Api(server, token).get("/jobs", limit=limit)
    emit(rows, as_json, lambda rs: print_table("jobs", _JOB_COLS, [_job_row(d) for d in rs]))


def show_job(d: dict[str, Any]) -> None:
    """A job as tables: its fields, its computers, then every step per computer."""
    fields = [
        ("state", state_label(d["state"])),
        ("target", d["target"]),
        ("phases", ", ".join(d["phases"])),
        ("items", ", ".join(f"{it['index']}: {it['name']}" for it in d["items"])),
        ("computers", f"{d['total']} ({_counts(d)})"),
        ("created", f"{when(d['created_at'])} by {d['created_by']}"),
    ]
    if d.get("schedule_id"):
        fields.append(("schedule", d["schedule_id"]))
    if d["terminate"]:
        fields.append(("terminated", _terminate_text(d["terminate"])))
    if d["waiting_for"]:
        shown = ", ".join(f"{c['computer_id']} ({c['hostname']})" for c in d["waiting_for"])
        fields.append(("waits for", shown))
    print_fields(f"job {d['id']}: {d['name']}", fields)
    print_table(
        "computers",
        ["computer", "hostname", "state", "current step", "result"],
        [
            [
                c["computer_id"],
                c["hostname"],
                state_label(c["state"]),
                _step_text(c["step"]),
                c["result_line"] or c["reason"],
            ]
            for c in d["computers"]
        ],
    )
    rows = [
        [
            c["computer_id"],
            s["phase"],
            f"{s['item']}: {s['item_name']}",
            s["status"],
            s["detail"],
            when(s["at"]),
        ]
        for c in d["computers"]
        for s in _ordered(d, c["steps"])
    ]
    if rows:
        print_table("steps", ["computer", "phase", "item", "status", "detail", "at"], rows)


def _step_text(s: dict[str, Any] | None) -> str:
    return "-" if s is None else f"{s['phase']} {s['item']} ({s['item_name']}): {s['status']}"


def _ordered(d: dict[str, Any], steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Steps in the job's order: phase by phase, item by item."""
    rank = {p: i for i, p in enumerate(d["phases"])}
    return sorted(steps, key=lambda s: (rank.get(s["phase"], 99), s["item"]))


@job.command("show")
@click.argument("job_id", type=int)
@click.option("--watch", is_flag=True, help="Refresh until the job is finished.")
@click.option(
    "--every", default="2s", show_default=True, help="With --watch: time between refreshes."
)
@client_options
def job_show(
    job_id: int, watch: bool, every: str, server: str | None, token: str | None, as_json: bool
) -> None:
    """A job per computer, per phase, per item: states, steps and termination."""
    api = Api(server, token)
    pause = seconds_arg(every, "--every")
    while True:
        d = api.poll(f"/jobs/{job_id}") if watch else api.get(f"/jobs/{job_id}")
        if watch and not as_json and sys.stdout.isatty():
            click.clear()
        emit(d, as_json, show_job)
        if not watch or d["state"] in _DONE:
            return
        time.sleep(pause)  # the refresh the user asked for, not a wait for a condition


@job.command("terminate")
@click.argument("job_id", type=int)
@click.option("--reason", default="", help="Why: kept with who and when.")
@click.option(
    "--wait",
    "wait",
    default=None,
    help="How long to wait for computers still running it (90, 10m, 2h) before they are "
    "recorded unreachable [default: the server's, 24h].",
)
@client_options
def job_terminate(
    job_id: int,
    reason: str,
    wait: str | None,
    server: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Stop a job safely: computers not started never start, running ones finish the
    item they are on and skip the rest."""
    body: dict[str, Any] = {"reason": reason}
    if wait is not None:
        body["wait"] = seconds_arg(wait, "--wait")
    d = Api(server, token).post(f"/jobs/{job_id}/terminate", body)

    def text(d: dict[str, Any]) -> None:
        call = d["terminate_call"]
        if call["already_terminating"]:
            echo(f"job {job_id} was already terminating ({_terminate_text(d['terminate'])})")
        else:
            echo(
                f"job {job_id} {state_label(d['state'])}: {len(call['canceled'])} computers "
                f"had not started (Canceled), {len(call['ordered'])} told to stop"
            )
        if d["waiting_for"]:
            shown = ", ".join(f"{c['computer_id']} ({c['hostname']})" for c in d["waiting_for"])
            echo(f"waits for: {shown}")

    emit(d, as_json, text)
