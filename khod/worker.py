"""The worker: requests queue, and are applied in batches, one batch at a time.

Every queued request is applied in order (an ``Op`` records what it did in
the ``Batch``); then the whole batch is flushed at once: made durable in one
transaction, then announced. So nothing is acknowledged before it is
durable, and a burst of N requests costs one fsync, not N. What a flush
does is the daemon's business (``flush``); this module owns only the queue,
the batching and the futures of those who wait for their batch.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from khod.replies import Key
from khod.store import Store


@dataclass
class Batch:
    """What one batch of requests changed: written together, then announced."""

    writes: list[Callable[[Store], None]] = field(default_factory=list)
    participants: dict[str, None] = field(default_factory=dict)  # ordered set
    signal: bool = False
    daemon: bool = False
    replies: list[tuple[str, bytes, str, bytes | None, Key | None]] = field(default_factory=list)
    #: participants that sent a request in this batch (see khod.publish)
    asked: set[str] = field(default_factory=set)
    commit: bool = False
    done: list[asyncio.Future[None]] = field(default_factory=list)


Op = Callable[[Batch], Awaitable[None] | None]


class Worker:
    def __init__(self, flush: Callable[[Batch], Awaitable[None]]) -> None:
        #: makes a batch durable and announces it
        self._flush = flush
        self._queue: deque[tuple[Op, asyncio.Future[None] | None]] = deque()
        self._wake = asyncio.Event()

    def enqueue(self, op: Op) -> None:
        """Queue ``op``; nobody waits for it (its reply says when it is done)."""
        self._queue.append((op, None))
        self._wake.set()

    def submit(self, op: Op) -> asyncio.Future[None]:
        """Queue ``op``; the future is done once its batch is announced."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((op, fut))
        self._wake.set()
        return fut

    async def call(self, op: Op) -> None:
        await self.submit(op)

    async def run(self) -> None:
        """Apply what is queued, in batches, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = Batch()
                try:
                    while self._queue:
                        op, fut = self._queue.popleft()
                        if fut is not None:
                            batch.done.append(fut)
                        result = op(batch)
                        if result is not None:
                            await result
                    await self._flush(batch)
                except BaseException as exc:
                    for fut in batch.done:
                        if not fut.done():
                            fut.set_exception(exc)
                    raise
                for fut in batch.done:
                    if not fut.done():
                        fut.set_result(None)
