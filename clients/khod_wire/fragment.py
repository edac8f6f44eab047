"""The daemon's check of every fragment that arrives, before it is acknowledged.

A fragment comes off the bus from a participant that may be buggy or hostile,
so every byte string gets the same treatment and every refusal is a
:class:`~khod_wire.errors.FragmentError` subclass naming what was expected and
what arrived. The checks, in order:

1. it is bytes, at most ``max_size`` long (checked before parsing anything);
2. it is one FDT v17 that passes libfdt's full check (``fdt.check_blob``);
3. the root ``compatible`` and ``instance`` are the participant's own;
4. names follow dtc's rules, no two siblings share a name, no property is
   repeated in a node and properties precede subnodes. libfdt's full check
   catches none of these, yet dtc refuses such trees and libfdt's own
   lookups see only the first duplicate.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from khod_wire import fdt
from khod_wire.errors import FragmentError, FragmentMismatch, FragmentTooLarge
from khod_wire.identity import (
    KHO_COMPATIBLE_PREFIX,
    check_compatible,
    decode_instance,
    encode_instance,
)

DEFAULT_MAX_FRAGMENT_SIZE = 4096


@dataclass(frozen=True)
class FragmentInfo:
    """What the daemon records about an accepted fragment."""

    size: int
    sha256: bytes

    @property
    def sha256_hex(self) -> str:
        return self.sha256.hex()


def _describe(raw: bytes | None) -> str:
    if raw is None:
        return "missing"
    try:
        value = decode_instance(raw)
    except FragmentError:
        return f"[{raw[:32].hex(' ')}{' ...' if len(raw) > 32 else ''}]"
    return f"{value!r} ({'string' if isinstance(value, str) else 'integer'})"


def _describe_compatible(raw: bytes | None) -> str:
    if raw is None:
        return "missing"
    return repr(raw[:-1].decode("latin-1")) if raw.endswith(b"\0") else f"[{raw[:32].hex(' ')}]"


def verify_fragment(data: bytes, *, compatible: str, instance: int | str) -> None:
    """Checks 2 to 4 of the module docstring, without size limit or hash.

    The payload reader uses this on fragments it has already checksummed.
    """
    try:
        want_instance = encode_instance(instance)
    except ValueError as e:
        # A registration that let this instance through; no fragment can match it.
        raise FragmentMismatch(f"registered instance cannot be matched: {e}") from None
    want_compatible = (KHO_COMPATIBLE_PREFIX + compatible).encode("latin-1", "replace") + b"\0"
    root = fdt.read_tree(data)
    got = root.get("compatible")
    if got != want_compatible:
        raise FragmentMismatch(
            f"root compatible is {_describe_compatible(got)}, "
            f"expected {_describe_compatible(want_compatible)}"
        )
    got = root.get("instance")
    if got != want_instance:
        raise FragmentMismatch(
            f"root instance is {_describe(got)}, expected {_describe(want_instance)}"
        )
    fdt.check_tree(root)


def validate_fragment(
    blob: bytes,
    *,
    compatible: str,
    instance: int | str,
    max_size: int = DEFAULT_MAX_FRAGMENT_SIZE,
) -> FragmentInfo:
    """Accept ``blob`` as the fragment of (``compatible``, ``instance``) or raise FragmentError.

    ``compatible`` is given without the ``linux-kho,`` prefix.
    """
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise FragmentError(f"a fragment is bytes, got {type(blob).__name__}")
    data = bytes(blob)
    if len(data) > max_size:
        raise FragmentTooLarge(f"fragment is {len(data)} bytes, max_fragment_size is {max_size}")
    verify_fragment(data, compatible=compatible, instance=instance)
    return FragmentInfo(size=len(data), sha256=hashlib.sha256(data).digest())


# -- building (what a participant calls) ------------------------------------


class FragmentBuilder:
    """A participant's fragment, written in order, like KHO's start/finish_storage.

    Create it with :func:`start_storage`. The root already holds
    ``compatible = "linux-kho,<compatible>"`` and ``instance``; add properties
    (before subnodes), nest nodes with :meth:`node`, then :meth:`finish_storage`.
    Misuse raises :class:`FragmentError` with the rule that was broken.
    """

    def __init__(self, compatible: str, instance: int | str, *, size_hint: int = 1024) -> None:
        check_compatible(compatible)
        self._w = fdt.FdtWriter(size_hint)
        self._w.begin_node("")
        self._w.property("compatible", (KHO_COMPATIBLE_PREFIX + compatible).encode() + b"\0")
        self._w.property("instance", encode_instance(instance))

    def _put(self, name: str, value: bytes) -> None:
        if self._w.depth == 1 and name in ("compatible", "instance"):
            raise FragmentError(f"the root {name!r} is written by start_storage(); not twice")
        self._w.property(name, value)

    def property_bytes(self, name: str, data: bytes | bytearray | memoryview) -> None:
        self._put(name, bytes(data))

    def property_string(self, name: str, value: str) -> None:
        self._put(name, _encode_string(name, value))

    def property_strings(self, name: str, values: Sequence[str]) -> None:
        if isinstance(values, str):
            raise TypeError(f"property_strings({name!r}) takes a sequence of str, not a str")
        self._put(name, b"".join(_encode_string(name, v) for v in values))

    def property_u32(self, name: str, value: int) -> None:
        self._put(name, _pack_int(name, ">I", value, 32))

    def property_u64(self, name: str, value: int) -> None:
        self._put(name, _pack_int(name, ">Q", value, 64))

    def property_u64_native(self, name: str, value: int) -> None:
        self._put(name, _pack_int(name, fdt.NATIVE_U64, value, 64))

    def begin_node(self, name: str) -> None:
        self._w.begin_node(name)

    def end_node(self) -> None:
        if self._w.depth == 1:
            raise FragmentError("end_node() without a matching begin_node()")
        self._w.end_node()

    @contextmanager
    def node(self, name: str) -> Iterator[FragmentBuilder]:
        self.begin_node(name)
        yield self
        self.end_node()

    def finish_storage(self) -> bytes:
        """Close open nodes and return the minimal blob; later calls raise."""
        return self._w.finish()


def start_storage(
    compatible: str, instance: int | str, *, size_hint: int = 1024
) -> FragmentBuilder:
    """Begin a fragment for ``compatible`` (without the ``linux-kho,`` prefix) and ``instance``."""
    return FragmentBuilder(compatible, instance, size_hint=size_hint)


def _encode_string(name: str, value: str) -> bytes:
    if not isinstance(value, str) or "\0" in value:
        raise FragmentError(f"property {name!r}: {value!r} is not a str without NUL")
    return value.encode() + b"\0"


def _pack_int(name: str, fmt: str, value: int, bits: int) -> bytes:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise FragmentError(f"property {name!r}: {value!r} is not a u{bits}")
    return struct.pack(fmt, value)
