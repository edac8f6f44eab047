"""The reply cache is bounded by what it really keeps (issue 8, item 6)."""

from __future__ import annotations

import asyncio
import gc
import os
import tracemalloc
from pathlib import Path

import pytest

from khod.config import Settings
from khod.daemon import Daemon
from khod.replies import ReplyCache
from khod.store import Store
from khod_wire.protocol import JSON, MAX_CORRELATION_DATA, ControlOp, Reply, Topics
from tests.fakes import Recorder

TOPIC = "khod/v1/host/p/vm-a/req/frozen"
REPLY_TO = "khod/v1/host/p/vm-a/reply"


def fill(cache: ReplyCache, n: int, *, correlation: int, reply: int) -> None:
    for i in range(n):
        # Fresh objects, as off the bus: the cache's references are the only ones left.
        key = cache.key(TOPIC + "x"[: i % 2], str(i).encode(), REPLY_TO, os.urandom(correlation))
        cache.put(key, os.urandom(reply), JSON)


@pytest.mark.parametrize(
    ("correlation", "reply"),
    [
        (64 * 1024, 16),  # the flood: large keys, small replies
        (16, 16),  # many tiny entries: the per-entry overhead must be counted
        (16, 8 * 1024),  # large replies
    ],
)
def test_the_memory_the_cache_holds_stays_within_max_bytes(correlation: int, reply: int) -> None:
    cache = ReplyCache(max_entries=100_000, max_bytes=2 * 1024 * 1024)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fill(cache, 6000, correlation=correlation, reply=reply)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert cache.size <= cache.max_bytes
    assert held <= cache.max_bytes, f"{held} bytes held for {len(cache)} entries"
    assert len(cache) > 0


def test_an_entry_larger_than_the_whole_cache_is_not_kept() -> None:
    cache = ReplyCache(max_entries=10, max_bytes=4096)
    fill(cache, 3, correlation=16, reply=16)
    kept = len(cache)
    fill(cache, 1, correlation=16, reply=8192)
    assert len(cache) == kept and cache.size <= 4096


def test_replacing_an_entry_keeps_the_count_exact() -> None:
    cache = ReplyCache()
    key = cache.key(TOPIC, b"{}", REPLY_TO, b"c1")
    cache.put(key, b"a" * 100, JSON)
    first = cache.size
    cache.put(key, b"a" * 100, JSON)
    assert cache.size == first and len(cache) == 1
    assert cache.get(key) == (b"a" * 100, JSON)


def test_the_daemon_refuses_long_correlation_data_and_keeps_nothing(tmp_path: Path) -> None:
    async def run() -> None:
        store = Store(tmp_path)
        pub = Recorder()
        daemon = Daemon(Settings(host_id="host", state_dir=tmp_path), store, pub)
        worker = asyncio.create_task(daemon.run())  # asyncio.run() cancels it at the end
        t = Topics("host")
        reply_to = t.control_reply("op")
        for size, ok in ((MAX_CORRELATION_DATA, True), (MAX_CORRELATION_DATA + 1, False)):
            corr = b"c" * size
            start = len(pub.sent)
            await daemon.handle(t.control(ControlOp.STATUS), b"", (JSON, reply_to, corr))
            await daemon.settled()
            [(_, body, kw)] = [s for s in pub.sent[start:] if s[0] == reply_to]
            assert kw["correlation"] == corr  # still matched by the client
            reply = Reply.model_validate_json(body)
            assert reply.ok is ok, reply
            if not ok:
                assert reply.error is not None and reply.error.code == "bad-request"
                assert str(MAX_CORRELATION_DATA) in reply.error.message
        assert len(daemon._replies) == 1  # only the request within the limit
        worker.cancel()
        store.close()

    asyncio.run(run())
