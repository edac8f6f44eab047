"""A plain protocol client for tests: raw requests, no SDK logic in between.

It speaks the wire contract of ``khod_wire.protocol`` directly, the way a client
in another language would, so tests see exactly what the daemon answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from khod_wire.errors import RemoteError
from khod_wire.message import Message
from khod_wire.protocol import (
    DTB,
    JSON,
    ControlOp,
    ParticipantOp,
    RegisterRequest,
    Request,
    Topics,
)
from khod_wire.transport import Connection, client_id
from khod_wire.urls import BrokerURL


class RawClient:
    """Requests as participant ``name`` (or as operator when name is None)."""

    def __init__(self, url: str, host: str, name: str | None = None) -> None:
        self.topics = Topics(host)
        self.name = name
        self.conn = Connection(BrokerURL.parse(url), identifier=client_id(name or "op"))
        self.conn.reply_topic = (
            self.topics.reply(name) if name else self.topics.control_reply(self.conn.identifier)
        )
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RawClient:
        self._task = asyncio.create_task(self.conn.run(), name=f"raw-{self.name}")
        await self.conn.wait_connected(10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def raw(
        self,
        topic: str,
        body: bytes,
        content_type: str = JSON,
        timeout: float = 15,
        correlation: bytes | None = None,
    ) -> tuple[bytes, str | None]:
        m = await self.conn.request(
            topic, body, content_type=content_type, timeout=timeout, correlation=correlation
        )
        return m.payload, m.content_type

    async def op(self, op: ParticipantOp | ControlOp, body: bytes | dict[str, Any] = b"") -> Any:
        """The reply as a dict (JSON) or bytes (a raw fragment)."""
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        if self.name is None:
            topic = self.topics.control(ControlOp(op))
        else:
            topic = self.topics.request(self.name, ParticipantOp(op))
        ctype = DTB if op == ParticipantOp.FRAGMENT else JSON
        payload, reply_type = await self.raw(topic, body, ctype)
        return payload if reply_type == DTB else json.loads(payload)

    async def register(self, compatible: str, instance: int | str, **kw: Any) -> Any:
        req = RegisterRequest(compatible=compatible, instance=instance, **kw)
        return await self.op(ParticipantOp.REGISTER, req.model_dump_json().encode())


class OperatorClient(RawClient):
    """Control requests as a call: ``await op(ControlOp.BEGIN, BeginRequest())``.

    Returns the reply's ``data``; a refusal raises RemoteError with its code.
    """

    def __init__(self, url: str, host: str) -> None:
        super().__init__(url, host)

    async def __call__(
        self, op: ControlOp, req: Request | dict[str, Any] | None = None
    ) -> dict[str, Any]:
        body = req.model_dump_json().encode() if isinstance(req, Request) else req or {}
        reply = await self.op(op, body)
        if not reply["ok"]:
            raise RemoteError(reply["error"]["code"], reply["error"]["message"])
        return reply["data"]  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def watcher(url: str, *topics: str) -> AsyncIterator[dict[str, bytes]]:
    """Latest payload of every topic matching ``topics``, kept up to date."""
    latest: dict[str, bytes] = {}

    async def keep(m: Message) -> None:
        latest[m.topic] = m.payload

    conn = Connection(
        BrokerURL.parse(url), identifier=client_id("watch"), subscriptions=topics, on_message=keep
    )
    task = asyncio.create_task(conn.run(), name="watcher")
    await conn.wait_connected(10)
    try:
        yield latest
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(predicate: Any, timeout: float = 20, what: str = "condition") -> None:
    """Poll ``predicate()`` until true; fail the test with ``what`` on timeout."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
