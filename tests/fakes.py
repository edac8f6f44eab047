"""Fakes for unit tests of the daemon's logic (never for integration tests)."""

from __future__ import annotations

import asyncio
import json
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    from khod.daemon import Daemon
    from khod_wire.message import Publication
    from khod_wire.protocol import Reply


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


class InProcessBus:
    """One daemon in this process, a real store, requests in, what it sends recorded.

    ``call`` sends one request as the bus would deliver it, lets the worker
    run, and returns the one reply (a raw ``retrieve`` reply as
    ``{"raw": hex}`` data).
    """

    def __init__(self, state_dir: Path, host: str, **settings: Any) -> None:
        from khod.config import Settings
        from khod.daemon import Daemon
        from khod.store import Store
        from khod_wire.protocol import Topics

        self.settings = Settings(host_id=host, state_dir=state_dir, **settings)
        self.store = Store(state_dir)
        self.pub = Recorder()
        self.daemon = Daemon(self.settings, self.store, self.pub)
        self.t = Topics(host)
        self.n = 0

    async def call(self, name: str | None, op: str, body: bytes | dict[str, Any] = b"") -> Reply:
        from khod_wire.protocol import DTB, JSON, ControlOp, ParticipantOp, Reply

        self.n += 1
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        if name is None:
            topic, reply_to = self.t.control(ControlOp(op)), self.t.control_reply("t")
        else:
            topic, reply_to = self.t.request(name, ParticipantOp(op)), self.t.reply(name)
        ctype = DTB if op == "fragment" else JSON
        start = len(self.pub.sent)
        await self.daemon.handle(topic, body, (ctype, reply_to, f"c{self.n}".encode()))
        await settle(self.daemon)
        [(_, payload, kw)] = [s for s in self.pub.sent[start:] if s[0] == reply_to]
        if kw["content_type"] == DTB:
            return Reply(op=op, ok=True, data={"raw": payload.hex()})
        return Reply.model_validate_json(payload)

    async def ok(self, name: str | None, op: str, body: bytes | dict[str, Any] = b"") -> Any:
        reply = await self.call(name, op, body)
        assert reply.ok, reply.error
        return reply.data
