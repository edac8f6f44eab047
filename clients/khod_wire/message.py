"""What crosses the MQTT boundary, as khod's own types: Message, Will, Publication.

The client layer (:mod:`khod_wire._mqtt`) turns every received paho message
into a :class:`Message` once, and takes a :class:`Will` and
:class:`Publication` s to send. Nothing above it sees aiomqtt or paho
objects. Stdlib only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, eq=False)
class Message:
    """One received message with the MQTT v5 properties khod reads.

    Built once per message on the hot path: slots, no copy of the payload,
    and no equality (nothing compares messages; identity is enough).
    """

    topic: str
    payload: bytes
    retain: bool = False
    content_type: str | None = None
    response_topic: str | None = None
    correlation: bytes | None = None


@dataclass(frozen=True, slots=True)
class Will:
    """The last will, published by the broker (QoS 1) if the client vanishes."""

    topic: str
    payload: bytes
    retain: bool = False
    content_type: str | None = None


@dataclass(frozen=True)
class Publication:
    """One QoS 1 message to send (``Connection.publish_many``, ``publish``)."""

    topic: str
    payload: bytes
    retain: bool = False
    content_type: str | None = None
    correlation: bytes | None = None
    response_topic: str | None = None
    #: Seconds the broker keeps it for a subscriber that is away (None: forever).
    expiry: float | None = None
