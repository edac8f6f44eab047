"""Writing the payload image: where each fragment goes, and the root FDT that links them.

The format and the rules a link's values follow are :mod:`khod.payload`'s;
this module only lays them out. It runs in the blackout window, so it only
links: it never parses, checks or hashes a fragment (that was done when each
one arrived) and its cost grows with the number of participants.
"""

from __future__ import annotations

import hashlib
import struct
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


# The root is written here directly, not through libfdt's sequential
# writer: it is the one FDT built inside the blackout, its shape is fixed
# (one node per participant, the same six property names), and the writer's
# per-call cost was most of the commit at N=1,000 (~25-50 ms). The bytes are
# those libfdt writes, byte for byte (tests/unit/test_payload.py compares
# them), so libfdt, dtc and ``khod inspect`` read it alike.
_BEGIN_NODE, _END_NODE, _PROP, _END = (struct.pack(">I", t) for t in (1, 2, 3, 9))
_HEADER = struct.Struct(">10I")
_PROP_HEAD = struct.Struct(">2I")  # value length, name offset
_MAGIC, _VERSION, _LAST_COMP_VERSION = 0xD00DFEED, 17, 16
_RSVMAP = 40  # right after the header, 8-byte aligned
#: libfdt adds each name to the strings block at its first use, the newest first.
_NAMES = ("compatible", "handover-id", "instance", "preserved-data", "blob-size", "sha256")


def _strings(has_nodes: bool, ordered: bool) -> tuple[bytes, dict[str, int]]:
    """The strings block of a root, and each name's offset in it."""
    names = [*(_NAMES if has_nodes else _NAMES[:2]), *(("restore-after",) if ordered else ())]
    block = b"".join(n.encode() + b"\0" for n in reversed(names))
    offsets, at = {}, 0
    for n in reversed(names):
        offsets[n] = at
        at += len(n) + 1
    return block, offsets


def _pad(n: int) -> bytes:
    return bytes(-n % 4)


#: name offsets in the strings block: without and with "restore-after"
_OFFSETS = {ordered: _strings(True, ordered)[1] for ordered in (False, True)}


def _prop(off: dict[str, int], name: str, value: bytes) -> bytes:
    return _PROP + _PROP_HEAD.pack(len(value), off[name]) + value + _pad(len(value))


def _node(entry: PayloadEntry, values: tuple[bytes, bytes, bytes], ordered: bool) -> _Node:
    """One link node, preserved-data zero, and where that value lies in it."""
    off = _OFFSETS[ordered]
    compatible, instance, restore_after = values
    name = entry.name.encode() + b"\0"
    head = b"".join(
        (
            _BEGIN_NODE + name + _pad(len(name)),
            _prop(off, "compatible", compatible),
            _prop(off, "instance", instance),
        )
    )
    tail = [
        _prop(off, "preserved-data", fdt.native_u64(0)),
        _prop(off, "blob-size", fdt.native_u64(len(entry.blob))),
        _prop(off, "sha256", entry.sha256),
    ]
    if restore_after:
        tail.append(_prop(off, "restore-after", restore_after))
    tail.append(_END_NODE)
    # The value follows the preserved-data property's tag, length and name offset.
    return _Node(head + b"".join(tail), len(head) + 12)


@dataclass(frozen=True)
class _Node:
    data: bytes
    slot: int


@dataclass
class _Link:
    values: tuple[bytes, bytes, bytes]  # compatible, instance, restore-after
    nodes: dict[bool, _Node] = field(default_factory=dict)


class Links:
    """Each participant's link node, built when its fragment arrives, not in the blackout.

    A node depends only on the participant (name, compatible, instance,
    restore order) and its fragment (size, sha256), and on whether any
    participant names a restore order (the strings block then holds one more
    name): both forms are kept. ``layout`` takes what is here and builds what
    is not. Bounded: past ``limit`` entries, it starts over.
    """

    def __init__(self, limit: int = 1 << 16) -> None:
        self.limit = limit
        self._links: dict[tuple[Any, ...], _Link] = {}

    def __len__(self) -> int:
        return len(self._links)

    def prepare(self, entry: PayloadEntry) -> None:
        """Build ``entry``'s node now (PayloadError if it cannot be linked)."""
        link = self.link(entry)
        # One that names a restore order makes the whole root ordered.
        for ordered in (True,) if link.values[2] else (False, True):
            self.node(entry, link, ordered)

    def link(self, entry: PayloadEntry) -> _Link:
        key = _key(entry)
        link = self._links.get(key)
        if link is None:
            if len(self._links) >= self.limit:
                self._links.clear()
            link = self._links[key] = _Link(_link_values(entry))
        return link

    @staticmethod
    def node(entry: PayloadEntry, link: _Link, ordered: bool) -> _Node:
        node = link.nodes.get(ordered)
        if node is None:
            node = link.nodes[ordered] = _node(entry, link.values, ordered)
        return node


def _key(entry: PayloadEntry) -> tuple[Any, ...]:
    return (
        entry.name,
        entry.compatible,
        type(entry.instance),
        entry.instance,
        entry.sha256,
        len(entry.blob),
        entry.restore_after,
    )


def _root(hid: bytes, nodes: Sequence[_Node], ordered: bool) -> tuple[bytearray, list[int]]:
    """The root FDT (preserved-data zero) and where each preserved-data value lies in it."""
    strings, off = _strings(bool(nodes), ordered)
    parts = [
        _BEGIN_NODE + bytes(4),
        _prop(off, "compatible", PAYLOAD_COMPATIBLE.encode() + b"\0"),
        _prop(off, "handover-id", hid),
    ]
    at = _RSVMAP + 16 + sum(map(len, parts))
    slots = []
    for node in nodes:
        slots.append(at + node.slot)
        parts.append(node.data)
        at += len(node.data)
    parts += [_END_NODE, _END]
    structure = b"".join(parts)
    off_struct = _RSVMAP + 16
    off_strings = off_struct + len(structure)
    header = _HEADER.pack(
        _MAGIC,
        off_strings + len(strings),
        off_struct,
        off_strings,
        _RSVMAP,
        _VERSION,
        _LAST_COMP_VERSION,
        0,
        len(strings),
        len(structure),
    )
    return bytearray(header + bytes(16) + structure + strings), slots


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
    links: Links | None = None,
) -> Layout:
    """The payload image linking ``entries`` in the given (freeze) order, and where each lies.

    Deterministic: the same input gives the same bytes. PayloadError on a bad
    or duplicate name, handover id or link value; ValueError on a bad layout.
    ``links``: the nodes built as the fragments arrived (:class:`Links`).
    """
    payload.check_layout(base, page_size)
    hid = handover_id.encode("ascii", "replace") + b"\0"
    if payload.printable(hid, HANDOVER_ID_MAX) != handover_id:
        raise PayloadError(f"handover id {handover_id!r} is not 1..128 printable ASCII")
    links = Links() if links is None else links
    found: list[_Link] = []
    names: set[str] = set()
    keys: set[tuple[bytes, bytes]] = set()
    for entry in entries:
        link = links.link(entry)
        if entry.name in names:
            raise PayloadError(f"duplicate participant name {entry.name!r}")
        if link.values[:2] in keys:
            raise PayloadError(
                f"participant {entry.name!r}: another participant has the same "
                f"compatible {entry.compatible!r} and instance {entry.instance!r}"
            )
        names.add(entry.name)
        keys.add(link.values[:2])
        found.append(link)
    ordered = any(link.values[2] for link in found)
    nodes = [links.node(e, link, ordered) for e, link in zip(entries, found, strict=True)]
    root, slots = _root(hid, nodes, ordered)
    parts: list[bytes | bytearray] = [root]
    end = len(root)
    offsets = []
    for entry, slot in zip(entries, slots, strict=True):
        offset = _align(end, page_size)
        if base + offset + len(entry.blob) > 1 << 64:
            raise ValueError(f"participant {entry.name!r} would lie beyond 2**64 (base 0x{base:x})")
        root[slot : slot + 8] = fdt.native_u64(base + offset)
        parts.append(bytes(offset - end))
        parts.append(entry.blob)
        offsets.append(offset)
        end = offset + len(entry.blob)
    return Layout(b"".join(parts), len(root), tuple(offsets))
