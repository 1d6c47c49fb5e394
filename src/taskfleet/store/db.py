"""Database engines for the store port: SQLite (embedded default) and PostgreSQL.

Contract: ``database_url`` accepts what an administrator types
(``sqlite:///path``, a bare path, ``postgresql://...``) and returns the async
driver URL; ``create_engine`` applies the settings each engine needs for
durability (SQLite: WAL, synchronous=FULL, foreign keys, a busy timeout);
``upgrade`` brings a database to the newest Alembic revision.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

MIGRATIONS = Path(__file__).with_name("migrations")


def database_url(raw: str) -> str:
    if raw.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
        return raw
    if raw.startswith("sqlite://"):
        return "sqlite+aiosqlite://" + raw[len("sqlite://") :]
    if raw.startswith(("postgresql://", "postgres://")):
        return "postgresql+asyncpg://" + raw.split("://", 1)[1]
    if "://" not in raw:
        return "sqlite+aiosqlite:///" + str(Path(raw).resolve())
    raise ValueError(f"unsupported database URL {raw!r}: use sqlite:///PATH or postgresql://...")


def is_sqlite(url: str) -> bool:
    return database_url(url).startswith("sqlite")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets readers run beside the writer; FULL makes a commit survive power
    # loss, and the write batcher keeps fsyncs to one per batch.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_begin_immediate(conn: Any) -> None:
    # Take the write lock at BEGIN, not at the first write: a transaction that
    # read first could otherwise fail at commit time with a stale snapshot.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_manual_transactions(dbapi_conn: Any, _record: Any) -> None:
    _sqlite_pragmas(dbapi_conn, _record)
    dbapi_conn.isolation_level = None  # let the "begin" hook issue BEGIN itself


def create_engine(
    raw_url: str, *, writer: bool = False, pre_ping: bool = True, **kwargs: Any
) -> AsyncEngine:
    """An engine for reads, or (``writer=True``) the one the single writer uses."""
    url = database_url(raw_url)
    if url.startswith("sqlite"):
        if url.rstrip("/").endswith(":memory:"):
            raise ValueError("an in-memory SQLite database is not durable; give a file path")
        Path(url.split(":///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        if not writer:
            engine = create_async_engine(url, pool_size=8, max_overflow=8, **kwargs)
            sa.event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
            return engine
        engine = create_async_engine(url, pool_size=1, max_overflow=0, **kwargs)
        sa.event.listen(engine.sync_engine, "connect", _sqlite_manual_transactions)
        sa.event.listen(engine.sync_engine, "begin", _sqlite_begin_immediate)
        return engine
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=pre_ping, **kwargs)


def _alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["url"] = database_url(url)
    return cfg


def upgrade_sync(url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(_alembic_config(url), revision)


async def upgrade(url: str, revision: str = "head") -> None:
    # Alembic's env runs its own event loop for the async engine; keep it off ours.
    await asyncio.to_thread(upgrade_sync, url, revision)
