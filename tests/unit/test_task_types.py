"""Task types, pure: declarations and TOML loading, parameters, command templates and
resolving callables (domain.task_types, task_type_file, worker.handlers). Running them is in
integration/test_handler_runs.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskfleet.domain.task_types import TaskTypeError, TaskTypeSpec, render_command, validate_params
from taskfleet.task_type_file import load_task_types
from taskfleet.worker.handlers import resolve_callable

ME = __name__  # callables below are referenced as "MODULE:NAME"
EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "task-types.example.toml"


# --- callables referenced as f"{ME}:NAME" -----------------------------


def sync_echo(params, context):
    return {"return_code": 0, "output": f"{context['task_id']}:{params['n'] * 2}"}


def returns_none(params, context):
    return None


class Holder:
    class Inner:
        @staticmethod
        def method(params, context):
            return "nested"


NOT_CALLABLE = 42


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
