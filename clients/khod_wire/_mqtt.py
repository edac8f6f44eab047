"""The client layer: the one module of khod that imports aiomqtt and paho.

It owns aiomqtt's client subclass (PUBACK reason codes, socket watching that
survives a dropped connection), the fast PUBLISH properties and reader, and the
translation both ways: a received paho message becomes a khod
:class:`~khod_wire.message.Message` once, a khod :class:`~khod_wire.message.Will`
and publish arguments become paho's, reason codes become
:class:`~khod_wire.reasons.Reason` and aiomqtt's errors :class:`LinkLost`.
:mod:`khod_wire.transport` builds the reconnecting connection on top.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import math
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import aiomqtt
import paho.mqtt.client as mqtt
from aiomqtt.exceptions import MqttConnectError
from aiomqtt.types import PahoSocket
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

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


#: An empty PUBLISH property set, copied for each message (see properties()).
class _PublishProperties(Properties):
    """The properties khod puts on a PUBLISH, packed without paho's generic walk.

    paho's ``pack`` tries every property name of the packet type (string
    replaces, ``hasattr`` and list lookups for each): ~33 us a message, on
    every request, reply and retained state. Only these four are ever set
    here, so they are packed directly, in paho's order (by identifier).
    """

    def pack(self) -> bytes:
        values = self.__dict__
        out = bytearray()
        expiry = values.get("MessageExpiryInterval")
        if expiry is not None:
            out += b"\x02" + expiry.to_bytes(4, "big")
        for ident, name in ((b"\x03", "ContentType"), (b"\x08", "ResponseTopic")):
            text = values.get(name)
            if text is not None:
                raw = text.encode("utf-8")
                out += ident + len(raw).to_bytes(2, "big") + raw
        correlation = values.get("CorrelationData")
        if correlation is not None:
            out += b"\x09" + len(correlation).to_bytes(2, "big") + correlation
        return _varint(len(out)) + bytes(out)


def _varint(n: int) -> bytes:
    """MQTT's variable byte integer."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


_PUBLISH_PROPERTIES = _PublishProperties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]


def properties(
    *,
    content_type: str | None = None,
    response_topic: str | None = None,
    correlation: bytes | None = None,
    expiry: float | None = None,
) -> Properties:
    # paho's Properties builds its lookup tables in __init__ and re-checks
    # every name against lists built on each __setattr__: ~35 us a message,
    # on every request and reply. These four names are valid for PUBLISH and
    # their values typed here, so copy an empty set and fill its __dict__
    # (~2 us); tests/unit/test_transport.py checks the bytes are the same.
    props = copy.copy(_PUBLISH_PROPERTIES)
    values = props.__dict__
    if expiry is not None:
        values["MessageExpiryInterval"] = max(1, math.ceil(expiry))
    if content_type:
        values["ContentType"] = content_type
    if response_topic:
        values["ResponseTopic"] = response_topic
    if correlation is not None:
        values["CorrelationData"] = bytes(correlation)
    return props


@functools.cache
def _named(packet: int, value: int) -> Reason:
    # Cached: paho's ReasonCode copies its name table per instance, and a
    # broker answers with a handful of codes.
    return Reason(value, ReasonCode(packet, identifier=value).getName())


def reason(code: ReasonCode | int) -> Reason:
    """paho's reason code as khod's; a bare int (MQTT 3.1 style) is named "refused"."""
    if isinstance(code, ReasonCode):
        return _named(code.packetType, code.value)
    return Reason(code, "refused")


def _as_bytes(p: object) -> bytes:
    if isinstance(p, bytes | bytearray):
        return bytes(p)
    return b"" if p is None else str(p).encode()


def message_of(m: mqtt.MQTTMessage) -> Message:
    """A received paho message as khod's Message: once per message, no payload copy."""
    payload = m.payload
    if type(payload) is not bytes:  # paho may hand over bytearray, str, numbers or None
        payload = _as_bytes(payload)
    p = getattr(m, "properties", None)
    return Message(
        m.topic,
        payload,
        bool(m.retain),
        getattr(p, "ContentType", None),
        getattr(p, "ResponseTopic", None),
        getattr(p, "CorrelationData", None),
    )


def _skip_idle_inflight_scans(paho: mqtt.Client) -> None:
    """Make paho's search for queued publishes cost nothing when none is queued.

    After every PUBACK paho walks all the publishes still waiting for theirs,
    looking for one it queued behind ``max_inflight_messages``: with a batch
    of N replies and states in flight that is N walks of up to N messages,
    quadratic on the daemon's blackout path. A publish is queued only while
    more messages are kept than are counted in flight (every publish here is
    QoS 1, each counted until its PUBACK), so the walk is needed only then.
    """
    scan = paho._update_inflight

    def update_inflight() -> MQTTErrorCode:
        if len(paho._out_messages) <= paho._inflight_messages:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return scan()

    paho._update_inflight = update_inflight  # type: ignore[method-assign]


class _Unread(ValueError):
    """A PUBLISH the fast reader leaves to paho (paho then accepts or refuses it)."""


def _utf8(packet: bytes | bytearray, at: int) -> tuple[str, int]:
    end = at + 2 + (packet[at] << 8 | packet[at + 1])
    if end > len(packet):
        raise _Unread("string beyond the packet")
    return packet[at + 2 : end].decode("utf-8"), end


def _property_text(packet: bytes | bytearray, at: int) -> tuple[str, int]:
    text, at = _utf8(packet, at)
    if "\x00" in text or "\ufeff" in text:  # paho refuses these (MQTT-1.5.4-2, -3)
        raise _Unread("a character MQTT forbids in a property")
    return text, at


def _read_varint(packet: bytes | bytearray, at: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(4):
        byte = packet[at + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at + i + 1
        shift += 7
    raise _Unread("variable byte integer longer than 4 bytes")


#: PUBLISH properties khod does not read: identifier -> bytes to skip (None: special).
_SKIPPED = {0x01: 1, 0x02: 4, 0x23: 2, 0x0B: None, 0x26: None}


def read_publish(command: int, packet: bytes | bytearray) -> tuple[Message, int, int]:
    """A received MQTT v5 PUBLISH as khod's Message, with its QoS and packet id.

    Reads only what khod reads (topic, payload, retain, Content Type,
    Response Topic, Correlation Data) and skips the other PUBLISH
    properties. paho's reader builds a ``Properties`` object per message
    (~60 us, about a third of a participant's work in the blackout); this
    one does not. Anything it does not expect raises ``_Unread``, and paho
    reads that packet instead.
    """
    qos = (command >> 1) & 0x03
    try:
        topic, at = _utf8(packet, 0)
        mid = 0
        if qos:
            mid = packet[at] << 8 | packet[at + 1]
            at += 2
        size, at = _read_varint(packet, at)
        end = at + size
        if end > len(packet):
            raise _Unread("properties beyond the packet")
        content_type = response_topic = None
        correlation = None
        while at < end:
            ident = packet[at]
            at += 1
            if ident == 0x03:
                content_type, at = _property_text(packet, at)
            elif ident == 0x08:
                response_topic, at = _property_text(packet, at)
            elif ident == 0x09:
                n = packet[at] << 8 | packet[at + 1]
                correlation = bytes(packet[at + 2 : at + 2 + n])
                at += 2 + n
            elif ident == 0x0B:
                _, at = _read_varint(packet, at)
            elif ident == 0x26:
                _, at = _property_text(packet, at)
                _, at = _property_text(packet, at)
            elif ident in _SKIPPED:
                at += cast(int, _SKIPPED[ident])
            else:
                raise _Unread(f"property 0x{ident:02x} in a PUBLISH")
        if at != end:
            raise _Unread("properties overrun their length")
    except (IndexError, UnicodeDecodeError) as exc:
        raise _Unread(str(exc)) from None
    message = Message(
        topic, bytes(packet[end:]), bool(command & 0x01), content_type, response_topic, correlation
    )
    return message, qos, mid


def _read_publishes_directly(paho: mqtt.Client, deliver: Callable[[Message], None]) -> None:
    """Hand received QoS 0/1 PUBLISHes to ``deliver`` without paho's message objects.

    Per instance (khod's clients only); paho still reads anything else, and
    any PUBLISH :func:`read_publish` leaves to it.
    """
    packet = getattr(paho, "_in_packet", None)
    if not (isinstance(packet, dict) and {"command", "packet"} <= packet.keys()):
        return  # a paho this was not written for: it reads everything itself
    original = paho._handle_publish

    def handle_publish() -> MQTTErrorCode:
        command, packet = paho._in_packet["command"], paho._in_packet["packet"]
        if paho._protocol != mqtt.MQTTv5 or paho._manual_ack or (command & 0x06) > 0x02:
            return original()
        try:
            message, qos, mid = read_publish(command, packet)
        except _Unread:
            return original()
        deliver(message)
        if qos == 1:
            return paho._send_puback(mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    paho._handle_publish = handle_publish  # type: ignore[method-assign]


#: What every plain PUBACK says: shared, never changed (paho reads, never writes them).
_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)
_PUBACK_NO_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]


def _read_pubacks_directly(paho: mqtt.Client) -> None:
    """Read a plain PUBACK (packet id only: success) without paho's objects.

    paho builds two reason codes and two property sets for every PUBACK
    (each copies paho's name tables): one PUBACK per reply and per state
    the daemon publishes. A PUBACK with a reason code or properties (a
    refusal, say) is read by paho as before.
    """
    if not isinstance(getattr(paho, "_in_packet", None), dict):
        return  # a paho this was not written for: it reads everything itself
    original = paho._handle_pubackcomp

    def handle_pubackcomp(cmd: Any) -> MQTTErrorCode:
        packet = paho._in_packet["packet"]
        if cmd != "PUBACK" or len(packet) != 2 or paho._protocol != mqtt.MQTTv5:
            return original(cmd)
        mid = packet[0] << 8 | packet[1]
        with paho._out_message_mutex:
            if mid in paho._out_messages:
                return paho._do_on_publish(mid, _PUBACK_SUCCESS, _PUBACK_NO_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    paho._handle_pubackcomp = handle_pubackcomp  # type: ignore[method-assign]


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
        _skip_idle_inflight_scans(self._client)
        _read_publishes_directly(self._client, self._deliver)
        _read_pubacks_directly(self._client)

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
