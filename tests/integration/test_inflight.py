"""A batch of publishes larger than the in-flight window, against a real broker.

paho sends at most ``max_inflight_messages`` QoS 1 publishes before their
PUBACKs and queues the rest; khod_wire skips paho's search for queued ones
while none is queued (``_skip_idle_inflight_scans``). The window is made
small here so that a batch does queue: every message must still arrive.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from khod.broker import PrivateBroker
from khod_wire import _mqtt
from khod_wire.message import Message, Publication
from khod_wire.transport import Connection, client_id
from khod_wire.urls import BrokerURL

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("window", [3, _mqtt.MAX_INFLIGHT])
async def test_a_batch_beyond_the_window_is_all_delivered(
    broker: PrivateBroker, monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    monkeypatch.setattr(_mqtt, "MAX_INFLIGHT", window)
    topic = f"test/inflight/{client_id('t')}"
    got: list[bytes] = []
    all_in = asyncio.Event()
    count = 50

    async def received(m: Message) -> None:
        got.append(m.payload)
        if len(got) == count:
            all_in.set()

    url = BrokerURL.parse(broker.url)
    reader = Connection(url, identifier=client_id("r"), subscriptions=[topic], on_message=received)
    writer = Connection(url, identifier=client_id("w"))
    tasks = [asyncio.create_task(c.run()) for c in (reader, writer)]
    try:
        await reader.wait_connected(10)
        await writer.wait_connected(10)
        batch = [Publication(topic=topic, payload=b"%d" % i) for i in range(count)]
        assert await asyncio.wait_for(writer.publish_many(batch), 10) == count
        # A second batch on the same connection: the window was given back.
        assert await asyncio.wait_for(writer.publish_many(batch[:5]), 10) == 5
        await asyncio.wait_for(all_in.wait(), 10)
        assert got[:count] == [b"%d" % i for i in range(count)]
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
