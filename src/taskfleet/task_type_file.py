"""The task-types file: administrators' TOML declarations of server task types (SPEC 4).

Contract: one ``[types.NAME]`` table per type (see ``docs/task-types.example.toml``).
``load_task_types`` reads it and returns the built-ins plus the declared types as
``domain.task_types.TaskTypeSpec``; every problem (TOML syntax, an unknown key, a bad value,
an exclusion of an unknown type, redefining a built-in) raises ``TaskTypeError`` naming the
file, the type and the key. Nothing is imported at load time. The server and the worker both
load it; the file I/O lives here, the rules in ``domain.task_types``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from taskfleet.domain.task_types import (
    SCOPES,
    TaskTypeError,
    TaskTypeSpec,
    alternatives,
    did_you_mean,
)
from taskfleet.settings import TASK_TIME_LIMIT

__all__ = ["load_task_types"]

_KNOWN_KEYS = (
    "callable",
    "command",
    "scope",
    "time_limit",
    "concurrency",
    "per_tenant",
    "excludes",
    "retry_safe",
    "params",
    "defaults",
    "ranges",
    "description",
)


def load_task_types(
    path: Path | str | None, builtins: Iterable[TaskTypeSpec] = ()
) -> dict[str, TaskTypeSpec]:
    """Built-in types plus those declared in the TOML file at ``path`` (None: built-ins only)."""
    types = _builtin_types(builtins)
    builtin_names = set(types)
    if path is None:
        return types
    declared = _read_declared(path)
    loaded = _load_declared(path, declared, builtin_names)
    _check_excludes_known(path, loaded, builtin_names | set(loaded))
    types.update(loaded)
    return types


def _builtin_types(builtins: Iterable[TaskTypeSpec]) -> dict[str, TaskTypeSpec]:
    types: dict[str, TaskTypeSpec] = {}
    for spec in builtins:
        if not isinstance(spec, TaskTypeSpec):
            raise TypeError(f"built-in task types must be TaskTypeSpec, got {spec!r}")
        if spec.name in types:
            raise TaskTypeError("built-in task type declared twice", type_name=spec.name)
        types[spec.name] = spec
    return types


def _read_declared(path: Path | str) -> dict[str, Any]:
    """The file's ``types`` table (empty if it has none)."""
    try:
        with open(path, "rb") as fh:
            document = tomllib.load(fh)
    except OSError as exc:
        raise TaskTypeError(f"cannot read: {exc.strerror or exc}", path=path) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TaskTypeError(f"not valid TOML: {exc}", path=path) from None

    for key in document:
        if key != "types":
            raise TaskTypeError(
                "unknown top-level key; declare each type as a [types.NAME] table",
                path=path,
                field=key,
            )
    declared = document.get("types", {})
    if not isinstance(declared, dict):
        raise TaskTypeError("must be tables [types.NAME]", path=path, field="types")
    return declared


def _load_declared(
    path: Path | str, declared: dict[str, Any], builtin_names: set[str]
) -> dict[str, TaskTypeSpec]:
    loaded: dict[str, TaskTypeSpec] = {}
    for name, table in declared.items():
        if name in builtin_names:
            raise TaskTypeError(
                "redefines a built-in task type; choose another name", path=path, type_name=name
            )
        if not isinstance(table, dict):
            raise TaskTypeError(
                f"must be a table [types.{name}], got {table!r}", path=path, type_name=name
            )
        try:
            loaded[name] = _spec_from_table(name, table)
        except TaskTypeError as exc:
            raise TaskTypeError(
                exc.problem, path=path, type_name=exc.type_name or name, field=exc.field
            ) from None
    return loaded


def _check_excludes_known(
    path: Path | str, loaded: dict[str, TaskTypeSpec], known: set[str]
) -> None:
    for spec in loaded.values():
        for other in spec.excludes:
            if other not in known:
                raise TaskTypeError(
                    f"names unknown task type {other!r}{did_you_mean(other, known)}",
                    path=path,
                    type_name=spec.name,
                    field="excludes",
                )


def _spec_from_table(name: str, table: dict[str, Any]) -> TaskTypeSpec:
    for key in table:
        if key not in _KNOWN_KEYS:
            raise TaskTypeError(
                f"unknown key{did_you_mean(key, _KNOWN_KEYS)}; known keys: "
                + ", ".join(_KNOWN_KEYS),
                type_name=name,
                field=key,
            )
    has_callable, has_command = "callable" in table, "command" in table
    if has_callable == has_command:
        problem = "both are set" if has_callable else "missing handler"
        raise TaskTypeError(
            f'{problem}: set exactly one of callable = "package.module:function" '
            'or command = "program --option {param}"',
            type_name=name,
            field="callable / command",
        )
    kind = "callable" if has_callable else "command"
    if "scope" not in table:
        raise TaskTypeError(
            f"missing; set one of {alternatives(SCOPES)}", type_name=name, field="scope"
        )
    return TaskTypeSpec(
        name=name,
        scope=table["scope"],
        handler=table[kind],
        kind=kind,
        time_limit=table.get("time_limit", TASK_TIME_LIMIT),
        concurrency=table.get("concurrency"),
        per_tenant=table.get("per_tenant", False),
        excludes=table.get("excludes", ()),
        retry_safe=table.get("retry_safe", False),
        params=table.get("params", {}),
        defaults=table.get("defaults", {}),
        ranges=table.get("ranges", {}),
        description=table.get("description", ""),
    )
