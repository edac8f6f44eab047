"""Reason codes from the broker (CONNACK, PUBACK, SUBACK) and the errors they become.

The client layer hands out a :class:`Reason` instead of paho's ReasonCode;
:func:`refusal` turns one the broker failed with into BrokerRefused (or
NotAuthorized) for the connection to keep, raise or log.
"""

from __future__ import annotations

from typing import NamedTuple

from khod_wire.errors import BrokerRefused, NotAuthorized
from khod_wire.urls import BrokerURL


class Reason(NamedTuple):
    """A reason code and its MQTT v5 name, e.g. ``Reason(0x87, "Not authorized")``."""

    value: int
    name: str

    @property
    def failed(self) -> bool:
        return self.value >= 0x80


#: CONNACK reason codes that retrying with the same settings cannot cure.
PERMANENT_CONNACK = frozenset({0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C})
#: 0x86 bad user name or password, 0x87 not authorized.
AUTH_CODES = frozenset({0x86, 0x87})


def refusal(what: str, url: BrokerURL, code: int | Reason) -> BrokerRefused:
    """The error for a reason code >= 0x80 from the broker at ``url``."""
    value, name = code if isinstance(code, Reason) else (code, "refused")
    kind = NotAuthorized if value in AUTH_CODES else BrokerRefused
    prefix = "not authorized: " if kind is NotAuthorized else ""
    return kind(f"{prefix}the broker at {url} refused {what}: {name} (0x{value:02X})", value)
