"""The client layer, aiomqtt's side: the one module of khod that imports aiomqtt.

It owns aiomqtt's client subclass (PUBACK reason codes, socket watching that
survives a dropped connection, paho's hooks from :mod:`khod_wire._paho`
installed on its own paho client), how it connects (a khod
:class:`~khod_wire.message.Will` becomes paho's), and aiomqtt's errors as
:class:`LinkLost`. With :mod:`khod_wire._paho` (paho's side of the same
edge) it is the client layer: nothing else imports aiomqtt or paho.
:mod:`khod_wire.transport` builds the reconnecting connection on top.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import aiomqtt
import paho.mqtt.client as mqtt
from aiomqtt.exceptions import MqttConnectError
from aiomqtt.types import PahoSocket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from khod_wire import _paho
from khod_wire._paho import message_of, properties, reason
from khod_wire.message import Message, Will
from khod_wire.reasons import Reason
from khod_wire.urls import BrokerURL

#: QoS 1 publishes of one connection that may wait for their PUBACK at once.
MAX_INFLIGHT = 4096


class LinkLost(Exception):
    """The connection failed or dropped (aiomqtt's MqttError); the text is aiomqtt's."""


class ConnectRefused(LinkLost):
    """The broker answered CONNECT with a failure; ``reason`` None when it gave no code."""

    def __init__(self, reason: Reason | None, text: str) -> None:
        super().__init__(text)
        self.reason = reason


class _ExpectedDisconnects(logging.Filter):
    """paho logs a connection the broker dropped as an ERROR; it is expected.

    The reconnect loop says it once, at INFO, with what happened next.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and str(record.msg).startswith(
            ("failed to receive on socket", "failed to send on socket")
        ):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return PAHO_LOG.isEnabledFor(logging.DEBUG)
        return True


PAHO_LOG = logging.getLogger("khod.mqtt")
PAHO_LOG.addFilter(_ExpectedDisconnects())


class Client(aiomqtt.Client):
    """aiomqtt's client with khod's types at its edges.

    aiomqtt awaits the PUBACK but drops its reason code, so a publish the
    broker refused (0x87 when the ACL says no) would look like a success:
    :meth:`publish_nowait` returns a future of the PUBACK's reason instead.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, logger=PAHO_LOG, **kwargs)
        self._acks: dict[int, asyncio.Future[Reason]] = {}
        #: a write of what paho queued is scheduled for the next turn of the loop
        self._write_soon = False
        _paho.skip_idle_inflight_scans(self._client)
        _paho.read_publishes_directly(self._client, self._deliver)
        _paho.read_pubacks_directly(self._client)

    @property
    def lost(self) -> asyncio.Future[None]:
        """Done once this connection has ended (with an exception if it broke)."""
        # aiomqtt keeps it private and offers no public way to wait for the
        # end; this layer is the only one that reads it.
        return self._disconnected

    def backlog(self) -> int:
        """Messages received and not yet taken."""
        return len(self.messages)

    def received(self) -> AsyncIterator[Message]:
        """The received messages, in order; inside :func:`connected`, LinkLost at the end."""
        # _on_message below queues khod Messages, not aiomqtt's.
        return cast("AsyncIterator[Message]", self.messages)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        # Instead of aiomqtt's Message: one conversion per message, not two.
        self._deliver(message_of(message))

    def _deliver(self, m: Message) -> None:
        try:
            self._queue.put_nowait(m)  # type: ignore[arg-type]
        except asyncio.QueueFull:
            self._logger.warning("Message queue is full. Discarding message.")

    async def subscribe_at(
        self, topic: str, qos: int, *, no_local: bool, retain_as_published: bool
    ) -> list[Reason]:
        options = SubscribeOptions(qos=qos, noLocal=no_local, retainAsPublished=retain_as_published)
        granted = await self.subscribe(topic, options=options)
        return [reason(code) for code in granted]

    def no_delay(self) -> None:
        """Send every packet at once (TCP_NODELAY).

        Without it a reply that follows a PUBACK waits for the peer's delayed
        ACK: ~40 ms per request over TCP. A Unix socket has no such option.
        """
        sock = self._client.socket()
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def publish_nowait(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        content_type: str | None = None,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        expiry: float | None = None,
    ) -> asyncio.Future[Reason]:
        """Queue a QoS 1 publish now; the future is its PUBACK's reason.

        LinkLost when paho cannot queue it, ValueError for a topic it refuses
        (e.g. a wildcard). The caller calls :meth:`forget_done` once it stops
        waiting for futures it cancelled.
        """
        props = properties(
            content_type=content_type,
            response_topic=response_topic,
            correlation=correlation,
            expiry=expiry,
        )
        info = self._client.publish(topic, payload, 1, retain, props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise LinkLost(str(aiomqtt.MqttCodeError(info.rc, "Could not publish message")))
        fut: asyncio.Future[Reason] = asyncio.get_running_loop().create_future()
        # The PUBACK is read by a callback of this same event loop, so it
        # cannot have arrived before this line.
        self._acks[info.mid] = fut
        return fut

    def forget_done(self) -> None:
        """Drop the futures of PUBACKs nobody waits for any more."""
        for mid, fut in list(self._acks.items()):
            if fut.done():
                self._acks.pop(mid, None)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        fut = self._acks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(reason(reason_code))
        super()._on_publish(client, userdata, mid, reason_code, properties)

    # aiomqtt registers the socket's reader and writer with
    # call_soon_threadsafe, that is later: when the broker has dropped the
    # connection meanwhile, paho has closed the socket by then and asyncio
    # logs "Exception in callback ... KeyError: '10 is not registered'" for an
    # expected disconnect (or, if the number was reused, watches another
    # socket). Register only a socket that is still this client's.
    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: PahoSocket) -> None:
        def read() -> None:
            while True:
                client.loop_read()
                # An SSL socket may hold decoded bytes that select() does not see.
                pending = getattr(client.socket(), "pending", None)
                if pending is None or pending() <= 0:
                    break

        def start_misc() -> None:
            self._misc_task = self._loop.create_task(self._misc_loop())

        self._watch_later(client, sock, self._loop.add_reader, read, then=start_misc)

    def _on_socket_register_write(
        self, client: mqtt.Client, userdata: Any, sock: PahoSocket
    ) -> None:
        # paho asks for this after every packet it queues. Watching the socket
        # for each one costs a wake-up of the loop and two epoll changes per
        # publish; instead, write at the next turn of the loop everything
        # queued until then (a batch of replies is one write), and watch the
        # socket only when the kernel did not take it all.
        if self._write_soon:
            return
        self._write_soon = True
        fd = sock.fileno()

        def write() -> None:
            try:
                if fd < 0 or sock.fileno() != fd or client.socket() is not sock:
                    return
                self._step(client.loop_write)
            finally:
                self._write_soon = False
            if client.want_write() and client.socket() is sock:
                self._loop.add_writer(fd, self._step, client.loop_write)

        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:  # paho connects in an executor thread
            on_loop = False
        if on_loop:
            self._loop.call_soon(write)
        else:
            self._loop.call_soon_threadsafe(write)

    def _on_socket_unregister_write(
        self, client: mqtt.Client, userdata: Any, sock: PahoSocket
    ) -> None:
        fd = sock.fileno()
        if fd >= 0:
            self._loop.remove_writer(fd)

    def _step(self, step: Callable[[], object]) -> None:
        try:
            step()
        except Exception as exc:  # as aiomqtt: a broken connection
            if not self._disconnected.done():
                self._disconnected.set_exception(exc)

    def _watch_later(
        self,
        client: mqtt.Client,
        sock: PahoSocket,
        watch: Callable[[int, Callable[[], None]], object],
        step: Callable[[], object],
        then: Callable[[], None] | None = None,
    ) -> None:
        fd = sock.fileno()

        def ready() -> None:
            self._step(step)

        def register() -> None:
            if fd >= 0 and sock.fileno() == fd and client.socket() is sock:
                watch(fd, ready)
            if then is not None:
                then()

        self._loop.call_soon_threadsafe(register)


def client(
    url: BrokerURL,
    *,
    identifier: str,
    will: Will | None,
    keepalive: int,
    session_expiry: int | None,
    queue: Callable[[], asyncio.Queue[Message]] | None,
) -> Client:
    """A client for ``url`` as every khod connection uses it (MQTT v5, QoS 1)."""
    connect_props = None
    if session_expiry:
        connect_props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        connect_props.SessionExpiryInterval = session_expiry
    last_will = None
    if will is not None:
        last_will = aiomqtt.Will(
            will.topic,
            will.payload,
            qos=1,
            retain=will.retain,
            properties=properties(content_type=will.content_type),
        )
    return Client(
        url.host,
        url.port,
        transport=url.transport,
        username=url.username,
        password=url.password,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
        will=last_will,
        keepalive=keepalive,
        timeout=10,
        clean_start=not session_expiry,
        properties=connect_props,
        queue_type=cast("type[asyncio.Queue[aiomqtt.Message]] | None", queue),
        # paho's default lets 20 QoS 1 publishes wait for their PUBACK and
        # queues the rest: the daemon answering a burst of 1,000 requests
        # would pay 50 round trips. The broker sets no limit of its own
        # (max_inflight_messages 0 in its config).
        max_inflight_messages=MAX_INFLIGHT,
    )


@contextlib.asynccontextmanager
async def connected(c: Client) -> AsyncIterator[Client]:
    """Connected for the block; aiomqtt's errors, in it too, come out as LinkLost."""
    try:
        async with c:
            c.no_delay()
            yield c
    except MqttConnectError as exc:
        rc = exc.rc
        raise ConnectRefused(None if rc is None else reason(rc), str(exc)) from exc
    except aiomqtt.MqttError as exc:
        raise LinkLost(str(exc)) from exc
    finally:
        # aiomqtt stores a lost connection as an exception on a private future
        # that nobody awaits once we have left the client; retrieve it so
        # asyncio does not report "Future exception was never retrieved" on
        # every broker restart.
        lost = c._disconnected
        if lost.done() and not lost.cancelled():
            lost.exception()
