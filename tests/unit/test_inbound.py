"""The daemon's inbound queue is bounded by the bytes it holds (issue 8, item 8)."""

from __future__ import annotations

import asyncio

from paho.mqtt.client import MQTTMessage

from khod_wire._paho import message_of, properties
from khod_wire.inbound import MESSAGE_OVERHEAD, InboundQueue, message_size
from khod_wire.message import Message

TOPIC = "khod/v1/h/p/vm-a/req/fragment"


def message(size: int, *, reply: bool = True, correlation: bytes = b"c" * 16) -> Message:
    m = MQTTMessage(mid=1, topic=TOPIC.encode())
    m.payload = b"x" * size
    m.qos = 1
    m.properties = properties(
        response_topic="khod/v1/h/p/vm-a/reply" if reply else None,
        correlation=correlation if reply else None,
    )
    return message_of(m)  # what the client queues


def test_size_counts_body_topics_and_correlation() -> None:
    small, big = message(0), message(1000, correlation=b"c" * 116)
    assert message_size(big) - message_size(small) == 1000 + 100
    assert message_size(small) >= MESSAGE_OVERHEAD + len(TOPIC)


def test_the_queue_drops_past_its_bound_and_takes_again_once_drained() -> None:
    async def run() -> None:
        q = InboundQueue(max_bytes=1024 * 1024)
        for _ in range(1000):
            q.put_nowait(message(64 * 1024))
        assert q.bytes <= q.max_bytes
        kept = q.qsize()
        assert 0 < kept < 1000 and q.dropped == 1000 - kept
        # A will (no response topic, never re-sent) still fits, in the reserve.
        q.put_nowait(message(0, reply=False))
        assert q.qsize() == kept + 1
        while not q.empty():
            q.get_nowait()
        assert q.bytes == 0
        q.put_nowait(message(64 * 1024))
        assert q.qsize() == 1

    asyncio.run(run())


def test_one_message_larger_than_the_bound_is_taken_when_the_queue_is_empty() -> None:
    async def run() -> None:
        q = InboundQueue(max_bytes=4096)
        q.put_nowait(message(100_000))
        q.put_nowait(message(10))
        assert q.qsize() == 1 and q.dropped == 1
        assert (await q.get()).payload == b"x" * 100_000
        assert q.bytes == 0

    asyncio.run(run())
