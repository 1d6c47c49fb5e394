"""Tests for taskfleet.worker.handlers: declarations, parameters, templates and handlers."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import threading
import time
from pathlib import Path

import pytest

from taskfleet.agent.executor import TRUNCATION_MARKER
from taskfleet.worker.handlers import (
    HandlerResult,
    StopRequest,
    TaskTypeError,
    TaskTypeSpec,
    load_task_types,
    render_command,
    resolve_callable,
    run_handler,
    validate_params,
)

ME = __name__  # callables below are referenced as "MODULE:NAME"
PY = shlex.quote(sys.executable).replace("{", "{{").replace("}", "}}")
EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "task-types.example.toml"
GRACE = 0.2


# --- callables referenced as f"{ME}:NAME" -----------------------------


def sync_echo(params, context):
    return {"return_code": 0, "output": f"{context['task_id']}:{params['n'] * 2}"}


async def async_echo(params, context):
    await asyncio.sleep(0)
    return f"async {params['word']}"


def returns_code(params, context):
    return 3


def returns_none(params, context):
    return None


def returns_bad(params, context):
    return [1, 2]


def raises(params, context):
    raise RuntimeError("disk on fire")


async def async_raises(params, context):
    raise KeyError("missing")


def calls_exit(params, context):
    sys.exit(4)


def returns_coroutine(params, context):
    return async_echo({"word": "via sync"}, context)


def big_output(params, context):
    return "x" * 5000


state: dict[str, object] = {}


async def async_forever(params, context):
    state["started"] = True
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        state["cancelled"] = True
        raise


async def async_stubborn(params, context):
    release: asyncio.Event = state["release"]  # type: ignore[assignment]
    while not release.is_set():
        try:
            await release.wait()
        except asyncio.CancelledError:
            state["ignored"] = True


def sync_blocking(params, context):
    gate: threading.Event = state["gate"]  # type: ignore[assignment]
    gate.wait(30)
    state["thread_done"] = True
    return 0


class Holder:
    class Inner:
        @staticmethod
        def method(params, context):
            return "nested"


NOT_CALLABLE = 42


@pytest.fixture(autouse=True)
def _clean_state():
    state.clear()
    yield
    gate = state.get("gate")
    if isinstance(gate, threading.Event):
        gate.set()  # never leave a handler thread blocked


# --- helpers -----------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "task-types.toml"
    path.write_text(text)
    return path


def spec(**kw) -> TaskTypeSpec:
    base = {"name": "t", "scope": "none", "handler": f"{ME}:returns_none", "kind": "callable"}
    base.update(kw)
    return TaskTypeSpec(**base)


def command(template: str, **kw) -> TaskTypeSpec:
    return spec(handler=template, kind="command", **kw)


CTX = {"task_id": "42", "type": "t", "tenant": None, "group": None}

GOOD = """
[types.export-table]
description = "dump"
command = "pg_dump --table={table} -f '/tmp/out {task_id}.sql'"
scope = "none"
time_limit = 90.5
concurrency = 2
retry_safe = true
[types.export-table.params]
table = "str"

[types.rebuild]
callable = "mysite.reports:rebuild"
scope = "tenant"
[types.rebuild.params]
month = "str"
full = "bool"
[types.rebuild.defaults]
full = "no"

[types.purge]
callable = "mysite.purge:run"
scope = "tenant"
per_tenant = true
concurrency = 1
excludes = ["rebuild", "builtin-import"]
"""

BUILTIN = TaskTypeSpec(
    name="builtin-import", scope="none", handler="taskfleet.worker.builtin:imp", kind="callable"
)


# --- loading -----------------------------------------------------------------------------


def test_loads_a_good_file_with_defaults_and_builtins(tmp_path):
    types = load_task_types(write(tmp_path, GOOD), builtins=[BUILTIN])
    assert list(types) == ["builtin-import", "export-table", "rebuild", "purge"]
    export = types["export-table"]
    assert export.kind == "command"
    assert export.handler.startswith("pg_dump")
    assert export.time_limit == 90.5
    assert export.concurrency == 2
    assert export.retry_safe is True
    assert export.params == {"table": "str"}
    assert export.description == "dump"
    rebuild = types["rebuild"]
    assert rebuild.kind == "callable"
    assert rebuild.time_limit == 3600.0
    assert rebuild.concurrency is None
    assert rebuild.per_tenant is False
    assert rebuild.excludes == ()
    assert rebuild.defaults == {"full": False}
    purge = types["purge"]
    assert purge.per_tenant is True
    assert purge.excludes == ("rebuild", "builtin-import")


def test_no_path_gives_only_builtins():
    assert load_task_types(None, [BUILTIN]) == {"builtin-import": BUILTIN}
    assert load_task_types(None) == {}


def test_empty_file_gives_only_builtins(tmp_path):
    assert load_task_types(write(tmp_path, ""), [BUILTIN]) == {"builtin-import": BUILTIN}


def test_the_documented_example_loads():
    types = load_task_types(EXAMPLE)
    assert set(types) == {"export-table", "rebuild-license-report", "purge-history"}
    assert types["purge-history"].concurrency == 1
    assert types["purge-history"].per_tenant is True
    assert types["purge-history"].excludes == ("rebuild-license-report",)
    argv = render_command(
        types["export-table"].handler,
        validate_params(types["export-table"], {"table": "hosts"}),
        {"task_id": "7", "type": "export-table"},
    )
    assert "--table=hosts" in argv
    assert "--compress=6" in argv


OK_TYPE = '[types.{name}]\ncallable = "m.od:fn"\nscope = "none"\n'


@pytest.mark.parametrize(
    ("body", "type_name", "field", "words"),
    [
        ('[types.a]\nscope = "none"\n', "a", "callable / command", "missing handler"),
        (
            '[types.a]\ncallable = "m:f"\ncommand = "ls"\nscope = "none"\n',
            "a",
            "callable / command",
            "both",
        ),
        ('[types."Bad Name"]\ncallable = "m:f"\nscope = "none"\n', "Bad Name", "name", "invalid"),
        ('[types.a]\ncallable = "m:f"\nscope = "world"\n', "a", "scope", "'world'"),
        ('[types.a]\ncallable = "m:f"\n', "a", "scope", "missing"),
        ('[types.a]\ncallable = "m:f"\nscope = "none"\ntime_limit = -5\n', "a", "time_limit", "-5"),
        ('[types.a]\ncallable = "m:f"\nscope = "none"\ntime_limit = 0\n', "a", "time_limit", "> 0"),
        (
            '[types.a]\ncallable = "m:f"\nscope = "none"\ntime_limit = "1h"\n',
            "a",
            "time_limit",
            "'1h'",
        ),
        ('[types.a]\ncallable = "m:f"\nscope = "none"\nconcurrency = 0\n', "a", "concurrency", "0"),
        (
            '[types.a]\ncallable = "m:f"\nscope = "none"\nconcurency = 1\n',
            "a",
            "concurency",
            "did you mean 'concurrency'",
        ),
        (
            '[types.a]\ncallable = "m:f"\nscope = "none"\nexcludes = ["nope"]\n',
            "a",
            "excludes",
            "'nope'",
        ),
        (
            '[types.a]\ncallable = "m:f"\nscope = "none"\nexcludes = "b"\n',
            "a",
            "excludes",
            "list",
        ),
        (
            '[types.a]\ncallable = "m:f"\nscope = "none"\nexcludes = ["a"]\n',
            "a",
            "excludes",
            "itself",
        ),
        ('[types.a]\ncallable = "not a ref"\nscope = "none"\n', "a", "callable", "module"),
        ('[types.a]\ncallable = "m:f"\nscope = "none"\nper_tenant = 1\n', "a", "per_tenant", "1"),
        (
            '[types.a]\ncallable = "m:f"\nscope = "group"\nper_tenant = true\n',
            "a",
            "per_tenant",
            "tenant",
        ),
        (
            '[types.a]\ncallable = "m:f"\nscope = "none"\nretry_safe = "yes"\n',
            "a",
            "retry_safe",
            "",
        ),
        (
            '[types.a]\ncallable = "m:f"\nscope = "none"\n[types.a.params]\nn = "integer"\n',
            "a",
            "params.n",
            "'integer'",
        ),
        (
            '[types.a]\ncallable = "m:f"\nscope = "none"\n[types.a.params]\ntask_id = "str"\n',
            "a",
            "params.task_id",
            "reserved",
        ),
        (
            '[types.a]\ncallable = "m:f"\nscope = "none"\n[types.a.params]\nn = "int"\n'
            '[types.a.defaults]\nn = "many"\n',
            "a",
            "defaults.n",
            "integer",
        ),
        (
            '[types.a]\ncallable = "m:f"\nscope = "none"\n[types.a.defaults]\nn = 1\n',
            "a",
            "defaults.n",
            "not a declared",
        ),
        ('[types.a]\ncommand = "ls {path}"\nscope = "none"\n', "a", "command", "{path}"),
        ('[types.a]\ncommand = "ls {tenant}"\nscope = "none"\n', "a", "command", "no tenant"),
        ('[types.a]\ncommand = "{prog} -x"\nscope = "none"\n', "a", "command", "executable"),
        ('[types.a]\ncommand = "echo \'unclosed"\nscope = "none"\n', "a", "command", "split"),
        ('[types.a]\ncommand = "echo {x"\nscope = "none"\n', "a", "command", "literal"),
        ('[types.a]\ncommand = "   "\nscope = "none"\n', "a", "command", "empty"),
        (
            '[types.a]\ncommand = "ls"\nscope = "none"\n[types.a.params]\npath = "str"\n',
            "a",
            "params.path",
            "never uses",
        ),
        (
            '[types.builtin-import]\ncallable = "m:f"\nscope = "none"\n',
            "builtin-import",
            None,
            "built-in",
        ),
        ("[types]\na = 3\n", "a", None, "table"),
        (
            '[types.a]\ncallable = "m:f"\nscope = "none"\n[types.a.params]\nn = "str"\n'
            "[types.a.ranges]\nn = [0, 1]\n",
            "a",
            "ranges.n",
            "not a declared int or float",
        ),
        (
            '[types.a]\ncallable = "m:f"\nscope = "none"\n[types.a.params]\nn = "int"\n'
            "[types.a.ranges]\nn = [5, 1]\n",
            "a",
            "ranges.n",
            "min <= max",
        ),
        (
            '[types.a]\ncallable = "m:f"\nscope = "none"\n[types.a.params]\nn = "int"\n'
            "[types.a.ranges]\nn = [0, 9]\n[types.a.defaults]\nn = 10\n",
            "a",
            "defaults.n",
            "between 0 and 9",
        ),
    ],
)
def test_bad_declaration_names_file_type_and_field(tmp_path, body, type_name, field, words):
    path = write(tmp_path, body)
    with pytest.raises(TaskTypeError) as info:
        load_task_types(path, builtins=[BUILTIN])
    err = info.value
    message = str(err)
    assert err.path == str(path)
    assert err.type_name == type_name
    assert err.field == field
    assert str(path) in message
    assert repr(type_name) in message
    if field:
        assert field in message
    assert words in message


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, '[types.a]\ncallable = "m:f"\nscope = \n')
    with pytest.raises(TaskTypeError, match="not valid TOML") as info:
        load_task_types(path)
    assert str(path) in str(info.value)
    assert "line 3" in str(info.value)


def test_unknown_top_level_key_is_an_error(tmp_path):
    path = write(tmp_path, "version = 2\n" + OK_TYPE.format(name="a"))
    with pytest.raises(TaskTypeError, match="version"):
        load_task_types(path)


def test_missing_file_is_a_task_type_error(tmp_path):
    with pytest.raises(TaskTypeError, match="cannot read"):
        load_task_types(tmp_path / "nope.toml")


def test_spec_built_in_code_is_validated_too():
    with pytest.raises(TaskTypeError, match="concurrency"):
        spec(concurrency=0)
    with pytest.raises(ValueError, match="kind"):
        spec(kind="lambda")


# --- parameters --------------------------------------------------------------------------

PARAMS = spec(
    params={"name": "str", "n": "int", "ratio": "float", "dry_run": "bool"},
    defaults={"dry_run": "yes"},
)


def test_validate_params_converts_strings():
    got = validate_params(PARAMS, {"name": "hosts", "n": "-12", "ratio": "1.5e2"})
    assert got == {"name": "hosts", "n": -12, "ratio": 150.0, "dry_run": True}
    assert type(got["ratio"]) is float


def test_validate_params_accepts_json_scalars():
    got = validate_params(PARAMS, {"name": "", "n": 3, "ratio": 2, "dry_run": False})
    assert got == {"name": "", "n": 3, "ratio": 2.0, "dry_run": False}


@pytest.mark.parametrize(
    ("word", "expected"),
    [("true", True), ("YES", True), ("on", True), ("1", True), ("False", False), ("no", False),
     ("off", False), ("0", False)],
)  # fmt: skip
def test_bool_words(word, expected):
    assert (
        validate_params(PARAMS, {"name": "x", "n": 1, "ratio": 1, "dry_run": word})["dry_run"]
        is expected
    )


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"name": "x", "n": 1, "ratio": 1, "extra": "1"}, "unknown parameter 'extra'"),
        ({"name": "x", "ratio": 1}, "missing parameter 'n'"),
        ({"name": "x", "n": "1.5", "ratio": 1}, "parameter 'n': must be an integer"),
        ({"name": "x", "n": True, "ratio": 1}, "parameter 'n'"),
        ({"name": "x", "n": "1_000", "ratio": 1}, "parameter 'n'"),
        ({"name": "x", "n": 1, "ratio": "nan"}, "parameter 'ratio'"),
        ({"name": "x", "n": 1, "ratio": float("inf")}, "parameter 'ratio'"),
        ({"name": 5, "n": 1, "ratio": 1}, "parameter 'name': must be a string"),
        ({"name": "a\0b", "n": 1, "ratio": 1}, "parameter 'name': must not contain NUL"),
        ({"name": None, "n": 1, "ratio": 1}, "parameter 'name'"),
        ({"name": "x", "n": 1, "ratio": 1, "dry_run": "maybe"}, "parameter 'dry_run'"),
        ({"name": "x", "n": 2**63, "ratio": 1}, "parameter 'n': must fit in 64 bits"),
        ({"name": "x", "n": str(-(2**63) - 1), "ratio": 1}, "must fit in 64 bits"),
    ],
)
def test_validate_params_errors_name_the_parameter(params, words):
    with pytest.raises(ValueError, match="task type 't'") as info:
        validate_params(PARAMS, params)
    assert words in str(info.value)


def test_validate_params_reports_every_problem_at_once():
    with pytest.raises(ValueError) as info:
        validate_params(PARAMS, {"n": "x", "zzz": "1"})
    message = str(info.value)
    for words in ("'zzz'", "missing parameter 'name'", "parameter 'n'", "'ratio'"):
        assert words in message


def test_ranges_bound_numbers_inclusively_at_submission():
    ranged = spec(
        params={"days": "int", "share": "float"}, ranges={"days": (0, 10), "share": (0, 1)}
    )
    assert validate_params(ranged, {"days": "0", "share": 1}) == {"days": 0, "share": 1.0}
    assert validate_params(ranged, {"days": 10, "share": "0.5"})["days"] == 10
    cases = [
        ({"days": -1, "share": 0}, "'days': must be between 0 and 10, got -1"),
        ({"days": 1, "share": 1.01}, "'share': must be between 0 and 1"),
    ]
    for bad, words in cases:
        with pytest.raises(ValueError) as info:
            validate_params(ranged, bad)
        assert words in str(info.value)


def test_purge_history_refuses_a_negative_retention_at_submission():
    from taskfleet.worker.builtin import BUILTINS

    purge = next(s for s in BUILTINS if s.name == "purge-history")
    with pytest.raises(ValueError, match="older_than_days"):
        validate_params(purge, {"older_than_days": -1})
    assert validate_params(purge, {}) == {"older_than_days": 30}


def test_type_without_params_refuses_any():
    with pytest.raises(ValueError, match="unknown parameter 'x'"):
        validate_params(spec(), {"x": "1"})
    assert validate_params(spec(), {}) == {}


# --- templates ---------------------------------------------------------------------------


def test_render_splits_first_so_a_value_stays_one_argument():
    hostile = "a b; rm -rf / $(reboot) `id` 'q' \"dq\" > /etc/passwd"
    argv = render_command("echo --msg={msg} {msg} 'x {msg}'", {"msg": hostile}, CTX)
    assert argv == ["echo", f"--msg={hostile}", hostile, f"x {hostile}"]


def test_render_uses_context_braces_and_value_formats():
    argv = render_command(
        "tool {{literal}} --id={task_id} -n {n} -r {r} --flag={f} ''",
        {"n": 3, "r": 0.5, "f": False},
        CTX,
    )
    assert argv == ["tool", "{literal}", "--id=42", "-n", "3", "-r", "0.5", "--flag=false", ""]


@pytest.mark.parametrize(
    ("template", "params", "words"),
    [
        ("echo {nope}", {"a": 1}, "unknown placeholder {nope}"),
        ("echo {tenant}", {}, "{tenant} has no value"),
        ("echo {task_id}", {"task_id": "x"}, "both"),
        ("echo {a.b}", {}, "invalid placeholder"),
        ("echo {a!r}", {}, "invalid placeholder"),
        ("echo }", {}, "literal"),
        ("echo 'open", {}, "cannot split"),
        ("", {}, "empty"),
    ],
)
def test_render_errors(template, params, words):
    with pytest.raises(ValueError) as info:
        render_command(template, params, CTX)
    assert words in str(info.value)


# --- resolving callables -----------------------------------------------------------------


def test_resolve_callable_finds_module_attributes():
    assert resolve_callable(f"{ME}:sync_echo") is sync_echo
    assert resolve_callable(f"{ME}:Holder.Inner.method")({}, {}) == "nested"


@pytest.mark.parametrize(
    ("handler", "words"),
    [
        ("no_colon", "form"),
        ("a:b:c", "form"),
        ("taskfleet_no_such_module:fn", "no module named 'taskfleet_no_such_module'"),
        ("taskfleet.no_such:fn", "no module named 'taskfleet.no_such'"),
        (f"{ME}:missing_fn", "has no attribute 'missing_fn'"),
        (f"{ME}:Holder.nope", f"'{ME}.Holder' has no attribute 'nope'"),
        (f"{ME}:NOT_CALLABLE", "not callable"),
    ],
)
def test_resolve_callable_errors(handler, words):
    with pytest.raises(ValueError) as info:
        resolve_callable(handler)
    assert words in str(info.value)


# --- running commands --------------------------------------------------------------------


async def test_command_success_records_argv_and_output():
    t = command(
        f"{PY} -c 'import json, sys, os; print(json.dumps(sys.argv[1:])); "
        'print(os.environ["TASKFLEET_TASK_ID"], file=sys.stderr)\' {msg} --id={task_id}',
        params={"msg": "str"},
    )
    hostile = "a b; rm -rf /"
    result = await run_handler(t, {"msg": hostile}, CTX, kill_grace=GRACE)
    assert isinstance(result, HandlerResult)
    assert result.ok is True
    assert result.return_code == 0
    assert result.error is None
    assert result.timed_out is False
    assert result.argv is not None and result.argv[-2:] == [hostile, "--id=42"]
    lines = result.output.splitlines()
    assert json.loads(lines[0]) == [hostile, "--id=42"]
    assert lines[1] == "42"
    assert shlex.split(result.command_line) == result.argv
    assert result.started_at <= result.ended_at


async def test_command_nonzero_exit_fails_with_its_code_and_output():
    t = command("sh -c 'echo out; echo err >&2; exit 3'")
    result = await run_handler(t, {}, CTX, kill_grace=GRACE)
    assert result.ok is False
    assert result.return_code == 3
    assert result.output == "out\nerr\n"
    assert result.error == "exited with code 3"
    assert result.argv == ["sh", "-c", "echo out; echo err >&2; exit 3"]


async def test_command_killed_by_a_signal_says_so():
    result = await run_handler(command("sh -c 'kill -9 $$'"), {}, CTX, kill_grace=GRACE)
    assert (result.ok, result.return_code, result.timed_out) == (False, None, False)
    assert result.error == "killed by signal SIGKILL"


async def test_command_that_cannot_start():
    t = command("/nonexistent/taskfleet-tool --x")
    result = await run_handler(t, {}, CTX, kill_grace=GRACE)
    assert result.ok is False
    assert result.return_code is None
    assert "executable not found" in result.error
    assert result.argv == ["/nonexistent/taskfleet-tool", "--x"]


async def test_command_over_its_time_limit_is_killed(tmp_path):
    pidfile = tmp_path / "pid"
    t = command(
        "sh -c 'echo $$ > \"$1\"; echo begun; exec sleep 30' sh {pidfile}",
        params={"pidfile": "str"},
        time_limit=0.5,
    )
    began = time.monotonic()
    result = await run_handler(t, {"pidfile": str(pidfile)}, CTX, kill_grace=GRACE)
    assert time.monotonic() - began < 5
    assert result.ok is False
    assert result.timed_out is True
    assert result.return_code is None
    assert "time limit of 0.5 s exceeded" in result.error
    assert result.output == "begun\n"
    assert _pid_gone(int(pidfile.read_text()))


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # An orphan may stay a zombie where PID 1 does not reap: dead all the same.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def test_command_output_is_capped():
    t = command(f"{PY} -c 'print(\"y\" * 1000)'")
    result = await run_handler(t, {}, CTX, output_cap=100, kill_grace=GRACE)
    assert result.ok is True
    assert result.output.startswith("y" * 100 + TRUNCATION_MARKER.format(dropped=901))


async def test_command_with_unrenderable_template_fails_without_running():
    t = command("echo {tenant}", scope="tenant")
    result = await run_handler(t, {}, CTX, kill_grace=GRACE)
    assert result.ok is False
    assert result.argv is None
    assert "{tenant} has no value" in result.error


async def test_cancelling_run_handler_kills_the_command():
    t = command("sleep 30", time_limit=60)
    task = asyncio.create_task(run_handler(t, {}, CTX, kill_grace=GRACE))
    await asyncio.sleep(0.2)
    began = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - began < 3


# --- running callables -------------------------------------------------------------------


async def test_sync_callable_runs_in_a_thread_and_returns_a_dict():
    t = spec(handler=f"{ME}:sync_echo", params={"n": "int"})
    result = await run_handler(t, {"n": 21}, CTX)
    assert result == HandlerResult(
        ok=True,
        return_code=0,
        output="42:42",
        error=None,
        timed_out=False,
        argv=None,
        started_at=result.started_at,
        ended_at=result.ended_at,
    )


async def test_async_callable_output():
    result = await run_handler(spec(handler=f"{ME}:async_echo"), {"word": "hi"}, CTX)
    assert (result.ok, result.return_code, result.output) == (True, 0, "async hi")


@pytest.mark.parametrize(
    ("fn", "ok", "code", "output", "error"),
    [
        ("returns_none", True, 0, "", None),
        ("returns_code", False, 3, "", "handler returned code 3"),
        ("returns_coroutine", True, 0, "async via sync", None),
        ("returns_bad", False, None, "", "handler returned an unsupported list"),
    ],
)
async def test_callable_return_values(fn, ok, code, output, error):
    result = await run_handler(spec(handler=f"{ME}:{fn}"), {}, CTX)
    assert (result.ok, result.return_code, result.output) == (ok, code, output)
    assert (result.error or "").startswith(error or "")
    assert (result.error is None) == (error is None)


@pytest.mark.parametrize(
    ("fn", "error"),
    [
        ("raises", "RuntimeError: disk on fire"),
        ("async_raises", "KeyError: 'missing'"),
        ("calls_exit", "SystemExit: 4"),
    ],
)
async def test_callable_raising_fails_with_traceback(fn, error):
    result = await run_handler(spec(handler=f"{ME}:{fn}"), {}, CTX)
    assert result.ok is False
    assert result.return_code is None
    assert result.error == error
    assert result.output.startswith("Traceback")
    assert fn in result.output


async def test_callable_traceback_output_is_capped():
    result = await run_handler(spec(handler=f"{ME}:big_output"), {}, CTX, output_cap=10)
    assert result.output == "x" * 10 + TRUNCATION_MARKER.format(dropped=4990)


async def test_unresolvable_callable_fails_cleanly():
    result = await run_handler(spec(handler=f"{ME}:missing_fn"), {}, CTX)
    assert result.ok is False
    assert "has no attribute 'missing_fn'" in result.error


async def test_async_callable_over_its_time_limit_is_cancelled():
    t = spec(handler=f"{ME}:async_forever", time_limit=0.2)
    result = await run_handler(t, {}, CTX, kill_grace=GRACE)
    assert result.ok is False
    assert result.timed_out is True
    assert result.error == "time limit of 0.2 s exceeded; handler cancelled"
    assert state == {"started": True, "cancelled": True}


async def test_async_callable_ignoring_cancellation_is_abandoned():
    release = asyncio.Event()
    state["release"] = release
    t = spec(handler=f"{ME}:async_stubborn", time_limit=0.1)
    result = await run_handler(t, {}, CTX, kill_grace=0.1)
    assert result.timed_out is True
    assert "ignored cancellation" in result.error
    assert state["ignored"] is True
    release.set()
    await asyncio.sleep(0)


async def test_sync_callable_over_its_time_limit_reports_timeout_while_thread_runs():
    gate = threading.Event()
    state["gate"] = gate
    t = spec(handler=f"{ME}:sync_blocking", time_limit=0.2)
    result = await run_handler(t, {}, CTX, kill_grace=GRACE)
    assert result.ok is False
    assert result.timed_out is True
    assert "thread cannot be killed" in result.error
    assert "thread_done" not in state
    gate.set()  # the thread finishes on its own; its late result is dropped quietly
    for _ in range(200):
        if "thread_done" in state:
            break
        await asyncio.sleep(0.01)
    assert state["thread_done"] is True


async def test_cancelling_run_handler_cancels_an_async_callable():
    t = spec(handler=f"{ME}:async_forever", time_limit=60)
    task = asyncio.create_task(run_handler(t, {}, CTX, kill_grace=GRACE))
    while "started" not in state:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert state["cancelled"] is True


# --- stopping a canceled task (issue 9) ----------------------------------------------------


async def test_a_stop_request_kills_the_command_s_whole_process_group(tmp_path):
    pids = tmp_path / "pids"
    t = command(
        "sh -c 'sleep 30 & echo $! > {path}; echo $$ >> {path}; wait'",
        params={"path": "str"},
        time_limit=60,
    )
    stop = StopRequest()
    task = asyncio.create_task(
        run_handler(t, {"path": str(pids)}, CTX, kill_grace=GRACE, stop=stop)
    )
    while len(pids.read_text().split() if pids.exists() else []) < 2:
        await asyncio.sleep(0.01)
    child, leader = (int(p) for p in pids.read_text().split())
    stop.set()
    result = await asyncio.wait_for(task, 5)
    assert result.stopped is True and result.ok is False
    assert result.error == "stopped by cancel; process group killed"
    for pid in (child, leader):  # the background child too: the group is gone
        assert not _running(pid), pid


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for an init that never reaps)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_a_stop_request_cancels_an_async_callable():
    t = spec(handler=f"{ME}:async_forever", time_limit=60)
    stop = StopRequest()
    task = asyncio.create_task(run_handler(t, {}, CTX, kill_grace=GRACE, stop=stop))
    while "started" not in state:
        await asyncio.sleep(0.01)
    stop.set()
    result = await asyncio.wait_for(task, 5)
    assert state["cancelled"] is True
    assert result.stopped is True and result.error == "stopped by cancel; handler cancelled"


async def test_an_async_callable_ignoring_the_stop_is_waited_for_not_abandoned():
    release = asyncio.Event()
    state["release"] = release
    t = spec(handler=f"{ME}:async_stubborn", time_limit=60)
    stop = StopRequest()
    task = asyncio.create_task(run_handler(t, {}, CTX, kill_grace=0.05, stop=stop))
    await asyncio.sleep(0)
    stop.set()
    while "ignored" not in state:
        await asyncio.sleep(0.01)
    done, _ = await asyncio.wait({task}, timeout=0.3)  # well past the kill grace
    assert not done  # still running: the worker must keep its slot
    release.set()
    result = await asyncio.wait_for(task, 5)
    assert result.stopped is False
    assert result.error.startswith("cancel requested; the handler ignored it")


async def test_a_thread_cannot_be_stopped_says_so_and_is_waited_for_past_its_time_limit():
    gate = threading.Event()
    state["gate"] = gate
    held: list[str] = []
    t = spec(handler=f"{ME}:sync_blocking", time_limit=0.2)
    stop = StopRequest(on_held=held.append)
    task = asyncio.create_task(run_handler(t, {}, CTX, kill_grace=GRACE, stop=stop))
    while not any(th.name == "taskfleet-handler" for th in threading.enumerate()):
        await asyncio.sleep(0.01)
    stop.set()
    while not held:
        await asyncio.sleep(0.01)
    assert held == ["handler cannot be interrupted, slot held until it returns"]
    done, _ = await asyncio.wait({task}, timeout=0.5)  # past the 0.2 s time limit
    assert not done  # the thread runs on: run_handler returns only when it does
    gate.set()
    result = await asyncio.wait_for(task, 5)
    assert state["thread_done"] is True
    assert result.stopped is False and result.ok is True and result.return_code == 0
    assert "could not be interrupted and returned on its own" in result.error
