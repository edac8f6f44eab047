"""Writing the payload image: where each fragment goes, and the root FDT that links them.

The format and the rules a link's values follow are :mod:`khod.payload`'s;
this module only lays them out. It runs in the blackout window, so it only
links: it never parses, checks or hashes a fragment (that was done when each
one arrived) and its cost grows with the number of participants.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from khod import payload
from khod.payload import DEFAULT_PAGE_SIZE, HANDOVER_ID_MAX, PAYLOAD_COMPATIBLE, FragmentRef
from khod_wire import fdt, identity
from khod_wire.errors import PayloadError


def _align(n: int, page: int) -> int:
    return (n + page - 1) & ~(page - 1)


@dataclass(frozen=True)
class PayloadEntry:
    """One frozen participant's fragment, as handed to :func:`layout`."""

    name: str
    compatible: str
    instance: int | str
    blob: bytes = field(repr=False)
    sha256: bytes = field(repr=False)
    restore_after: tuple[str, ...] = ()


def _link_values(entry: PayloadEntry) -> tuple[bytes, bytes, bytes]:
    """The link node's compatible, instance and restore-after values."""
    where = f"participant {entry.name!r}"
    try:
        fdt.check_node_name(entry.name)
        identity.check_compatible(entry.compatible)
        instance = identity.encode_instance(entry.instance)
        restore_after = payload.encode_names(entry.restore_after)
    except payload.REFUSALS as e:
        raise PayloadError(f"{where}: {e}") from None
    if len(entry.sha256) != 32:
        raise PayloadError(f"{where}: sha256 is {len(entry.sha256)} bytes, expected 32")
    if not entry.blob:
        raise PayloadError(f"{where}: empty fragment")
    compatible = (identity.KHO_COMPATIBLE_PREFIX + entry.compatible).encode() + b"\0"
    return compatible, instance, restore_after


@dataclass(frozen=True)
class Layout:
    """An assembled image, with where its root ends and each fragment starts."""

    image: bytes
    root_size: int
    offsets: tuple[int, ...]

    def manifest(self, handover_id: str, entries: Sequence[PayloadEntry], *, base: int,
                 page_size: int = DEFAULT_PAGE_SIZE) -> dict[str, Any]:  # fmt: skip
        """The manifest written beside the image, from what assembly already knows.

        No hash of the whole image (that would read every fragment inside the
        blackout): ``root_sha256`` covers the root, which holds every
        fragment's sha256, so it vouches for the whole image.
        """
        return {
            "format": PAYLOAD_COMPATIBLE,
            "handover_id": handover_id,
            "base": base,
            "page_size": page_size,
            "size": len(self.image),
            "root_size": self.root_size,
            "root_sha256": hashlib.sha256(self.image[: self.root_size]).hexdigest(),
            "participants": [
                FragmentRef(
                    e.name, e.compatible, e.instance, off, len(e.blob), e.sha256, e.restore_after
                ).to_manifest()
                for e, off in zip(entries, self.offsets, strict=True)
            ],
        }


def layout(
    handover_id: str,
    entries: Sequence[PayloadEntry],
    *,
    base: int = 0,
    page_size: int = DEFAULT_PAGE_SIZE,
) -> Layout:
    """The payload image linking ``entries`` in the given (freeze) order, and where each lies.

    Deterministic: the same input gives the same bytes. PayloadError on a bad
    or duplicate name, handover id or link value; ValueError on a bad layout.
    """
    payload.check_layout(base, page_size)
    hid = handover_id.encode("ascii", "replace") + b"\0"
    if payload.printable(hid, HANDOVER_ID_MAX) != handover_id:
        raise PayloadError(f"handover id {handover_id!r} is not 1..128 printable ASCII")
    links: list[tuple[bytes, bytes, bytes]] = []
    names: set[str] = set()
    keys: set[tuple[bytes, bytes]] = set()
    for entry in entries:
        link = _link_values(entry)
        if entry.name in names:
            raise PayloadError(f"duplicate participant name {entry.name!r}")
        if link[:2] in keys:
            raise PayloadError(
                f"participant {entry.name!r}: another participant has the same "
                f"compatible {entry.compatible!r} and instance {entry.instance!r}"
            )
        names.add(entry.name)
        keys.add(link[:2])
        links.append(link)

    # The root's size depends on names and link values, never on the offsets:
    # write placeholders, then patch the offsets in place once the size is
    # known. A link node is its variable-length values plus ~160 bytes of tags
    # and fixed-size values, so the first allocation is enough.
    hint = (
        256
        + len(hid)
        + sum(
            len(e.name) + sum(map(len, link)) + 160 for e, link in zip(entries, links, strict=True)
        )
    )
    w = fdt.FdtWriter(hint)
    w.begin_node("")
    w.property("compatible", PAYLOAD_COMPATIBLE.encode() + b"\0")
    w.property("handover-id", hid)
    slots: list[int] = []
    for entry, (compatible, instance, restore_after) in zip(entries, links, strict=True):
        w.begin_node(entry.name)
        w.property("compatible", compatible)
        w.property("instance", instance)
        slots.append(w.property("preserved-data", fdt.native_u64(0)))
        w.property("blob-size", fdt.native_u64(len(entry.blob)))
        w.property("sha256", entry.sha256)
        if restore_after:
            w.property("restore-after", restore_after)
        w.end_node()
    root = bytearray(w.finish())

    parts: list[bytes | bytearray] = [root]
    end = len(root)
    offsets = []
    for entry, slot in zip(entries, slots, strict=True):
        offset = _align(end, page_size)
        if base + offset + len(entry.blob) > 1 << 64:
            raise ValueError(f"participant {entry.name!r} would lie beyond 2**64 (base 0x{base:x})")
        root[w.struct_offset + slot : w.struct_offset + slot + 8] = fdt.native_u64(base + offset)
        parts.append(bytes(offset - end))
        parts.append(entry.blob)
        offsets.append(offset)
        end = offset + len(entry.blob)
    return Layout(b"".join(parts), len(root), tuple(offsets))
