"""paho at the edges of khod: conversions both ways, and the per-message costs cut.

khod's :class:`~khod_wire._mqtt.Client` (aiomqtt's, on paho) hands paho its
publish properties built here, reads paho's reason codes and messages
through here, and installs the hooks below on its own paho client (never on
anyone else's): received PUBLISHes and plain PUBACKs read without paho's
objects (:mod:`khod_wire._packets`), and paho's in-flight walk skipped when
nothing can be queued. Each is what a profile of the blackout showed.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from khod_wire._packets import Unread, read_publish, varint
from khod_wire.message import Message
from khod_wire.reasons import Reason


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
        return varint(len(out)) + bytes(out)


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


def skip_idle_inflight_scans(paho: mqtt.Client) -> None:
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


def _hookable(paho: mqtt.Client) -> bool:
    """Whether paho keeps the packet being read where these hooks look for it."""
    packet = getattr(paho, "_in_packet", None)
    return isinstance(packet, dict) and {"command", "packet"} <= packet.keys()


def read_publishes_directly(paho: mqtt.Client, deliver: Callable[[Message], None]) -> None:
    """Hand received QoS 0/1 PUBLISHes to ``deliver`` without paho's message objects.

    Per instance (khod's clients only); paho still reads anything else, and
    any PUBLISH :func:`read_publish` leaves to it.
    """
    if not _hookable(paho):
        return  # a paho this was not written for: it reads everything itself
    original = paho._handle_publish

    def handle_publish() -> MQTTErrorCode:
        command, packet = paho._in_packet["command"], paho._in_packet["packet"]
        if paho._protocol != mqtt.MQTTv5 or paho._manual_ack or (command & 0x06) > 0x02:
            return original()
        try:
            message, qos, mid = read_publish(command, packet)
        except Unread:
            return original()
        deliver(message)
        if qos == 1:
            return paho._send_puback(mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    paho._handle_publish = handle_publish  # type: ignore[method-assign]


#: What every plain PUBACK says: shared, never changed (paho reads, never writes them).
_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)
_PUBACK_NO_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]


def read_pubacks_directly(paho: mqtt.Client) -> None:
    """Read a plain PUBACK (packet id only: success) without paho's objects.

    paho builds two reason codes and two property sets for every PUBACK
    (each copies paho's name tables): one PUBACK per reply and per state
    the daemon publishes. A PUBACK with a reason code or properties (a
    refusal, say) is read by paho as before.
    """
    if not _hookable(paho):
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
