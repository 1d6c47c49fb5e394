"""Database engines for the store port: SQLite (embedded default) and PostgreSQL.

Contract: ``database_url`` accepts what an administrator types
(``sqlite:///path``, a bare path, ``postgresql://...``) and returns the async
driver URL; ``create_engine`` applies the settings each engine needs for
durability (SQLite: WAL, synchronous=FULL, foreign keys, a busy timeout);
``sync_writer_engine`` is the SQLite writer's synchronous twin engine (same file,
same settings) for the writer's one-hand-over transactions (``Writer.run_sync``).
``upgrade`` brings a database to the newest Alembic revision.
``secure_data_dir`` and ``prepare_sqlite`` keep the server's secrets private:
the data folder is created 0700 and the SQLite file (it holds the signing seed
and the tickle master key) 0600 whatever the umask; a file others can read
raises :class:`InsecureFileError` and the server refuses to start.
"""

from __future__ import annotations

import asyncio
import os
import stat
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


class InsecureFileError(RuntimeError):
    """A file holding the server's keys can be read by other users."""


def _make_private_dir(path: Path) -> None:
    if not path.exists():
        path.mkdir(parents=True, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)  # mkdir's mode is narrowed by the umask, never widened: be exact


def secure_data_dir(path: Path) -> None:
    """Create the data folder 0700 (it holds the admin token); an existing one is left alone."""
    _make_private_dir(path)


def sqlite_path(raw_url: str) -> Path | None:
    url = database_url(raw_url)
    if not url.startswith("sqlite"):
        return None
    return Path(url.split(":///", 1)[1])


def prepare_sqlite(raw_url: str) -> None:
    """Create the SQLite file 0600 before SQLite does; refuse one others can read.

    SQLite gives the -wal and -shm files the mode of the database file, so a
    0600 database keeps them 0600 too, whatever the umask. PostgreSQL: nothing to do.
    """
    path = sqlite_path(raw_url)
    if path is None or path.name == ":memory:":
        return
    _make_private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        os.fchmod(fd, 0o600)
        os.close(fd)
    exposed: list[tuple[Path, int]] = []
    for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            mode = stat.S_IMODE(f.stat().st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            exposed.append((f, mode))
    if exposed:
        raise InsecureFileError(
            "the database holds the server's signing key and tickle master key, but other "
            "users can access "
            + ", ".join(f"{f} (mode {mode:04o})" for f, mode in exposed)
            + f": run `chmod 600 {' '.join(str(f) for f, _ in exposed)}` and start again"
        )


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
        _make_private_dir(Path(url.split(":///", 1)[1]).parent)
        if not writer:
            engine = create_async_engine(url, pool_size=8, max_overflow=8, **kwargs)
            sa.event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
            return engine
        engine = create_async_engine(url, pool_size=1, max_overflow=0, **kwargs)
        sa.event.listen(engine.sync_engine, "connect", _sqlite_manual_transactions)
        sa.event.listen(engine.sync_engine, "begin", _sqlite_begin_immediate)
        return engine
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=pre_ping, **kwargs)


def sync_writer_engine(engine: AsyncEngine) -> sa.Engine:
    """A synchronous (pysqlite) engine on the SQLite file of the async writer ``engine``,
    with the writer's settings: WAL, synchronous=FULL, foreign keys, busy timeout,
    BEGIN IMMEDIATE. One connection, used from one thread at a time (the writer's own,
    which serialises it with the async writer connection). The file already exists with
    its 0600 mode (``prepare_sqlite``); SQLite gives -wal and -shm the same mode."""
    url = engine.url
    if url.get_backend_name() != "sqlite":
        raise ValueError(f"a synchronous writer engine is for SQLite, not {url.drivername}")
    sync = sa.create_engine(
        url.set(drivername="sqlite+pysqlite"),
        pool_size=1,
        max_overflow=0,
        # Only the writer's thread uses it; a cleanup at exit from another is no error.
        connect_args={"check_same_thread": False},
    )
    sa.event.listen(sync, "connect", _sqlite_manual_transactions)
    sa.event.listen(sync, "begin", _sqlite_begin_immediate)
    return sync


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
