"""The daemon's retained topics and replies: what every monitor and participant sees.

``Announcer`` publishes the daemon state, the O(1) handover signal (every
participant subscribes to it, so it is published only when the handover's
state changes), each participant's own state, the detailed progress for
monitors (at a bounded rate, by the caller) and replies. Each call is one
QoS 1 publish; the daemon sends a batch's publishes together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pydantic import BaseModel

from khod_wire.protocol import (
    JSON,
    DaemonStatus,
    HandoverSignal,
    HandoverStatus,
    ParticipantStatus,
    Topics,
    encode,
)
from khod_wire.transport import Publication


class Publisher(Protocol):
    async def publish_many(self, messages: Sequence[Publication], *, wait: bool = True) -> int: ...

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
        m = self.retained(topic, model)
        await self.pub.publish(m.topic, m.payload, retain=True, content_type=m.content_type)

    async def daemon(self, status: DaemonStatus) -> None:
        await self._retain(self.topics.daemon, status)

    async def progress(self, status: HandoverStatus) -> None:
        await self._retain(self.topics.progress, status)

    async def clear(self, topic: str) -> None:
        await self.pub.publish(topic, b"", retain=True)

    async def reply(self, topic: str, body: bytes, ctype: str, correlation: bytes | None) -> None:
        await self.pub.publish(topic, body, content_type=ctype, correlation=correlation)

    # -- batches: built first, then sent together (one wait for all PUBACKs) --

    def retained(self, topic: str, model: BaseModel | None) -> Publication:
        # An empty retained message deletes the topic.
        body = b"" if model is None else encode(model)
        return Publication(topic, body, retain=True, content_type=JSON)

    def signal_of(self, signal: HandoverSignal) -> Publication:
        return self.retained(self.topics.handover, signal)

    def state_of(self, name: str, status: ParticipantStatus | None) -> Publication:
        return self.retained(self.topics.state(name), status)

    def daemon_of(self, status: DaemonStatus) -> Publication:
        return self.retained(self.topics.daemon, status)

    @staticmethod
    def reply_of(topic: str, body: bytes, ctype: str, correlation: bytes | None) -> Publication:
        return Publication(topic, body, content_type=ctype, correlation=correlation)

    async def send(self, messages: Sequence[Publication]) -> None:
        """Queue a batch, in order; the PUBACKs are checked in the background.

        What is sent here is durable already and published again after any
        reconnect; a reply lost with the connection is asked for again by
        its client and answered from the reply cache.
        """
        await self.pub.publish_many(messages, wait=False)
