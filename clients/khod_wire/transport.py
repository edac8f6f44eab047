"""One MQTT v5 connection that stays up: broker URLs, reconnects, requests.

aiomqtt does not reconnect by itself, so every long-lived khod process (the
daemon, each SDK participant, ``khod monitor``) runs ``Connection.run()``:
connect, subscribe, hand every message to a callback, and on any broker
failure wait a little (exponential backoff, capped) and start again.
``Connection.request()`` implements MQTT v5 request/response and retries a
request with the *same* correlation data until a reply arrives, so a broker
restart in the middle of a request costs a duplicate at most, which the
daemon answers from its reply cache.

This is the only module besides the daemon's bus that imports aiomqtt, and
it is shared by the daemon, the SDK and the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aiomqtt
import paho.mqtt.client as mqtt
from aiomqtt.exceptions import MqttConnectError
from aiomqtt.types import PahoSocket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from khod_wire.errors import BrokerRefused, ConfigError, NotAuthorized, RequestTimeout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Publication:
    """One message of ``Connection.publish_many``."""

    topic: str
    payload: bytes
    retain: bool = False
    content_type: str | None = None
    correlation: bytes | None = None


#: QoS 1 publishes of one connection that may wait for their PUBACK at once.
MAX_INFLIGHT = 4096

MessageHandler = Callable[[aiomqtt.Message], Awaitable[None]]
ConnectHandler = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class BrokerURL:
    """``mqtt://[user[:password]@]host[:port]`` or ``unix://[user[:password]@]/path``.

    A password in a URL shows in ``ps`` and in shell history: prefer
    :meth:`with_credentials` from a password file or the environment. Neither
    ``str()`` nor ``repr()`` ever shows the password.
    """

    transport: Literal["tcp", "unix"]
    host: str
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        parts = urlsplit(url)
        try:
            username = unquote(parts.username) if parts.username else None
            password = unquote(parts.password) if parts.password is not None else None
        except ValueError:
            raise ConfigError("broker URL: invalid credentials") from None
        if parts.scheme == "unix":
            # unix://user:password@/path: the "host" part holds only the credentials.
            if parts.hostname or (parts.netloc and "@" not in parts.netloc):
                raise ConfigError(
                    f"broker URL {_redact(url)!r}: a unix socket URL has no host: "
                    "unix:///path or unix://user@/path"
                )
            path = unquote(parts.path)
            if not path.startswith("/"):
                raise ConfigError(
                    f"broker URL {_redact(url)!r}: a unix socket needs an absolute path"
                )
            # paho insists on a valid port even for a socket.
            return cls("unix", path, username=username, password=password)
        if parts.scheme not in ("mqtt", "tcp"):
            raise ConfigError(
                f"broker URL {_redact(url)!r}: use mqtt://host:port or unix:///path/to/socket"
            )
        try:
            port = parts.port or 1883
        except ValueError:
            raise ConfigError(f"broker URL {_redact(url)!r}: invalid port") from None
        if not parts.hostname:
            raise ConfigError(f"broker URL {_redact(url)!r}: no host")
        return cls("tcp", parts.hostname, port, username, password)

    def with_credentials(self, username: str | None, password: str | None) -> BrokerURL:
        """This URL with the given username and/or password (None keeps the URL's)."""
        return replace(
            self,
            username=self.username if username is None else username,
            password=self.password if password is None else password,
        )

    def __str__(self) -> str:
        user = f"{quote(self.username, safe='')}@" if self.username else ""
        if self.transport == "unix":
            return f"unix://{user}{self.host}"
        return f"mqtt://{user}{self.host}:{self.port}"


def _redact(url: str) -> str:
    """``url`` without its password, for error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def read_password_file(path: Path) -> str:
    """A password file's content without its final newline; ConfigError if unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ConfigError(f"cannot read the broker password file {path}: {reason}") from None
    password = text.rstrip("\r\n")
    if not password or "\n" in password:
        raise ConfigError(f"broker password file {path}: expected one non-empty line")
    return password


#: An empty PUBLISH property set, copied for each message (see properties()).
_PUBLISH_PROPERTIES = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]


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


def message_props(message: aiomqtt.Message) -> tuple[str | None, str | None, bytes | None]:
    """(content type, response topic, correlation data) of a received message."""
    p = message.properties
    if p is None:
        return None, None, None
    return (
        getattr(p, "ContentType", None),
        getattr(p, "ResponseTopic", None),
        getattr(p, "CorrelationData", None),
    )


def payload_bytes(message: aiomqtt.Message) -> bytes:
    """The payload as bytes (paho may hand over bytearray, str, numbers or None)."""
    p = message.payload
    if isinstance(p, bytes | bytearray):
        return bytes(p)
    return b"" if p is None else str(p).encode()


#: What one queued message costs beyond its payload, topics and correlation
#: data: the Message and paho objects around them. Mostly paho's Properties,
#: which carries its own tables per instance: ~6.1 KiB measured with
#: tracemalloc (paho-mqtt 2.2), rounded up.
MESSAGE_OVERHEAD = 8 * 1024


def message_size(message: aiomqtt.Message) -> int:
    """The bytes a received message holds on to, as accounted by InboundQueue."""
    p = message.payload
    body = len(p) if isinstance(p, bytes | bytearray | str) else 0
    correlation = getattr(message.properties, "CorrelationData", None) or b""
    response_topic = getattr(message.properties, "ResponseTopic", None) or ""
    return (
        MESSAGE_OVERHEAD + body + len(correlation) + len(response_topic) + len(message.topic.value)
    )


class InboundQueue(asyncio.Queue[aiomqtt.Message]):
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

    def put_nowait(self, item: aiomqtt.Message) -> None:
        size = message_size(item)
        limit = self.max_bytes
        if getattr(item.properties, "ResponseTopic", None) is None:
            limit += self.max_bytes // 4
        if self.bytes and self.bytes + size > limit:
            self.dropped += 1
            self._report()
            return  # not QueueFull: aiomqtt would log every single one
        super().put_nowait(item)
        self.bytes += size

    def _get(self) -> aiomqtt.Message:
        item: aiomqtt.Message = super()._get()
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

#: CONNACK reason codes that retrying with the same settings cannot cure.
PERMANENT_CONNACK = frozenset({0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C})
#: 0x86 bad user name or password, 0x87 not authorized.
AUTH_CODES = frozenset({0x86, 0x87})


def refusal(what: str, url: BrokerURL, code: int | ReasonCode) -> BrokerRefused:
    """The error for a reason code >= 0x80 from the broker at ``url``."""
    value = code.value if isinstance(code, ReasonCode) else code
    name = code.getName() if isinstance(code, ReasonCode) else "refused"
    kind = NotAuthorized if value in AUTH_CODES else BrokerRefused
    prefix = "not authorized: " if kind is NotAuthorized else ""
    return kind(f"{prefix}the broker at {url} refused {what}: {name} (0x{value:02X})", value)


class _Client(aiomqtt.Client):
    """aiomqtt's client, plus a publish that returns the PUBACK's reason code.

    aiomqtt awaits the PUBACK but drops its reason code, so a publish the
    broker refused (0x87 when the ACL says no) would look like a success.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, logger=PAHO_LOG, **kwargs)
        self._acks: dict[int, asyncio.Future[ReasonCode]] = {}

    # aiomqtt registers the socket's reader and writer with
    # call_soon_threadsafe, that is later: when the broker has dropped the
    # connection meanwhile, paho has closed the socket by then and asyncio
    # logs "Exception in callback ... KeyError: '10 is not registered'" for an
    # expected disconnect (or, if the number was reused, watches another
    # socket). Register only a socket that is still this client's.
    def _still_ours(self, client: mqtt.Client, sock: PahoSocket, fd: int) -> bool:
        return fd >= 0 and sock.fileno() == fd and client.socket() is sock

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: PahoSocket) -> None:
        def read() -> None:
            try:
                while True:
                    client.loop_read()
                    # An SSL socket may hold decoded bytes that select() does not see.
                    pending = getattr(client.socket(), "pending", None)
                    if pending is None or pending() <= 0:
                        break
            except Exception as exc:  # as aiomqtt: a broken connection
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        fd = sock.fileno()

        def register() -> None:
            if self._still_ours(client, sock, fd):
                self._loop.add_reader(fd, read)
            self._misc_task = self._loop.create_task(self._misc_loop())

        self._loop.call_soon_threadsafe(register)

    def _on_socket_register_write(
        self, client: mqtt.Client, userdata: Any, sock: PahoSocket
    ) -> None:
        def write() -> None:
            try:
                client.loop_write()
            except Exception as exc:  # as aiomqtt: a broken connection
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        fd = sock.fileno()

        def register() -> None:
            if self._still_ours(client, sock, fd):
                self._loop.add_writer(fd, write)

        self._loop.call_soon_threadsafe(register)

    def _on_socket_unregister_write(
        self, client: mqtt.Client, userdata: Any, sock: PahoSocket
    ) -> None:
        fd = sock.fileno()
        if fd >= 0:
            self._loop.remove_writer(fd)

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
            fut.set_result(reason_code)
        super()._on_publish(client, userdata, mid, reason_code, properties)

    def publish_nowait(
        self, topic: str, payload: bytes, *, retain: bool, properties: Properties
    ) -> asyncio.Future[ReasonCode]:
        """Queue a QoS 1 publish now; the future is its PUBACK's reason code.

        The caller must pop ``_acks`` of futures it stops waiting for.
        """
        info = self._client.publish(topic, payload, 1, retain, properties)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        fut: asyncio.Future[ReasonCode] = asyncio.get_running_loop().create_future()
        self._acks[info.mid] = fut
        return fut

    async def publish_acked(
        self, topic: str, payload: bytes, *, retain: bool, properties: Properties
    ) -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK reason code."""
        info = self._client.publish(topic, payload, 1, retain, properties)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        fut: asyncio.Future[ReasonCode] = asyncio.get_running_loop().create_future()
        # The PUBACK is read by a callback of this same event loop, so it
        # cannot have arrived before this line.
        self._acks[info.mid] = fut
        try:
            return await self._wait_for(fut, timeout=None)
        finally:
            self._acks.pop(info.mid, None)


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
        Needs a stable ``identifier``.

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
        will: aiomqtt.Will | None = None,
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
        self.connects = 0
        self.refusal: BrokerRefused | None = None
        self._client: _Client | None = None
        self._connected = asyncio.Event()
        self._wake = asyncio.Event()
        self._pending: dict[bytes, asyncio.Future[aiomqtt.Message]] = {}
        self.reply_topic: str | None = None
        self._background: set[asyncio.Task[int]] = set()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def backlog(self) -> int:
        """Messages received and not yet handed to on_message."""
        client = self._client
        return len(client.messages) if client is not None else 0

    def _make_client(self) -> _Client:
        connect_props = None
        if self.session_expiry:
            connect_props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            connect_props.SessionExpiryInterval = self.session_expiry
        queue_type = None
        if self.max_inbound_bytes is not None:
            queue_type = cast(
                "type[asyncio.Queue[aiomqtt.Message]]",
                functools.partial(InboundQueue, max_bytes=self.max_inbound_bytes),
            )
        return _Client(
            self.url.host,
            self.url.port,
            transport=self.url.transport,
            username=self.url.username,
            password=self.url.password,
            identifier=self.identifier,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=self.will,
            keepalive=self.keepalive,
            timeout=10,
            clean_start=not self.session_expiry,
            properties=connect_props,
            queue_type=queue_type,
            # paho's default lets 20 QoS 1 publishes wait for their PUBACK and
            # queues the rest: the daemon answering a burst of 1,000 requests
            # would pay 50 round trips. The broker sets no limit of its own
            # (max_inflight_messages 0 in its config).
            max_inflight_messages=MAX_INFLIGHT,
        )

    async def run(self) -> None:
        """Stay connected until cancelled."""
        backoff = Backoff()
        while True:
            try:
                async with self._make_client() as client:
                    self._client = client
                    no_delay(client)
                    backoff.reset()
                    self._refused(None)
                    topics = [*self.subscriptions]
                    if self.reply_topic:
                        topics.append(self.reply_topic)
                    options = SubscribeOptions(
                        qos=1, noLocal=self.no_local, retainAsPublished=self.retain_as_published
                    )
                    for topic in topics:
                        granted = await client.subscribe(topic, options=options)
                        self._check_suback(topic, granted)
                    self.connects += 1
                    if self.on_connect is not None:
                        await self.on_connect()
                    self._connected.set()
                    self._wake.set()
                    async for message in client.messages:
                        await self._dispatch(message)
            except MqttConnectError as exc:
                rc = exc.rc
                code = rc.value if isinstance(rc, ReasonCode) else rc
                if isinstance(code, int) and code in PERMANENT_CONNACK:
                    err = refusal("the connection", self.url, rc if rc is not None else code)
                    if self.refusal is None or str(self.refusal) != str(err):
                        log.error("%s: %s", self.identifier, err)
                    self._refused(err)
                else:
                    log.info("%s: broker %s: %s; reconnecting", self.identifier, self.url, exc)
            except aiomqtt.MqttError as exc:
                log.info("%s: broker %s: %s; reconnecting", self.identifier, self.url, exc)
            finally:
                self._connected.clear()
                if self._client is not None:
                    _consume_disconnect(self._client)
                self._client = None
            await asyncio.sleep(backoff.next())

    def _refused(self, err: BrokerRefused | None) -> None:
        self.refusal = err
        if err is not None:
            self._wake.set()

    def _check_suback(self, topic: str, granted: Sequence[ReasonCode] | tuple[int, ...]) -> None:
        for code in granted:
            if isinstance(code, ReasonCode) and code.is_failure:
                err = refusal(f"a subscription to {topic}", self.url, code)
                log.error("%s: %s", self.identifier, err)
                self._refused(err)

    async def _dispatch(self, message: aiomqtt.Message) -> None:
        if self.reply_topic is not None and message.topic.matches(self.reply_topic):
            _, _, correlation = message_props(message)
            fut = self._pending.get(correlation or b"")
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
        code = await self._send(
            topic,
            payload,
            retain=retain,
            content_type=content_type,
            response_topic=response_topic,
            correlation=correlation,
            expiry=expiry,
        )
        if code is not None and code.is_failure:
            log.warning("%s: %s", self.identifier, refusal(f"a publish to {topic}", self.url, code))
            return False
        return code is not None

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
        client = self._client
        if client is None or not messages:
            return 0
        futs = self._queue_all(client, messages)
        if not wait:
            task = asyncio.create_task(self._acknowledged(client, futs), name="acks")
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return len(futs)
        return await self._acknowledged(client, futs)

    def _queue_all(
        self, client: _Client, messages: Sequence[Publication]
    ) -> list[tuple[str, asyncio.Future[ReasonCode]]]:
        futs = []
        for m in messages:
            props = properties(content_type=m.content_type, correlation=m.correlation)
            try:
                fut = client.publish_nowait(m.topic, m.payload, retain=m.retain, properties=props)
            except (aiomqtt.MqttError, ValueError) as exc:
                log.info("%s: publish to %s failed: %s", self.identifier, m.topic, exc)
                continue
            futs.append((m.topic, fut))
        return futs

    async def _acknowledged(
        self, client: _Client, futs: list[tuple[str, asyncio.Future[ReasonCode]]]
    ) -> int:
        if not futs:
            return 0
        acked = asyncio.gather(*(f for _, f in futs))
        lost = getattr(client, "_disconnected", None)
        if not isinstance(lost, asyncio.Future):
            lost = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait({acked, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not acked.done():
                acked.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await acked
            for mid, fut in list(client._acks.items()):
                if fut.done():
                    client._acks.pop(mid, None)
        if acked.cancelled():
            log.info("%s: %d publishes lost with the connection", self.identifier, len(futs))
            return 0
        ok = 0
        for topic, fut in futs:
            code = fut.result()
            if code.is_failure:
                log.warning(
                    "%s: %s", self.identifier, refusal(f"a publish to {topic}", self.url, code)
                )
            else:
                ok += 1
        return ok

    async def _send(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool,
        content_type: str | None,
        response_topic: str | None,
        correlation: bytes | None,
        expiry: float | None,
    ) -> ReasonCode | None:
        """The PUBACK's reason code; None when not connected or the connection dropped."""
        # Usable as soon as the session is up, so that on_connect can publish.
        client = self._client
        if client is None:
            return None
        props = properties(
            content_type=content_type,
            response_topic=response_topic,
            correlation=correlation,
            expiry=expiry,
        )
        pub = asyncio.ensure_future(
            client.publish_acked(topic, payload, retain=retain, properties=props)
        )
        # aiomqtt keeps waiting for the PUBACK of a connection that is already
        # gone, until its timeout; give up as soon as the connection drops.
        lost = getattr(client, "_disconnected", None)
        if not isinstance(lost, asyncio.Future):
            lost = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait({pub, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not pub.done():
                pub.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await pub
        exc = None if pub.cancelled() else pub.exception()
        # ValueError: paho refuses the topic (e.g. a wildcard); never fatal here.
        if pub.cancelled() or isinstance(exc, aiomqtt.MqttError | ValueError):
            log.info("%s: publish to %s failed: %s", self.identifier, topic, exc or "disconnected")
            return None
        if exc is not None:
            raise exc
        return pub.result()

    async def request(
        self,
        topic: str,
        payload: bytes,
        *,
        content_type: str,
        timeout: float,
        retry_every: float = 2.0,
        correlation: bytes | None = None,
    ) -> aiomqtt.Message:
        """Send a request and await its one reply, re-sending across reconnects.

        The correlation data stays the same for every re-send, so the daemon
        recognises a duplicate and answers it from its reply cache. A caller
        that must retry across its own restart passes the ``correlation`` it
        used before, and gets the same answer.
        """
        if self.reply_topic is None:
            raise RuntimeError("Connection.request() needs reply_topic set before run()")
        correlation = correlation or uuid.uuid4().bytes
        fut: asyncio.Future[aiomqtt.Message] = asyncio.get_running_loop().create_future()
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
                props = properties(
                    content_type=content_type,
                    response_topic=self.reply_topic,
                    correlation=correlation,
                    expiry=left,
                )
                try:
                    ack = client.publish_nowait(topic, payload, retain=False, properties=props)
                except (aiomqtt.MqttError, ValueError) as exc:
                    log.info("%s: publish to %s failed: %s", self.identifier, topic, exc)
                    await asyncio.sleep(min(retry_every, left))  # then again, or time out
                    continue
                # No task per request: wait on the futures themselves, for the
                # reply, a refusing PUBACK, or the connection's end, until the
                # next re-send is due.
                lost = getattr(client, "_disconnected", None)
                waiting: set[asyncio.Future[Any]] = {fut, ack}
                if isinstance(lost, asyncio.Future):
                    waiting.add(lost)
                due = loop.time() + min(retry_every, max(end - loop.time(), 0.001))
                while not fut.done() and loop.time() < due:
                    await asyncio.wait(
                        waiting, timeout=due - loop.time(), return_when=asyncio.FIRST_COMPLETED
                    )
                    if ack in waiting and ack.done():
                        waiting.discard(ack)
                        code = None if ack.cancelled() else ack.result()
                        if code is not None and code.is_failure:
                            raise refusal(f"a publish to {topic}", self.url, code)
                    if lost is not None and lost in waiting and lost.done():
                        break  # re-sent once the connection is back
                if fut.done():
                    return fut.result()
        finally:
            self._pending.pop(correlation, None)


def no_delay(client: _Client) -> None:
    """Send every packet at once (TCP_NODELAY).

    Without it a reply that follows a PUBACK waits for the peer's delayed
    ACK: ~40 ms per request over TCP. A Unix socket has no such option.
    """
    sock = client._client.socket()
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _consume_disconnect(client: _Client) -> None:
    # aiomqtt stores a lost connection as an exception on a private future that
    # nobody awaits once we have left the client; retrieve it so asyncio does
    # not report "Future exception was never retrieved" on every broker restart.
    fut = getattr(client, "_disconnected", None)
    if isinstance(fut, asyncio.Future) and fut.done() and not fut.cancelled():
        fut.exception()


def client_id(prefix: str) -> str:
    """A client id unique to this process and call."""
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
