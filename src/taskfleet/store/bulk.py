"""Batch statements whose cost does not grow with the batch's shape on PostgreSQL.

Contract:
* ``id_in(conn, column, ids)``: ``column IN (...)`` on SQLite; ``column = ANY(:array)``
  on PostgreSQL, one parameter whatever the count, so the statement text (and the
  plan PostgreSQL prepares for it) is the same for 1 id or 5,000.
* ``insert_rows(conn, table, rows)``: rows with the same keys, inserted.
* ``update_rows(conn, table, rows, match)``: each row's ``b_*`` keys name the row to
  change (``match`` says how: ``{"b_id": "id"}`` is ``table.id = b_id``, a column named
  ``col || ''`` compares text and keeps indexes out of the guard), every other key a
  column to set; returns how many rows matched.
On PostgreSQL the last two are ONE statement over ``unnest`` of one array per column
(the executemany they replace runs one statement per row: parse-free, but a
statement's start, snapshot and end each time, on a worker's hot path). On SQLite they
are one executemany. Tables with JSON columns in the rows take the executemany path on
both: arrays of JSON do not round-trip through the driver. Each statement object is
built once per shape (table, keys) and reused.
``insert_rows`` and ``update_rows`` are synchronous (a ``Connection``): the writer's hot
transactions run whole as one synchronous function (``Writer.run_sync``); async code
calls them through ``await conn.run_sync(update_rows, ...)``.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection

TEXT_MATCH = "||''"  # suffix in ``update_rows``'s ``match``: compare as text (see above)


def _pg(conn: AsyncConnection | sa.Connection) -> bool:
    return conn.dialect.name == "postgresql"


def id_in(
    conn: AsyncConnection | sa.Connection, column: sa.ColumnElement[Any], ids: list[int]
) -> Any:
    if _pg(conn):
        return column == sa.any_(sa.bindparam(None, list(ids), type_=ARRAY(sa.BigInteger)))
    return column.in_(ids)


# Column types whose arrays the driver encodes as they are (JSON and decorated types
# take the executemany path).
_SCALARS = (sa.Integer, sa.Float, sa.String, sa.Boolean)


def _arrayable(table: sa.Table, columns: list[str]) -> bool:
    return all(_scalar(table.c[c.removesuffix(TEXT_MATCH)]) for c in columns)


def _scalar(column: sa.Column[Any]) -> bool:
    return isinstance(column.type, _SCALARS) and not isinstance(column.type, sa.TypeDecorator)


def _element(column: sa.Column[Any]) -> Any:
    # Text, not VARCHAR(n): an explicit cast to VARCHAR(n) truncates silently, while
    # storing text in the VARCHAR(n) column refuses an over-long value, as before.
    return sa.Text() if isinstance(column.type, sa.String) else column.type


def _unnest(table: sa.Table, names: tuple[str, ...], columns: dict[str, str]) -> Any:
    arrays = [
        sa.bindparam(f"a_{n}", type_=ARRAY(_element(table.c[columns.get(n, n)]))) for n in names
    ]
    return sa.func.unnest(*arrays).table_valued(*names).render_derived(name="v")


def _operand(table: sa.Table, col: str) -> Any:
    if col.endswith(TEXT_MATCH):
        return table.c[col.removesuffix(TEXT_MATCH)].concat("")
    return table.c[col]


# One statement object per shape: building it and its cache key per batch cost
# more than the rest of the call (py-spy, bench_tasks.py, 2026-12-01).
_STATEMENTS: dict[tuple[Any, ...], Any] = {}


def _insert(table: sa.Table, names: tuple[str, ...]) -> Any:
    key = ("insert", table, names)
    stmt = _STATEMENTS.get(key)
    if stmt is None:
        v = _unnest(table, names, {})
        stmt = table.insert().from_select(list(names), sa.select(*[v.c[n] for n in names]))
        _STATEMENTS[key] = stmt
    return stmt


def _update(table: sa.Table, names: tuple[str, ...], match: dict[str, str], each: bool) -> Any:
    """The UPDATE for rows of these keys: over ``unnest`` (one statement), or with one
    bound parameter per key for an executemany (``each``)."""
    key = ("update", each, table, names, tuple(sorted(match.items())))
    stmt = _STATEMENTS.get(key)
    if stmt is None:
        if each:
            source: dict[str, Any] = {n: sa.bindparam(n) for n in names}
        else:
            v = _unnest(table, names, {k: c.removesuffix(TEXT_MATCH) for k, c in match.items()})
            source = {n: v.c[n] for n in names}
        stmt = table.update().values({n: source[n] for n in names if n not in match})
        for k, col in match.items():
            stmt = stmt.where(_operand(table, col) == source[k])
        _STATEMENTS[key] = stmt
    return stmt


def _arrays(names: tuple[str, ...], rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {f"a_{n}": [r[n] for r in rows] for n in names}


def insert_rows(conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    names = tuple(sorted(rows[0]))
    if not _pg(conn) or not _arrayable(table, list(names)):
        conn.execute(table.insert(), rows)
        return
    conn.execute(_insert(table, names), _arrays(names, rows))


def update_rows(
    conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]], match: dict[str, str]
) -> int:
    """Rows must share their keys. ``match`` maps each ``b_*`` key to its column."""
    if not rows:
        return 0
    names = tuple(sorted(rows[0]))
    if not _pg(conn) or not _arrayable(table, [match.get(n, n) for n in names]):
        result = conn.execute(_update(table, names, match, each=True), rows)
        # Not every driver counts executemany rows: then trust the batch.
        return len(rows) if result.rowcount in (-1, None) else int(result.rowcount)
    return int(
        conn.execute(_update(table, names, match, each=False), _arrays(names, rows)).rowcount
    )
