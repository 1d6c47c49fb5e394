"""The relay's content cache (relay/content.py) against a fake server answer: LRU by
size that never evicts a pinned file, one fetch for many waiters, bytes checked before
they are cached, leftovers of a killed relay removed at start."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from taskfleet.agent.http import Streamed
from taskfleet.relay.content import ContentCache, FetchError

ITEMS = {name: (name * 100).encode() for name in "abcd"}  # 100 bytes each
SHA = {hashlib.sha256(data).hexdigest(): data for data in ITEMS.values()}
BY_NAME = {name: hashlib.sha256(data).hexdigest() for name, data in ITEMS.items()}


class FakeServer:
    """Answers like ``Upstream.open_content``; counts the fetches; can hold them open
    (``gate``), lie about the bytes (``corrupt``) or the length (``length``)."""

    def __init__(self) -> None:
        self.fetches: list[str] = []
        self.gate: asyncio.Event | None = None
        self.corrupt = False
        self.length: int | None = None
        self.status = 200

    @contextlib.asynccontextmanager
    async def open(self, sha: str) -> AsyncIterator[Streamed]:
        self.fetches.append(sha)
        if self.gate is not None:
            await self.gate.wait()
        data = SHA.get(sha, b'{"error": "no content"}')
        status = self.status if sha in SHA else 404
        if self.corrupt:
            data = b"X" + data[1:]
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        length = self.length if self.length is not None else len(data)
        yield Streamed(status, {}, length, reader, False, 5.0)


def _cache(tmp_path: Path, cap: int, server: FakeServer) -> ContentCache:
    return ContentCache(tmp_path / "content", cap, server.open)


def _files(tmp_path: Path) -> set[str]:
    return {p.name for p in (tmp_path / "content").iterdir()}


async def _get(cache: ContentCache, name: str) -> int:
    async with cache.pinned(BY_NAME[name]) as size:
        return size


async def test_lru_evicts_the_least_recently_used_first(tmp_path: Path) -> None:
    server = FakeServer()
    cache = _cache(tmp_path, 250, server)
    assert await _get(cache, "a") == 100
    await _get(cache, "b")
    await _get(cache, "a")  # a hit: a is now more recent than b
    await _get(cache, "c")  # 300 bytes > 250: the least recently used goes
    assert _files(tmp_path) == {BY_NAME["a"], BY_NAME["c"]}
    assert cache.total == 200
    assert server.fetches == [BY_NAME["a"], BY_NAME["b"], BY_NAME["c"]]  # a fetched once
    await _get(cache, "b")  # evicted: fetched again
    assert server.fetches[-1] == BY_NAME["b"]
    assert _files(tmp_path) == {BY_NAME["c"], BY_NAME["b"]}


async def test_a_file_being_served_is_never_evicted(tmp_path: Path) -> None:
    server = FakeServer()
    cache = _cache(tmp_path, 150, server)
    async with cache.pinned(BY_NAME["a"]):  # being served, and the oldest
        await _get(cache, "b")
        await _get(cache, "c")
        assert BY_NAME["a"] in _files(tmp_path)
        assert (tmp_path / "content" / BY_NAME["a"]).read_bytes() == ITEMS["a"]
    # Served: now it may go, and the cache is back within its cap.
    await _get(cache, "d")
    assert cache.total <= 150
    assert _files(tmp_path) == {BY_NAME["d"]}


async def test_concurrent_misses_share_one_fetch(tmp_path: Path) -> None:
    server = FakeServer()
    server.gate = asyncio.Event()
    cache = _cache(tmp_path, 10_000, server)
    waiters = [asyncio.create_task(_get(cache, "a")) for _ in range(5)]
    while not server.fetches:
        await asyncio.sleep(0)
    waiters[0].cancel()  # one agent gives up: the fetch goes on for the others
    server.gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1:] == [100] * 4
    assert server.fetches == [BY_NAME["a"]]
    assert cache.pins == {}


@pytest.mark.parametrize("lie", ["corrupt", "short", "long"])
async def test_bytes_that_do_not_match_are_not_cached(tmp_path: Path, lie: str) -> None:
    server = FakeServer()
    if lie == "corrupt":
        server.corrupt = True
    else:
        server.length = 50 if lie == "short" else 200
    cache = _cache(tmp_path, 10_000, server)
    with pytest.raises(FetchError) as err:
        await _get(cache, "a")
    if lie == "corrupt":
        assert err.value.status == 502 and "nothing cached" in err.value.message
    else:
        # Short: the body ends at the declared length, so the hash differs (502); long: the
        # connection ends before the declared length (503: retry).
        assert err.value.status in (502, 503)
    assert _files(tmp_path) == set() and cache.total == 0 and cache.pins == {}


async def test_unknown_content_is_404_and_nothing_is_kept(tmp_path: Path) -> None:
    cache = _cache(tmp_path, 10_000, FakeServer())
    with pytest.raises(FetchError) as err:
        async with cache.pinned("0" * 64):
            pass
    assert err.value.status == 404
    assert _files(tmp_path) == set()


async def test_a_restart_drops_partial_fetches_and_keeps_the_lru_order(tmp_path: Path) -> None:
    server = FakeServer()
    cache = _cache(tmp_path, 10_000, server)
    for name in "abc":
        await _get(cache, name)
    folder = tmp_path / "content"
    for i, name in enumerate("bac"):  # b oldest, then a, then c
        os.utime(folder / BY_NAME[name], (1000 + i, 1000 + i))
    (folder / f".fetch-{BY_NAME['d']}-1234").write_bytes(ITEMS["d"][:30])  # killed mid-fetch
    again = _cache(tmp_path, 250, server)  # a smaller cap at restart: b goes
    assert _files(tmp_path) == {BY_NAME["a"], BY_NAME["c"]}
    assert list(again.sizes) == [BY_NAME["a"], BY_NAME["c"]]
    assert again.total == 200
