"""The daemon's retained topics: what every monitor and participant sees.

``Announcer`` publishes the daemon, handover and participant states. The
handover state goes to every participant (it is their freeze and cancel
signal), so one publish costs N deliveries: within a burst of requests it is
published once, when the burst is over, unless the handover itself changed
state, which is announced before the request that caused it is answered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from pydantic import BaseModel

from khod.protocol import JSON, DaemonStatus, HandoverStatus, ParticipantStatus, Topics, encode


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
    def __init__(
        self,
        publisher: Publisher,
        topics: Topics,
        handover: Callable[[], HandoverStatus],
        *,
        backlog: Callable[[], int] = lambda: 0,
    ) -> None:
        self.pub = publisher
        self.topics = topics
        self.handover = handover
        self.backlog = backlog
        self._dirty = False

    async def _retain(self, topic: str, model: BaseModel | None) -> None:
        # An empty retained message deletes the topic.
        body = b"" if model is None else encode(model)
        await self.pub.publish(topic, body, retain=True, content_type=JSON)

    async def daemon(self, status: DaemonStatus) -> None:
        await self._retain(self.topics.daemon, status)

    async def participant(self, name: str, status: ParticipantStatus | None) -> None:
        await self._retain(self.topics.state(name), status)

    def handover_changed(self) -> None:
        self._dirty = True

    async def flush(self, *, force: bool = False) -> None:
        """Publish the handover state if it changed and the burst is over (or forced)."""
        if self._dirty and (force or self.backlog() == 0):
            self._dirty = False
            await self._retain(self.topics.handover, self.handover())

    async def clear(self, topic: str) -> None:
        await self.pub.publish(topic, b"", retain=True)

    async def reply(self, topic: str, body: bytes, ctype: str, correlation: bytes | None) -> None:
        await self.pub.publish(topic, body, content_type=ctype, correlation=correlation)
