"""Which database failures mean "the database cannot take this now" rather than a bug.

Contract: ``unavailable(exc)`` walks an exception and what caused it (SQLAlchemy's
``orig``, ``__cause__``, ``__context__``) and returns a message for the caller when
the database is full (SQLite's SQLITE_FULL, ENOSPC, PostgreSQL's class 53: disk
full, out of memory, too many connections) or unreachable (a refused or dropped
connection, PostgreSQL's class 08 and 57P: shutting down, starting up); otherwise
``None``. Nothing of a refused write was applied, so the API answers it 503 with that
message and the caller (an agent, a relay, a script) retries it later; the server
itself goes on, and recovers by itself once the space is back or the database is up.
"""

from __future__ import annotations

import errno
import logging
import sqlite3

DISK_FULL = "the database is full (no space left on its disk): nothing was written; retry later"
UNREACHABLE = "the database is unreachable: nothing was written; retry later"
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# OSError errnos of a connection that is refused, reset or gone.
_LINK_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ENOTCONN}
)
# asyncpg's exceptions for a connection that is gone, by class name (asyncpg is only
# imported when PostgreSQL is used; these carry no SQLSTATE).
_LINK_CLASSES = frozenset(
    {"ConnectionDoesNotExistError", "InterfaceError", "ConnectionFailureError"}
)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo and len(seen) < 20:
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [getattr(e, "orig", None), e.__cause__, e.__context__]
    return [e for e in seen if isinstance(e, BaseException)]


def sqlstate_problem(sqlstate: str) -> str | None:
    """The message for a PostgreSQL SQLSTATE that means full or unreachable."""
    if sqlstate.startswith("53"):  # insufficient resources: 53100 is disk full
        return DISK_FULL if sqlstate == "53100" else UNREACHABLE
    if sqlstate.startswith(("08", "57P")):  # connection exception; shutdown, starting up
        return UNREACHABLE
    return None


def unavailable(exc: BaseException) -> str | None:
    """The caller's message when ``exc`` means the database cannot take writes now."""
    for e in _chain(exc):
        if isinstance(e, sqlite3.Error):
            code = getattr(e, "sqlite_errorcode", None)
            if code == sqlite3.SQLITE_FULL or "database or disk is full" in str(e):
                return DISK_FULL
        sqlstate = getattr(e, "sqlstate", None)
        if isinstance(sqlstate, str) and (problem := sqlstate_problem(sqlstate)):
            return problem
        if isinstance(e, OSError):
            if e.errno in _FULL_ERRNOS:
                return DISK_FULL
            if e.errno in _LINK_ERRNOS or isinstance(e, ConnectionError):
                return UNREACHABLE
        if type(e).__name__ in _LINK_CLASSES and type(e).__module__.startswith("asyncpg"):
            return UNREACHABLE
    return None


def log_failure(log: logging.Logger, exc: BaseException, message: str, *args: object) -> None:
    """Log a failed write: one warning line when the database is full or down (an
    outage, not a bug: a traceback per refused write would flood the log), else the
    traceback."""
    problem = unavailable(exc)
    if problem is None:
        log.error(message, *args, exc_info=exc)
    else:
        log.warning(message + ": %s (%s)", *args, problem, exc)
