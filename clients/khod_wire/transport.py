"""One MQTT v5 connection that stays up: reconnects, publishes, requests.

aiomqtt does not reconnect by itself, so every long-lived khod process (the
daemon, each SDK participant, ``khod monitor``) runs ``Connection.run()``:
connect, subscribe, hand every message to a callback, and on any broker
failure wait a little (exponential backoff, capped) and start again.
``Connection.request()`` implements MQTT v5 request/response and retries a
request with the *same* correlation data until a reply arrives, so a broker
restart in the middle of a request costs a duplicate at most, which the
daemon answers from its reply cache.

It speaks khod's types only (:class:`~khod_wire.message.Message`,
:class:`~khod_wire.message.Will`, :class:`~khod_wire.message.Publication`);
:mod:`khod_wire._mqtt` is the layer below that talks aiomqtt.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from khod_wire import _mqtt
from khod_wire._mqtt import MAX_INFLIGHT
from khod_wire.errors import BrokerRefused, RequestTimeout
from khod_wire.inbound import InboundQueue
from khod_wire.message import Message, Publication, Will
from khod_wire.reasons import PERMANENT_CONNACK, Reason, refusal
from khod_wire.urls import BrokerURL

__all__ = [
    "MAX_INFLIGHT",
    "Backoff",
    "ConnectHandler",
    "Connection",
    "MessageHandler",
    "Publication",
    "client_id",
]

log = logging.getLogger(__name__)

MessageHandler = Callable[[Message], Awaitable[None]]
ConnectHandler = Callable[[], Awaitable[None]]

#: The PUBACKs of queued publishes, with the topic each is for.
_Acks = list[tuple[str, "asyncio.Future[Reason]"]]


class Backoff:
    """Exponential reconnect delay, reset by a successful connection."""

    def __init__(self, first: float = 0.05, cap: float = 2.0) -> None:
        self.first, self.cap, self.delay = first, cap, first

    def next(self) -> float:
        d = self.delay
        self.delay = min(self.delay * 2, self.cap)
        return d

    def reset(self) -> None:
        self.delay = self.first


class Connection:
    """A broker connection that reconnects by itself.

    Keyword-only arguments:
      url: where the broker is.
      identifier: MQTT client id (unique per process).
      subscriptions: topics subscribed (QoS 1) on every (re)connect.
      on_message: awaited for every message, in order, one at a time.
      on_connect: awaited after each (re)connect, before messages flow, e.g.
        to publish retained state again.
      will: the last will, published by the broker if this process vanishes.
      no_local: do not receive our own publications on our subscriptions
        (MQTT v5 No Local), e.g. a daemon that watches the topics it writes.
      retain_as_published: keep the retain flag of messages forwarded live
        (MQTT v5 Retain As Published). Without it the broker clears the flag
        on live delivery, and a receiver cannot tell that a message was
        retained, e.g. a daemon that must never execute a retained request.
      max_inbound_bytes: bound the messages received and not yet handed to
        on_message by the bytes they hold (InboundQueue); None: unbounded.
      session_expiry: keep the session (subscriptions and queued QoS 1
        messages) this many seconds after a disconnect, so that requests and
        wills sent while this client restarts wait for it at the broker.
        Needs a stable ``identifier``. It also sets the QoS of every
        subscription: 1 with a kept session (what arrives while away waits
        for this client), 0 without. A clean session loses what was in
        flight at a disconnect either way (and reads the retained states
        again), so QoS 1 delivery would only cost a PUBACK per message:
        inside the blackout, one per participant per message.

    Refusals by the broker are reported, not retried into a timeout: a
    refused login (wrong user or password, a client id not allowed) or a
    refused subscription is kept in ``refusal``, which ``wait_connected()``
    and ``request()`` raise at once (BrokerRefused, NotAuthorized for 0x86
    and 0x87); a refused publish is logged, and raised by ``request()``.
    ``run()`` itself keeps trying, as a daemon must.
    """

    def __init__(
        self,
        url: BrokerURL,
        *,
        identifier: str,
        subscriptions: Sequence[str] = (),
        on_message: MessageHandler | None = None,
        on_connect: ConnectHandler | None = None,
        will: Will | None = None,
        keepalive: int = 10,
        no_local: bool = False,
        retain_as_published: bool = False,
        max_inbound_bytes: int | None = None,
        session_expiry: int | None = None,
    ) -> None:
        self.url = url
        self.identifier = identifier
        self.subscriptions = list(subscriptions)
        self.on_message = on_message
        self.on_connect = on_connect
        self.will = will
        self.keepalive = keepalive
        self.no_local = no_local
        self.retain_as_published = retain_as_published
        self.max_inbound_bytes = max_inbound_bytes
        self.session_expiry = session_expiry
        self.subscribe_qos = 1 if session_expiry else 0
        self.connects = 0
        self.refusal: BrokerRefused | None = None
        self._client: _mqtt.Client | None = None
        self._connected = asyncio.Event()
        self._wake = asyncio.Event()
        self._pending: dict[bytes, asyncio.Future[Message]] = {}
        self.reply_topic: str | None = None
        self._background: set[asyncio.Task[int]] = set()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def backlog(self) -> int:
        """Messages received and not yet handed to on_message."""
        client = self._client
        return client.backlog() if client is not None else 0

    def _make_client(self) -> _mqtt.Client:
        queue = None
        if self.max_inbound_bytes is not None:
            queue = functools.partial(InboundQueue, max_bytes=self.max_inbound_bytes)
        return _mqtt.client(
            self.url,
            identifier=self.identifier,
            will=self.will,
            keepalive=self.keepalive,
            session_expiry=self.session_expiry,
            queue=queue,
        )

    async def run(self) -> None:
        """Stay connected until cancelled."""
        backoff = Backoff()
        while True:
            try:
                async with _mqtt.connected(self._make_client()) as client:
                    self._client = client
                    backoff.reset()
                    self._refused(None)
                    topics = [*self.subscriptions]
                    if self.reply_topic:
                        topics.append(self.reply_topic)
                    for topic in topics:
                        granted = await client.subscribe_at(
                            topic,
                            self.subscribe_qos,
                            no_local=self.no_local,
                            retain_as_published=self.retain_as_published,
                        )
                        self._check_suback(topic, granted)
                    self.connects += 1
                    if self.on_connect is not None:
                        await self.on_connect()
                    self._connected.set()
                    self._wake.set()
                    async for message in client.received():
                        await self._dispatch(message)
            except _mqtt.ConnectRefused as exc:
                rc = exc.reason
                if rc is not None and rc.value in PERMANENT_CONNACK:
                    err = refusal("the connection", self.url, rc)
                    if self.refusal is None or str(self.refusal) != str(err):
                        log.error("%s: %s", self.identifier, err)
                    self._refused(err)
                else:
                    log.info("%s: broker %s: %s; reconnecting", self.identifier, self.url, exc)
            except _mqtt.LinkLost as exc:
                log.info("%s: broker %s: %s; reconnecting", self.identifier, self.url, exc)
            finally:
                self._connected.clear()
                self._client = None
            await asyncio.sleep(backoff.next())

    def _refused(self, err: BrokerRefused | None) -> None:
        self.refusal = err
        if err is not None:
            self._wake.set()

    def _check_suback(self, topic: str, granted: Sequence[Reason]) -> None:
        for code in granted:
            if code.failed:
                err = refusal(f"a subscription to {topic}", self.url, code)
                log.error("%s: %s", self.identifier, err)
                self._refused(err)

    async def _dispatch(self, message: Message) -> None:
        # The reply topic is one concrete topic (no wildcard): equality is a match.
        if message.topic == self.reply_topic:
            fut = self._pending.get(message.correlation or b"")
            if fut is not None and not fut.done():
                fut.set_result(message)
            return
        if self.on_message is not None:
            await self.on_message(message)

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Until connected; RequestTimeout after ``timeout``, BrokerRefused at once."""

        async def until() -> None:
            while not self._connected.is_set():
                if self.refusal is not None:
                    raise self.refusal
                self._wake.clear()
                await self._wake.wait()

        try:
            await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            raise RequestTimeout(
                f"no connection to the broker at {self.url} after {timeout:g}s"
            ) from None

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        content_type: str | None = None,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        expiry: float | None = None,
    ) -> bool:
        """Publish at QoS 1; False when not connected or refused (logged; the caller decides)."""
        message = Publication(
            topic,
            payload,
            retain=retain,
            content_type=content_type,
            correlation=correlation,
            response_topic=response_topic,
            expiry=expiry,
        )
        return await self.publish_many((message,)) == 1

    async def publish_many(self, messages: Sequence[Publication], *, wait: bool = True) -> int:
        """Publish each at QoS 1, in order, and wait for all their PUBACKs at once.

        For a batch of replies and states: queued together, they cost one
        wait instead of one task and one wait each. Returns how many were
        accepted; a refused or undeliverable one is logged, never raised.
        ``wait=False`` returns once they are queued (how many) and checks the
        PUBACKs in the background: for a sender that made its state durable
        before publishing and publishes it again after a reconnect, a broker
        slow to acknowledge must not hold up what it does next.
        """
        # Usable as soon as the session is up, so that on_connect can publish.
        client = self._client
        if client is None or not messages:
            return 0
        acks = self._queue_all(client, messages)
        if not wait:
            task = asyncio.create_task(self._acknowledged(client, acks), name="acks")
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return len(acks)
        return await self._acknowledged(client, acks)

    def _queue_all(self, client: _mqtt.Client, messages: Sequence[Publication]) -> _Acks:
        acks = []
        for m in messages:
            try:
                ack = client.publish_nowait(
                    m.topic,
                    m.payload,
                    retain=m.retain,
                    content_type=m.content_type,
                    response_topic=m.response_topic,
                    correlation=m.correlation,
                    expiry=m.expiry,
                )
            # ValueError: paho refuses the topic (e.g. a wildcard); never fatal here.
            except (_mqtt.LinkLost, ValueError) as exc:
                log.info("%s: publish to %s failed: %s", self.identifier, m.topic, exc)
                continue
            acks.append((m.topic, ack))
        return acks

    async def _acknowledged(self, client: _mqtt.Client, acks: _Acks) -> int:
        if not acks:
            return 0
        acked = asyncio.gather(*(f for _, f in acks))
        # aiomqtt keeps waiting for the PUBACK of a connection that is already
        # gone, until its timeout; give up as soon as the connection drops.
        waiting: set[asyncio.Future[Any]] = {acked, client.lost}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not acked.done():
                acked.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await acked
            client.forget_done()
        if acked.cancelled():
            if len(acks) == 1:
                log.info("%s: publish to %s failed: disconnected", self.identifier, acks[0][0])
            else:
                log.info("%s: %d publishes lost with the connection", self.identifier, len(acks))
            return 0
        ok = 0
        for topic, fut in acks:
            code = fut.result()
            if code.failed:
                log.warning(
                    "%s: %s", self.identifier, refusal(f"a publish to {topic}", self.url, code)
                )
            else:
                ok += 1
        return ok

    async def request(
        self,
        topic: str,
        payload: bytes,
        *,
        content_type: str,
        timeout: float,
        retry_every: float = 2.0,
        correlation: bytes | None = None,
    ) -> Message:
        """Send a request and await its one reply, re-sending across reconnects.

        The correlation data stays the same for every re-send, so the daemon
        recognises a duplicate and answers it from its reply cache. A caller
        that must retry across its own restart passes the ``correlation`` it
        used before, and gets the same answer.
        """
        if self.reply_topic is None:
            raise RuntimeError("Connection.request() needs reply_topic set before run()")
        correlation = correlation or uuid.uuid4().bytes
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[correlation] = fut
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        try:
            while True:
                left = end - loop.time()
                if left <= 0:
                    raise RequestTimeout(f"no reply to {topic} within {timeout:g}s")
                if not self.connected:
                    with contextlib.suppress(RequestTimeout):
                        await self.wait_connected(min(left, retry_every))
                    continue
                if self.refusal is not None:
                    raise self.refusal  # e.g. the reply topic: no reply could arrive
                client = self._client
                if client is None:
                    await asyncio.sleep(0.05)
                    continue
                # A request nobody waits for any more must not be queued for
                # a daemon that comes back later, and then executed.
                message = Publication(
                    topic,
                    payload,
                    content_type=content_type,
                    correlation=correlation,
                    response_topic=self.reply_topic,
                    expiry=left,
                )
                queued = self._queue_all(client, (message,))
                if not queued:
                    await asyncio.sleep(min(retry_every, left))  # then again, or time out
                    continue
                [(_, ack)] = queued
                # No task per request: wait on the futures themselves, for the
                # reply, a refusing PUBACK, or the connection's end, until the
                # next re-send is due.
                lost = client.lost
                waiting: set[asyncio.Future[Any]] = {fut, ack, lost}
                due = loop.time() + min(retry_every, max(end - loop.time(), 0.001))
                while not fut.done() and loop.time() < due:
                    await asyncio.wait(
                        waiting, timeout=due - loop.time(), return_when=asyncio.FIRST_COMPLETED
                    )
                    if ack in waiting and ack.done():
                        waiting.discard(ack)
                        code = None if ack.cancelled() else ack.result()
                        if code is not None and code.failed:
                            raise refusal(f"a publish to {topic}", self.url, code)
                    if lost.done():
                        break  # re-sent once the connection is back
                if fut.done():
                    return fut.result()
        finally:
            self._pending.pop(correlation, None)


def client_id(prefix: str) -> str:
    """A client id unique to this process and call."""
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
