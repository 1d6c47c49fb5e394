"""``taskfleet content``: content addressed by SHA-256, for jobs to download (docs/content.md).

Contract: talks to the admin API only (``/content``). ``add`` reads the file twice,
never whole into memory: once to hash it, then streamed as the request body with its
hash in ``X-Content-SHA256``, so the server refuses bytes that changed on the way (or
in the file meanwhile) and stores nothing.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import click

from taskfleet.cli.client import Api, client_options
from taskfleet.cli.output import echo, emit, fail, print_fields, print_table, when
from taskfleet.protocol.content import SHA256_HEADER
from taskfleet.settings import CONTENT_CHUNK


@click.group()
def content() -> None:
    """Content by SHA-256 (packages, patches) that jobs download."""


def _sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while piece := f.read(CONTENT_CHUNK):
            h.update(piece)
            size += len(piece)
    return h.hexdigest(), size


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@content.command("add")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="What to call it [default: the file's name].")
@client_options
def content_add(
    file: Path, name: str | None, server: str | None, token: str | None, as_json: bool
) -> None:
    """Add FILE: stored on the server by its SHA-256 (the same bytes again add nothing)."""
    api = Api(server, token)
    try:
        sha, size = _sha256(file)
        body = file.open("rb")
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror or exc}")
    with body:
        out = api.call(
            "POST",
            "/content",
            params={"name": name or file.name},
            content=body,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(size),
                SHA256_HEADER: sha,
            },
        )
    emit(
        out,
        as_json,
        lambda d: echo(f"{d['sha256']}  {d['size']} bytes  {d['name']}"),
    )


@content.command("list")
@client_options
def content_list(server: str | None, token: str | None, as_json: bool) -> None:
    """List content: hash, size, name, who added it and when."""
    rows = Api(server, token).get("/content")
    emit(
        rows,
        as_json,
        lambda rs: print_table(
            "content",
            ["sha256", "size", "name", "added by", "added"],
            [
                [r["sha256"], _size(r["size"]), r["name"], r["created_by"], when(r["created_at"])]
                for r in rs
            ],
        ),
    )


@content.command("show")
@click.argument("sha256")
@client_options
def content_show(sha256: str, server: str | None, token: str | None, as_json: bool) -> None:
    """Show content and the jobs that use it."""
    d = Api(server, token).get(f"/content/{_path_hash(sha256)}")

    def table(d: dict[str, Any]) -> None:
        print_fields(
            f"content {d['sha256']}",
            [
                ("name", d["name"]),
                ("size", f"{d['size']} bytes ({_size(d['size'])})"),
                ("added by", d["created_by"]),
                ("added", when(d["created_at"])),
                ("jobs", ", ".join(map(str, d["jobs"])) or "none"),
                ("unfinished jobs", ", ".join(map(str, d["unfinished_jobs"])) or "none"),
            ],
        )

    emit(d, as_json, table)


@content.command("remove")
@click.argument("sha256")
@client_options
def content_remove(sha256: str, server: str | None, token: str | None, as_json: bool) -> None:
    """Remove content (refused while an unfinished job uses it)."""
    out = Api(server, token).call("DELETE", f"/content/{_path_hash(sha256)}")
    emit(out, as_json, lambda d: echo(f"content {d['sha256']} removed"))


def _path_hash(sha256: str) -> str:
    """The hash as a path segment: anything that is not hex is refused here, so a
    slash or ``..`` never reaches the URL."""
    value = sha256.strip().lower()
    if len(value) != 64 or set(value) - set("0123456789abcdef"):
        fail(f"{sha256[:80]!r} is not a content hash (64 hex digits, as `content list` shows)")
    return value
