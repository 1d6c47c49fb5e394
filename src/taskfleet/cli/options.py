"""Option types and argument parsers shared by several commands.

Contract: a number, time or duration the administrator types is refused here
with a usage error (exit 2) when it is not finite or out of range, before any
request is made; the server checks again. Lean: ``taskfleet agent`` loads it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from taskfleet.cli.output import fail


class FiniteFloat(click.ParamType[float]):
    """A float option that refuses nan and infinity with a usage error (exit 2)."""

    name = "float"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float) and math.isfinite(value):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


FINITE_FLOAT = FiniteFloat()


def when_arg(value: str | None, option: str = "--not-before") -> float | None:
    """Epoch seconds, an ISO 8601 time (no zone: local time), or +DURATION from now."""
    if value is None:
        return None
    from datetime import datetime

    from taskfleet.settings import TIME_MAX, TIME_MIN

    at: float | None = None
    if value.startswith("+"):
        at = time.time() + seconds_arg(value[1:], option)
    else:
        with contextlib.suppress(ValueError):
            at = float(value)
        if at is None:
            try:
                at = datetime.fromisoformat(value).timestamp()
            except (ValueError, OverflowError):
                fail(f"{option} expects epoch seconds, an ISO time or +DURATION, got {value!r}")
    # "nan", "inf", "1e20" parse as floats; the server would refuse them less clearly.
    if not TIME_MIN <= at <= TIME_MAX:  # False for NaN too
        fail(f"{option} must be a finite time between 1970 and 2100, got {value!r}")
    return at


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds_arg(value: str, option: str) -> float:
    """``90``, ``30s``, ``10m``, ``2h``, ``1d`` -> seconds."""
    text = value.strip().lower()
    unit = _UNITS.get(text[-1:])
    number = text[:-1] if unit else text
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        fail(f"{option} expects a duration like 90, 30s, 10m, 2h or 1d, got {value!r}")
    if not 0 < seconds < math.inf:
        fail(f"{option} must be a positive, finite duration, got {value!r}")
    return seconds


def read_token_file(path: Path) -> str:
    """The enrollment token in ``--enroll-token-file`` (its first line), or a clear exit."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read --enroll-token-file {path}: {exc}")
    token = lines[0].strip() if lines else ""
    if not token:
        fail(f"--enroll-token-file {path} is empty")
    return token


F = TypeVar("F", bound=Callable[..., Any])


def tls_listener_options(serves: str) -> Callable[[F], F]:
    """``--tls-cert`` and ``--tls-key`` of a process that listens (the server, a relay);
    checked by ``tls.listener_problem``."""

    def add(f: F) -> F:
        f = click.option(
            "--tls-key",
            type=click.Path(path_type=Path, dir_okay=False),
            default=None,
            help="PEM private key of --tls-cert (not readable by every user).",
        )(f)
        return click.option(
            "--tls-cert",
            type=click.Path(path_type=Path, dir_okay=False),
            default=None,
            help=f"PEM certificate (chain) to serve {serves} HTTPS with; needs --tls-key.",
        )(f)

    return add
