"""The broker client's edges (issue 8): refusals are reported as such (item 3),
expected disconnects make no noise (item 13)."""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from khod_wire._mqtt import PAHO_LOG, Client
from khod_wire._paho import reason
from khod_wire.errors import BrokerRefused, NotAuthorized
from khod_wire.reasons import refusal
from khod_wire.transport import Connection
from khod_wire.urls import BrokerURL


@pytest.mark.parametrize("callback", ["open", "register_write"])
async def test_a_socket_closed_before_it_is_watched_logs_nothing(callback: str) -> None:
    """The broker drops the connection between paho's request and asyncio's registration.

    aiomqtt registers the reader and writer later, through
    call_soon_threadsafe; paho has closed the socket by then, and asyncio
    used to log "Exception in callback ... KeyError: '10 is not registered'"
    with a traceback.
    """
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    client = Client("127.0.0.1", 1)  # never connected: only its socket callbacks run
    paho = client._client
    ours, theirs = socket.socketpair()
    try:
        paho._sock = ours
        if callback == "open":
            client._on_socket_open(paho, None, ours)
        else:
            client._on_socket_register_write(paho, None, ours)
        # What paho's _sock_close() does when it reads the broker's reset,
        # before the loop runs the registration.
        paho._sock = None
        client._on_socket_unregister_write(paho, None, ours)
        ours.close()
        for _ in range(3):
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
        theirs.close()
        if client._misc_task is not None:
            await client._misc_task  # ends by itself: no connection
    assert errors == []


@pytest.mark.parametrize(
    ("level", "shown"), [(logging.INFO, False), (logging.DEBUG, True)], ids=["info", "debug"]
)
def test_paho_reporting_a_dropped_connection_is_not_an_error(
    caplog: pytest.LogCaptureFixture, level: int, shown: bool
) -> None:
    caplog.set_level(level, logger=PAHO_LOG.name)
    PAHO_LOG.error("failed to receive on socket: %s", "[Errno 104] Connection reset by peer")
    PAHO_LOG.error("Caught exception in on_message: boom")  # a real error stays one
    records = [(r.levelname, r.getMessage()) for r in caplog.records]
    expected = [("ERROR", "Caught exception in on_message: boom")]
    if shown:
        expected.insert(
            0, ("DEBUG", "failed to receive on socket: [Errno 104] Connection reset by peer")
        )
    assert records == expected


def test_refusal_codes_map_to_not_authorized_or_broker_refused() -> None:
    url = BrokerURL.parse("mqtt://operator:secret@127.0.0.1:1883")
    cases = [
        (PacketTypes.CONNACK, 0x86, NotAuthorized),
        (PacketTypes.PUBACK, 0x87, NotAuthorized),
        (PacketTypes.PUBACK, 0x97, BrokerRefused),
    ]
    for packet, code, kind in cases:
        err = refusal("it", url, reason(ReasonCode(packet, identifier=code)))
        assert type(err) is kind and err.reason_code == code
        assert f"(0x{code:02X})" in str(err) and "secret" not in str(err)
    assert str(refusal("x", url, 0x87)).startswith("not authorized: ")


async def test_a_refused_subscription_is_raised_at_once_not_waited_out() -> None:
    """mosquitto's file ACL grants subscriptions and filters delivery; other brokers refuse."""
    conn = Connection(BrokerURL.parse("unix:///nonexistent"), identifier="khod-test")
    ok = reason(ReasonCode(PacketTypes.SUBACK, identifier=0x00))
    conn._check_suback("khod/v1/h/handover", [ok])
    assert conn.refusal is None
    refused = reason(ReasonCode(PacketTypes.SUBACK, identifier=0x87))
    conn._check_suback("khod/v1/h/handover", [refused])
    with pytest.raises(NotAuthorized, match="subscription to khod/v1/h/handover"):
        await conn.wait_connected(timeout=30)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"content_type": "application/json"},
        {
            "content_type": "application/x-dtb",
            "response_topic": "khod/v1/h/p/a/reply",
            "correlation": b"\x00\x01",
            "expiry": 29.2,
        },
        {"correlation": b"", "expiry": 0.1},
        # a property block over 127 bytes (two-byte length) and UTF-8 text
        {
            "response_topic": "khod/v1/h\u00e9/p/" + "n" * 150 + "/reply",
            "correlation": b"\xff" * 128,
        },
        {"content_type": "application/json", "expiry": 2**32 - 1},
    ],
)
def test_fast_publish_properties_pack_as_pahos_own(kw: dict[str, Any]) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from khod_wire._paho import properties

    slow = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if "expiry" in kw:
        slow.MessageExpiryInterval = max(1, math.ceil(kw["expiry"]))
    if kw.get("content_type"):
        slow.ContentType = kw["content_type"]
    if kw.get("response_topic"):
        slow.ResponseTopic = kw["response_topic"]
    if "correlation" in kw:
        slow.CorrelationData = kw["correlation"]
    fast = properties(**kw)
    assert fast.pack() == slow.pack()
    assert properties().pack() == b"\x00"  # the template stays empty


def test_paho_searches_for_queued_publishes_only_when_one_may_be_queued() -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

    from khod_wire._paho import skip_idle_inflight_scans

    paho = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    scans: list[int] = []

    def scan() -> MQTTErrorCode:
        scans.append(len(paho._out_messages))
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    paho._update_inflight = scan  # type: ignore[method-assign]
    skip_idle_inflight_scans(paho)
    paho._out_messages = {1: mqtt.MQTTMessage(1), 2: mqtt.MQTTMessage(2)}
    paho._inflight_messages = 2  # both sent, waiting for their PUBACK: nothing queued
    assert paho._update_inflight() is MQTTErrorCode.MQTT_ERR_SUCCESS
    assert scans == []
    paho._inflight_messages = 1  # one of them is queued behind the window
    paho._update_inflight()
    assert scans == [2]


# -- the PUBLISH reader: what paho reads, without paho's objects ----------------------


def _publish_packet(
    topic: str, payload: bytes, qos: int, mid: int, props: Any, retain: bool
) -> tuple[int, bytes]:
    """A PUBLISH as the broker sends it: the fixed header's first byte, and the rest."""
    t = topic.encode()
    body = len(t).to_bytes(2, "big") + t
    if qos:
        body += mid.to_bytes(2, "big")
    return 0x30 | qos << 1 | int(retain), body + props.pack() + payload


_texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    topic=_texts.filter(bool),
    payload=st.binary(max_size=300),
    qos=st.sampled_from([0, 1]),
    mid=st.integers(1, 65535),
    retain=st.booleans(),
    content_type=st.none() | _texts,
    response_topic=st.none() | _texts,
    correlation=st.none() | st.binary(max_size=200),
    expiry=st.none() | st.integers(0, 2**32 - 1),
    fmt=st.none() | st.integers(0, 1),
    user=st.lists(st.tuples(_texts, _texts), max_size=3),
    sub_ids=st.lists(st.integers(1, 2**28 - 1), max_size=2),
)
def test_the_publish_reader_reads_what_paho_reads(
    topic: str,
    payload: bytes,
    qos: int,
    mid: int,
    retain: bool,
    content_type: str | None,
    response_topic: str | None,
    correlation: bytes | None,
    expiry: int | None,
    fmt: int | None,
    user: list[tuple[str, str]],
    sub_ids: list[int],
) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt import _packet
    from paho.mqtt.properties import Properties

    from khod_wire._packets import Unread, read_publish
    from khod_wire._paho import message_of

    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for name, value in [
        ("ContentType", content_type),
        ("ResponseTopic", response_topic),
        ("CorrelationData", correlation),
        ("MessageExpiryInterval", expiry),
        ("PayloadFormatIndicator", fmt),
    ]:
        if value is not None:
            setattr(props, name, value)
    if user:
        props.UserProperty = user
    if sub_ids:
        props.SubscriptionIdentifier = sub_ids
    command, packet = _publish_packet(topic, payload, qos, mid, props, retain)
    try:
        slow = _packet.decode_publish(command, bytearray(packet), mqtt.MQTTv5)
    except _packet.MalformedPacket:
        with pytest.raises(Unread):  # paho refuses it: so be it, paho reads it
            read_publish(command, bytearray(packet))
        return
    m = mqtt.MQTTMessage(slow.mid, slow.topic)
    m.retain, m.properties, m.payload = slow.retain, slow.properties, slow.payload
    fast, fast_qos, fast_mid = read_publish(command, bytearray(packet))
    assert (fast_qos, fast_mid) == (slow.qos, slow.mid)
    want = message_of(m)
    assert [getattr(fast, f) for f in want.__slots__] == [getattr(want, f) for f in want.__slots__]
    assert type(fast.payload) is bytes


@pytest.mark.parametrize(
    "packet",
    [
        b"",  # nothing at all
        b"\x00\x05ab",  # a topic longer than the packet
        b"\x00\x01a\x05\x03\x00",  # properties longer than the packet
        b"\x00\x01a\x02\x2a\x00",  # a property a PUBLISH cannot carry (0x2a)
        b"\x00\x01a\x03\x03\x00\x09",  # a string that runs past its property block
        b"\x00\x01\xff\x00",  # a topic that is not UTF-8
        b"\x00\x01a\x05\x0b\xff\xff\xff\xff",  # a varint of 5 bytes
    ],
)
def test_what_the_publish_reader_does_not_expect_is_left_to_paho(packet: bytes) -> None:
    from khod_wire._packets import Unread, read_publish

    with pytest.raises(Unread):
        read_publish(0x30, packet)


async def test_khod_clients_read_publishes_directly() -> None:
    import paho.mqtt.client as mqtt

    c = Client("127.0.0.1", 1, protocol=mqtt.MQTTv5)
    assert c._client._handle_publish.__name__ == "handle_publish"  # not paho's method
    assert c._client._handle_pubackcomp.__name__ == "handle_pubackcomp"


@pytest.mark.parametrize(
    "packet", [b"\x00\x07", b"\x00\x07\x87", b"\x00\x07\x87\x00", b"\x00\x07\x10"]
)
def test_a_puback_is_read_as_paho_reads_it(packet: bytes) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from khod_wire._paho import read_pubacks_directly, reason

    def read(fast: bool) -> tuple[list[tuple[int, Any]], int]:
        paho = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        if fast:
            read_pubacks_directly(paho)
        seen: list[tuple[int, Any]] = []
        paho.on_publish = lambda c, u, mid, rc, props: seen.append((mid, reason(rc)))
        msg = mqtt.MQTTMessage(7)
        msg.qos = 1
        paho._out_messages = {7: msg}
        paho._inflight_messages = 1
        paho._in_packet["packet"] = bytearray(packet)
        paho._handle_pubackcomp("PUBACK")
        assert paho._out_messages == {} and msg.info.is_published()
        return seen, paho._inflight_messages

    assert read(fast=True) == read(fast=False)
    [(mid, code)], _ = read(fast=True)
    assert mid == 7 and code.failed == (len(packet) > 2 and packet[2] >= 0x80)
