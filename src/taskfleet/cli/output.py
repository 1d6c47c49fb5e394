"""What the CLI prints: the terminal sanitiser, tables, fields, JSON, errors.

Contract: every text that came from the server (script output, result lines,
hostnames, reasons, tag values, names, error messages) reaches the terminal
through :func:`clean` (tables, fields, :func:`echo` and :func:`fail` apply it),
so a script or an agent cannot send escape sequences to the administrator's
terminal. ``--json`` output is exact JSON (``json.dumps`` escapes every control
character). Lean on purpose (click, and rich only inside the functions that
draw): ``taskfleet agent`` loads it.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

import click

# Terminal escape sequences, removed whole so that no parameter bytes are left:
# CSI (ESC [ ... final), OSC (ESC ] ... BEL or ST), DCS/SOS/PM/APC (ESC P|X|^|_ ... ST),
# other ESC sequences, and the 8-bit CSI.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]?"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"
    r"|\x1b[ -/]*[0-~]?"
    r"|\x9b[0-?]*[ -/]*[@-~]?"
)
# Left-over control characters (C0 but tab and newline, DEL, C1) and the bidi
# controls that reorder what a line shows.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def clean(value: Any, *, multiline: bool = False) -> str:
    """Remote text made safe for a terminal: no escape sequence, no control character.

    ``multiline`` keeps newlines and tabs (script output); otherwise they become
    spaces (a table cell, a field, a name). A carriage return that is not part of
    a CRLF ends a line: it cannot overwrite what was printed before it."""
    text = "-" if value is None else str(value)
    text = _ESCAPES.sub("", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROLS.sub("", text)
    if not multiline:
        text = text.replace("\n", " ").replace("\t", " ")
    return text


def echo(text: Any = "", *, err: bool = False) -> None:
    """``click.echo`` for human output that may hold remote text (lines kept)."""
    click.echo(clean(text, multiline=True), err=err)


def fail(message: str, code: int = 2) -> NoReturn:
    # Server messages quote what they refuse (hostnames, names): cleaned too.
    click.echo(f"error: {clean(message, multiline=True)}", err=True)
    sys.exit(code)


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def emit(data: Any, as_json: bool, table: Callable[[Any], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        table(data)


def print_table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Text, not str: rich would read "[...]" in remote text as its markup.
    t = Table(
        title=None if title is None else Text(clean(title)), show_lines=False, header_style="bold"
    )
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[Text(clean(v)) for v in r])
    Console(width=max(100, int(os.environ.get("COLUMNS", "0") or 0))).print(t)


def print_fields(title: str, fields: list[tuple[str, Any]]) -> None:
    from rich.console import Console

    console = Console()
    console.print(clean(title), style="bold", highlight=False, markup=False)
    width = max(len(k) for k, _ in fields)
    for k, v in fields:
        console.print(f"  {k.ljust(width)}  {clean(v)}", highlight=False, markup=False)


def first_line(text: str | None) -> str:
    if not text:
        return ""
    text = clean(text, multiline=True).strip()
    return text.splitlines()[0][:80] if text else ""


def duration(a: dict[str, Any]) -> str:
    s, e = a.get("agent_started_at"), a.get("agent_ended_at")
    return f"{e - s:.2f}s" if s and e else "-"


def state_label(state: str) -> str:
    return state.replace("_", " ").title()
