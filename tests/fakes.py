"""Fakes for unit tests of the daemon's logic (never for integration tests)."""

from __future__ import annotations

from typing import Any


class Recorder:
    """A publisher that records what the daemon would put on the bus."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, dict[str, Any]]] = []

    async def publish(self, topic: str, payload: bytes, **kw: Any) -> bool:
        self.sent.append((topic, payload, kw))
        return True
