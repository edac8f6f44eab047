"""Fakes for unit tests of the daemon's logic (never for integration tests)."""

from __future__ import annotations

import asyncio
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    from khod.daemon import Daemon
    from khod.transport import Publication


class Recorder:
    """A publisher that records what the daemon would put on the bus."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, dict[str, Any]]] = []

    async def publish(self, topic: str, payload: bytes, **kw: Any) -> bool:
        self.sent.append((topic, payload, kw))
        return True

    async def publish_many(self, messages: Sequence[Publication], *, wait: bool = True) -> int:
        for m in messages:
            await self.publish(
                m.topic,
                m.payload,
                retain=m.retain,
                content_type=m.content_type,
                correlation=m.correlation,
            )
        return len(messages)


_workers: weakref.WeakKeyDictionary[Daemon, asyncio.Task[None]] = weakref.WeakKeyDictionary()


async def settle(daemon: Daemon) -> None:
    """Run the daemon's worker (once per daemon and event loop) until nothing is left to do.

    ``khod run`` runs the worker in its TaskGroup; an in-process test calls
    this after ``handle()`` to see the replies and publishes it caused.
    """
    task = _workers.get(daemon)
    if task is None or task.done():
        _workers[daemon] = asyncio.create_task(daemon.run(), name="test-worker")
    await daemon.settled()
