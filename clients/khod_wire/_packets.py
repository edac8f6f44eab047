"""MQTT v5 packets as khod reads and writes them, without paho's objects (stdlib only).

paho builds a ``Properties`` object (and more) for every packet it reads or
writes, each copying paho's name tables: tens of microseconds a message,
paid per participant inside the blackout. Here are the few pieces khod
needs, each tested against paho's own (tests/unit/test_transport.py):
reading a received PUBLISH into a :class:`~khod_wire.message.Message`, and
MQTT's variable byte integer. Whatever they do not expect raises
:class:`Unread`; the client layer then lets paho read the packet.
"""

from __future__ import annotations

from khod_wire.message import Message


def varint(n: int) -> bytes:
    """MQTT's variable byte integer."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


class Unread(ValueError):
    """A PUBLISH the fast reader leaves to paho (paho then accepts or refuses it)."""


def _utf8(packet: bytes | bytearray, at: int) -> tuple[str, int]:
    end = at + 2 + (packet[at] << 8 | packet[at + 1])
    if end > len(packet):
        raise Unread("string beyond the packet")
    return packet[at + 2 : end].decode("utf-8"), end


def _property_text(packet: bytes | bytearray, at: int) -> tuple[str, int]:
    text, at = _utf8(packet, at)
    if "\x00" in text or "\ufeff" in text:  # paho refuses these (MQTT-1.5.4-2, -3)
        raise Unread("a character MQTT forbids in a property")
    return text, at


def _read_varint(packet: bytes | bytearray, at: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(4):
        byte = packet[at + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at + i + 1
        shift += 7
    raise Unread("variable byte integer longer than 4 bytes")


#: PUBLISH properties of a fixed size that khod does not read: identifier -> size.
_SKIPPED = {0x01: 1, 0x02: 4, 0x23: 2}


def read_publish(command: int, packet: bytes | bytearray) -> tuple[Message, int, int]:
    """A received MQTT v5 PUBLISH as khod's Message, with its QoS and packet id.

    Reads only what khod reads (topic, payload, retain, Content Type,
    Response Topic, Correlation Data) and skips the other PUBLISH
    properties. paho's reader builds a ``Properties`` object per message
    (~60 us, about a third of a participant's work in the blackout); this
    one does not. Anything it does not expect raises ``Unread``, and paho
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
            raise Unread("properties beyond the packet")
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
                at += _SKIPPED[ident]
            else:
                raise Unread(f"property 0x{ident:02x} in a PUBLISH")
        if at != end:
            raise Unread("properties overrun their length")
    except (IndexError, UnicodeDecodeError) as exc:
        raise Unread(str(exc)) from None
    message = Message(
        topic, bytes(packet[end:]), bool(command & 0x01), content_type, response_topic, correlation
    )
    return message, qos, mid
