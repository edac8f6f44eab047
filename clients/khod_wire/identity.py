"""What a participant's identity may look like.

A participant's ``name`` is used twice: as one level of an MQTT topic
(``khod/v1/<host>/p/<name>/...``) and as a node name in the payload's root
FDT. It must therefore be safe in both: no ``/``, ``+``, ``#`` (topic
separators and wildcards), and only characters the devicetree spec allows in
node names. Length stays well under the DT limit so a dts stays readable.

How an instance is written in a fragment (and in the payload's links):

- An integer ``instance`` is one big-endian u32 cell (``instance = <3>``,
  0..2**32-1). A string ``instance`` is a NUL-terminated string of 1 to 64
  printable ASCII characters.
- Decoding an instance: a NUL-terminated run of printable ASCII is a string,
  otherwise exactly 4 bytes are an integer. A 3-character string and an
  integer share the same 4-byte length, so integers whose cell reads as a
  printable 3-character string (e.g. ``0x61626300``, "abc") are refused by
  ``encode_instance``: encoding and decoding stay a bijection. Every integer
  below ``0x20202000`` (538 976 256) is always accepted.
"""

from __future__ import annotations

import re
import socket
import struct

from khod_wire.errors import FragmentError, RegistrationError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
COMPATIBLE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9,._+-]{0,127}$")
HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
INSTANCE_STR_RE = re.compile(r"^[\x21-\x7e]{1,64}$")
MAX_INSTANCE_INT = 2**32 - 1
#: KHO's prefix of every fragment's root ``compatible``; participants give
#: theirs without it.
KHO_COMPATIBLE_PREFIX = "linux-kho,"
INSTANCE_MAX_LEN = 64
_PRINTABLE = frozenset(range(0x20, 0x7F))
_U32 = struct.Struct(">I")

Instance = int | str


def default_host_id() -> str:
    """The short hostname, made topic-safe: the default host id of daemon and SDK."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0])[:63]
    return host.lstrip("._-") or "localhost"


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise RegistrationError(
            f"invalid participant name {name!r}: 1-63 characters of [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return name


def check_compatible(compatible: object) -> str:
    if isinstance(compatible, str) and compatible.startswith(KHO_COMPATIBLE_PREFIX):
        raise RegistrationError(
            f"invalid compatible {compatible!r}: give it without the "
            f"{KHO_COMPATIBLE_PREFIX!r} prefix, which khod adds in the fragment"
        )
    if not isinstance(compatible, str) or not COMPATIBLE_RE.fullmatch(compatible):
        raise RegistrationError(
            f"invalid compatible {compatible!r}: 1-128 characters of [A-Za-z0-9,._+-], "
            "like 'cloud-hypervisor,vm-v1'"
        )
    return compatible


def check_instance(instance: object) -> Instance:
    # bool is an int in Python; True as an instance key is always a mistake.
    if isinstance(instance, int) and not isinstance(instance, bool):
        if not 0 <= instance <= MAX_INSTANCE_INT:
            raise RegistrationError(
                f"invalid instance {instance}: integers are 0..{MAX_INSTANCE_INT}"
            )
        try:
            # The fragment must be able to carry it unambiguously.
            encode_instance(instance)
        except ValueError as exc:
            raise RegistrationError(f"invalid instance: {exc}") from None
        return instance
    if isinstance(instance, str) and INSTANCE_STR_RE.fullmatch(instance):
        return instance
    raise RegistrationError(
        f"invalid instance {instance!r}: an integer 0..{MAX_INSTANCE_INT} "
        "or 1-64 printable ASCII characters without spaces"
    )


def check_host(host: object) -> str:
    if not isinstance(host, str) or not HOST_RE.fullmatch(host):
        raise RegistrationError(
            f"invalid host id {host!r}: 1-63 characters of [A-Za-z0-9._-] (it is a topic level)"
        )
    return host


# -- the instance codec (how an instance is written in a fragment) -----------


def _instance_string(raw: bytes) -> str | None:
    body = raw[:-1]
    if (
        raw.endswith(b"\0")
        and 0 < len(body) <= INSTANCE_MAX_LEN
        and all(b in _PRINTABLE for b in body)
    ):
        return body.decode("ascii")
    return None


def encode_instance(instance: int | str) -> bytes:
    """The ``instance`` property value; ValueError if the instance is not encodable."""
    if isinstance(instance, bool) or not isinstance(instance, int | str):
        raise ValueError(f"instance must be an int or a str, got {type(instance).__name__}")
    if isinstance(instance, str):
        raw = instance.encode("ascii", "replace") + b"\0"
        if _instance_string(raw) != instance:
            raise ValueError(
                f"instance string {instance!r} must be 1 to {INSTANCE_MAX_LEN} "
                "printable ASCII characters"
            )
        return raw
    if not 0 <= instance <= 0xFFFFFFFF:
        raise ValueError(f"instance {instance} is out of the u32 range 0..{0xFFFFFFFF}")
    raw = _U32.pack(instance)
    if _instance_string(raw) is not None:
        raise ValueError(
            f"instance {instance} (0x{instance:08x}) reads back as the string "
            f"{_instance_string(raw)!r}; use that string or another integer"
        )
    return raw


def decode_instance(raw: bytes) -> int | str:
    """The instance an ``instance`` property holds; FragmentError if it holds neither kind."""
    text = _instance_string(bytes(raw))
    if text is not None:
        return text
    if len(raw) == 4:
        return int(_U32.unpack(raw)[0])
    raise FragmentError(
        f"instance {bytes(raw)[:16].hex()} is neither a u32 cell nor a printable string"
    )
