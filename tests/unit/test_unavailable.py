"""store/unavailable.py: which database failures are "full" or "unreachable" (a 503 the
caller retries), whatever wraps them, and which are bugs (None: a 500)."""

from __future__ import annotations

import errno
import logging
import sqlite3

import asyncpg
import pytest
import sqlalchemy as sa

from taskfleet.store.unavailable import DISK_FULL, UNREACHABLE, log_failure, unavailable


def _sqlite_full() -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError("database or disk is full")
    exc.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
    return exc


def _pg(cls: type[asyncpg.PostgresError]) -> Exception:
    """An asyncpg error as SQLAlchemy's asyncpg dialect wraps it (``orig`` adapted,
    carrying the SQLSTATE; the driver's error as its cause)."""
    inner = cls("boom")
    adapted = Exception("adapted")
    adapted.sqlstate = inner.sqlstate  # type: ignore[attr-defined]
    adapted.__cause__ = inner
    return sa.exc.DBAPIError("INSERT ...", {}, adapted)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (_sqlite_full(), DISK_FULL),
        (sa.exc.OperationalError("COMMIT", {}, _sqlite_full()), DISK_FULL),
        (sqlite3.OperationalError("database or disk is full"), DISK_FULL),
        (OSError(errno.ENOSPC, "No space left on device"), DISK_FULL),
        (_pg(asyncpg.exceptions.DiskFullError), DISK_FULL),  # SQLSTATE 53100
        (_pg(asyncpg.exceptions.OutOfMemoryError), UNREACHABLE),  # 53200
        (_pg(asyncpg.exceptions.TooManyConnectionsError), UNREACHABLE),  # 53300
        (_pg(asyncpg.exceptions.AdminShutdownError), UNREACHABLE),  # 57P01: pg_ctl stop
        (_pg(asyncpg.exceptions.CannotConnectNowError), UNREACHABLE),  # 57P03: starting up
        (_pg(asyncpg.exceptions.ConnectionFailureError), UNREACHABLE),  # 08006
        (asyncpg.exceptions.DiskFullError("raw"), DISK_FULL),  # not wrapped
        (asyncpg.exceptions.ConnectionDoesNotExistError("closed"), UNREACHABLE),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), UNREACHABLE),
        (ConnectionResetError(errno.ECONNRESET, "reset"), UNREACHABLE),
        (_pg(asyncpg.exceptions.UniqueViolationError), None),  # a bug or bad input: 500
        (sqlite3.IntegrityError("UNIQUE constraint failed"), None),
        (sqlite3.OperationalError("database is locked"), None),
        (OSError(errno.EACCES, "Permission denied"), None),
        (ValueError("no"), None),
    ],
)
def test_what_is_full_or_unreachable(exc: Exception, expected: str | None) -> None:
    assert unavailable(exc) == expected


def test_a_cause_deep_in_the_chain_is_found_and_a_cycle_ends() -> None:
    outer = RuntimeError("outer")
    middle = ValueError("middle")
    outer.__context__ = middle
    middle.__cause__ = OSError(errno.ENOSPC, "full")
    assert unavailable(outer) == DISK_FULL
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a
    assert unavailable(a) is None


def test_an_outage_is_logged_in_one_line_a_bug_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("test.unavailable")
    with caplog.at_level(logging.WARNING, "test.unavailable"):
        log_failure(log, _sqlite_full(), "write of %d failed", 3)
        log_failure(log, ValueError("bug"), "write of %d failed", 4)
    outage, bug = caplog.records
    assert outage.levelno == logging.WARNING and outage.exc_info is None
    assert outage.getMessage() == f"write of 3 failed: {DISK_FULL} (database or disk is full)"
    assert bug.levelno == logging.ERROR and bug.exc_info is not None
