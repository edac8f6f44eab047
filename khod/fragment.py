"""The daemon's check of every fragment that arrives, before it is acknowledged.

A fragment comes off the bus from a participant that may be buggy or hostile,
so every byte string gets the same treatment and every refusal is a
:class:`~khod.errors.FragmentError` subclass naming what was expected and
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
from dataclasses import dataclass

from khod import fdt
from khod.errors import FragmentError, FragmentMismatch, FragmentTooLarge

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
        value = fdt.decode_instance(raw)
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
        want_instance = fdt.encode_instance(instance)
    except ValueError as e:
        # A registration that let this instance through; no fragment can match it.
        raise FragmentMismatch(f"registered instance cannot be matched: {e}") from None
    want_compatible = (fdt.KHO_COMPATIBLE_PREFIX + compatible).encode("latin-1", "replace") + b"\0"
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
