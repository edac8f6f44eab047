"""The daemon's retained topics and replies: what every monitor and participant sees.

``Announcer`` publishes the daemon state, the O(1) handover signal (every
participant subscribes to it, so it is published only when the handover's
state changes), each participant's own state, the detailed progress for
monitors (at a bounded rate, by the caller) and replies. Each call is one
QoS 1 publish; the daemon sends a batch's publishes together.
"""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel

from khod.protocol import (
    JSON,
    DaemonStatus,
    HandoverSignal,
    HandoverStatus,
    ParticipantStatus,
    Topics,
    encode,
)


class Publisher(Protocol):
    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        content_type: str | None = None,
        response_topic: str | None = None,
        correlation: bytes | None = None,
    ) -> bool: ...


class Announcer:
    def __init__(self, publisher: Publisher, topics: Topics) -> None:
        self.pub = publisher
        self.topics = topics

    async def _retain(self, topic: str, model: BaseModel | None) -> None:
        # An empty retained message deletes the topic.
        body = b"" if model is None else encode(model)
        await self.pub.publish(topic, body, retain=True, content_type=JSON)

    async def daemon(self, status: DaemonStatus) -> None:
        await self._retain(self.topics.daemon, status)

    async def signal(self, signal: HandoverSignal) -> None:
        await self._retain(self.topics.handover, signal)

    async def progress(self, status: HandoverStatus) -> None:
        await self._retain(self.topics.progress, status)

    async def participant(self, name: str, status: ParticipantStatus | None) -> None:
        await self._retain(self.topics.state(name), status)

    async def clear(self, topic: str) -> None:
        await self.pub.publish(topic, b"", retain=True)

    async def reply(self, topic: str, body: bytes, ctype: str, correlation: bytes | None) -> None:
        await self.pub.publish(topic, body, content_type=ctype, correlation=correlation)
