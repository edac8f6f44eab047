"""The bounded queue of received messages waiting for ``on_message``.

The client layer puts every received :class:`~khod_wire.message.Message`
here; the connection takes them out one at a time. Stdlib only.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from khod_wire.message import Message

log = logging.getLogger("khod_wire.transport")

#: What one queued message costs beyond its payload, topics and correlation
#: data. Measured with tracemalloc (paho-mqtt 2.2) when the queue held
#: aiomqtt's messages with paho's Properties (~6.1 KiB each, rounded up); a
#: khod Message holds less, and the bound stays this conservative figure.
MESSAGE_OVERHEAD = 8 * 1024


def message_size(message: Message) -> int:
    """The bytes a received message holds on to, as accounted by InboundQueue."""
    return (
        MESSAGE_OVERHEAD
        + len(message.payload)
        + len(message.correlation or b"")
        + len(message.response_topic or "")
        + len(message.topic)
    )


class InboundQueue(asyncio.Queue[Message]):
    """Received messages waiting for on_message, bounded by the bytes they hold.

    aiomqtt's own queue is unbounded (or bounded by a count, which bounds
    nothing when a message may be 1 MiB): a flood faster than on_message
    would grow it without limit. Past ``max_bytes`` a message is dropped
    (at QoS 1, already acknowledged: the sender's retry brings it back, which
    is how khod's clients re-send a request that got no reply). One message
    is always taken when the queue is empty, whatever its size, so that the
    broker's maximum packet size, not this bound, decides what fits.

    A message without a Response Topic is never re-sent (a participant's
    will, a retained state): those get a reserve of a quarter more, so that a
    flood of requests does not hide a participant that vanished.
    """

    def __init__(self, maxsize: int = 0, *, max_bytes: int) -> None:
        super().__init__(maxsize)
        self.max_bytes = max_bytes
        self.bytes = 0
        self.dropped = 0
        self._dropped_logged = 0
        self._logged_at = -math.inf

    def put_nowait(self, item: Message) -> None:
        size = message_size(item)
        limit = self.max_bytes
        if item.response_topic is None:
            limit += self.max_bytes // 4
        if self.bytes and self.bytes + size > limit:
            self.dropped += 1
            self._report()
            return  # not QueueFull: aiomqtt would log every single one
        super().put_nowait(item)
        self.bytes += size

    def _get(self) -> Message:
        item: Message = super()._get()
        self.bytes -= message_size(item)
        return item

    def _report(self) -> None:
        # A flood must not become a flood of log lines too.
        now = time.monotonic()
        if now - self._logged_at >= 5:
            log.warning(
                "inbound queue over %d bytes: dropped %d messages (%d in all); "
                "their senders' retries bring them back",
                self.max_bytes,
                self.dropped - self._dropped_logged,
                self.dropped,
            )
            self._logged_at, self._dropped_logged = now, self.dropped
