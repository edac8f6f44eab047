"""What a participant's identity may look like.

A participant's ``name`` is used twice: as one level of an MQTT topic
(``khod/v1/<host>/p/<name>/...``) and as a node name in the payload's root
FDT. It must therefore be safe in both: no ``/``, ``+``, ``#`` (topic
separators and wildcards), and only characters the devicetree spec allows in
node names. Length stays well under the DT limit so a dts stays readable.
"""

from __future__ import annotations

import re
import socket

from khod.errors import RegistrationError
from khod.fdt import KHO_COMPATIBLE_PREFIX, encode_instance

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
COMPATIBLE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9,._+-]{0,127}$")
HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
INSTANCE_STR_RE = re.compile(r"^[\x21-\x7e]{1,64}$")
MAX_INSTANCE_INT = 2**32 - 1

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
