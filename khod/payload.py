"""Assemble the payload image, and read one back with every check.

Layout (see "Payload image" in the design contract)::

    offset 0         root FDT: / { compatible = "khod-v1"; handover-id = "<uuid>";
                                   <name> { compatible; instance; preserved-data;
                                            blob-size; sha256; [restore-after;] }; ... };
    page-aligned     fragment of the first participant (freeze order)
    page-aligned     fragment of the next one ...

Zero bytes fill the gaps. ``preserved-data`` (base + offset) and
``blob-size`` are native-endian u64 as in mainline KHO. ``restore-after``, a
string list present only when not empty, names the participants this one
restores after: the incoming daemon has nothing but the image to go by.

Assembly runs in the blackout window, so it only links: it never parses,
checks or hashes a fragment (that was done when each one arrived) and its cost
grows with the number of participants. Reading, on the other hand, trusts
nothing: every link, offset, checksum and fragment is verified, and any
problem is a :class:`~khod_wire.errors.PayloadError` naming the participant and
offset.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from os import PathLike
from pathlib import Path
from typing import Any

from khod_wire import fdt, identity
from khod_wire.errors import FragmentError, PayloadError, RegistrationError
from khod_wire.fragment import verify_fragment

PAYLOAD_COMPATIBLE = "khod-v1"
DEFAULT_PAGE_SIZE = 4096
_HANDOVER_ID_MAX = 128
# Link properties and their exact lengths (0: any length).
_LINK_PROPS = (("compatible", 0), ("instance", 0), ("preserved-data", 8), ("blob-size", 8),
               ("sha256", 32))  # fmt: skip


def _align(n: int, page: int) -> int:
    return (n + page - 1) & ~(page - 1)


def _check_layout(base: int, page_size: int) -> None:
    if page_size < 8 or page_size & (page_size - 1):
        raise ValueError(f"page_size {page_size} is not a power of two >= 8")
    if base < 0 or base % page_size:
        raise ValueError(f"base 0x{base:x} is not a page-aligned address")


def _printable(raw: bytes | None, limit: int) -> str | None:
    """The text of a NUL-terminated printable ASCII value, or None."""
    if raw is None or not raw.endswith(b"\0") or not 1 < len(raw) <= limit + 1:
        return None
    body = raw[:-1]
    return body.decode("ascii") if all(0x20 <= b < 0x7F for b in body) else None


@dataclass(frozen=True)
class PayloadEntry:
    """One frozen participant's fragment, as handed to :func:`layout`."""

    name: str
    compatible: str
    instance: int | str
    blob: bytes = field(repr=False)
    sha256: bytes = field(repr=False)
    restore_after: tuple[str, ...] = ()


def _names_list(names: Sequence[str]) -> bytes:
    if isinstance(names, str):  # a str is a Sequence[str] of its characters
        raise ValueError(f"restore_after {names!r} is a str, not a list of names")
    raw = b"".join(str(n).encode("ascii", "replace") + b"\0" for n in names)
    if _names(raw) != tuple(names):
        raise ValueError(f"restore_after {names!r} is not a list of printable names")
    return raw


def _names(raw: bytes) -> tuple[str, ...] | None:
    """The names in a string list of printable ASCII names, or None."""
    if not raw:
        return ()
    if not raw.endswith(b"\0"):
        return None
    names: list[str] = []
    for part in raw[:-1].split(b"\0"):
        name = _printable(part + b"\0", 256)
        if name is None:
            return None
        names.append(name)
    return tuple(names)


def _link_values(entry: PayloadEntry) -> tuple[bytes, bytes, bytes]:
    """The link node's compatible, instance and restore-after values."""
    where = f"participant {entry.name!r}"
    try:
        fdt.check_node_name(entry.name)
        identity.check_compatible(entry.compatible)
        instance = identity.encode_instance(entry.instance)
        restore_after = _names_list(entry.restore_after)
    except (FragmentError, RegistrationError, ValueError) as e:
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
                {
                    "name": e.name,
                    "compatible": e.compatible,
                    "instance": e.instance,
                    "offset": off,
                    "size": len(e.blob),
                    "sha256": e.sha256.hex(),
                    "restore_after": list(e.restore_after),
                }
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
    _check_layout(base, page_size)
    hid = handover_id.encode("ascii", "replace") + b"\0"
    if _printable(hid, _HANDOVER_ID_MAX) != handover_id:
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


@dataclass(frozen=True)
class FragmentRef:
    """Where one participant's fragment lies in a verified image."""

    name: str
    compatible: str
    instance: int | str
    offset: int
    size: int
    sha256: bytes = field(repr=False)
    restore_after: tuple[str, ...] = ()

    @property
    def sha256_hex(self) -> str:
        return self.sha256.hex()


def _read_link(node: fdt.Node, base: int) -> FragmentRef:
    where = f"participant {node.name!r}"
    for name, length in _LINK_PROPS:
        raw = node.get(name)
        if raw is None:
            raise PayloadError(f"{where}: missing property {name!r}")
        if length and len(raw) != length:
            raise PayloadError(f"{where}: {name!r} is {len(raw)} bytes, expected {length}")
    text = _printable(node.get("compatible"), 512) or ""
    compatible = text.removeprefix(identity.KHO_COMPATIBLE_PREFIX)
    try:
        if compatible == text:
            raise ValueError(f"{text!r} lacks the {identity.KHO_COMPATIBLE_PREFIX!r} prefix")
        identity.check_compatible(compatible)
        instance = identity.decode_instance(node.get("instance") or b"")
    except (FragmentError, RegistrationError, ValueError) as e:
        raise PayloadError(f"{where}: {e}") from None
    raw_after = node.get("restore-after")
    restore_after = () if raw_after is None else _names(raw_after)
    if restore_after is None:
        raise PayloadError(f"{where}: restore-after is not a list of printable names")
    address = fdt.read_native_u64(node.get("preserved-data") or b"")
    if address < base:
        raise PayloadError(f"{where}: preserved-data 0x{address:x} is below the base 0x{base:x}")
    return FragmentRef(
        name=node.name,
        compatible=compatible,
        instance=instance,
        offset=address - base,
        size=fdt.read_native_u64(node.get("blob-size") or b""),
        sha256=node.get("sha256") or b"",
        restore_after=restore_after,
    )


def _check_zero(data: bytes, start: int, end: int) -> None:
    gap = data[start:end]
    if gap.count(0) != len(gap):
        first = start + len(gap) - len(gap.lstrip(b"\0"))
        raise PayloadError(f"non-zero byte at offset 0x{first:x}, in padding")


@dataclass(frozen=True)
class PayloadImage:
    """A payload image that passed every check of :meth:`parse`."""

    handover_id: str
    base: int
    entries: tuple[FragmentRef, ...]
    data: bytes = field(repr=False)
    root_size: int
    page_size: int = DEFAULT_PAGE_SIZE

    @classmethod
    def parse(
        cls, data: bytes, *, base: int = 0, page_size: int = DEFAULT_PAGE_SIZE
    ) -> PayloadImage:
        """Verify ``data`` completely; PayloadError saying what is wrong and where."""
        _check_layout(base, page_size)
        data = bytes(data)
        try:
            header = fdt.read_header(data)
            if header.magic != fdt.FDT_MAGIC:  # then totalsize means nothing either
                raise FragmentError(f"bad magic 0x{header.magic:08x}: not a payload image")
            if header.totalsize > len(data):
                raise FragmentError(
                    f"truncated image: {len(data)} bytes, the root alone is {header.totalsize}"
                )
            root = fdt.read_tree(data[: header.totalsize])
            fdt.check_tree(root)
        except FragmentError as e:
            raise PayloadError(f"root FDT: {e}") from None
        root_size = header.totalsize
        compatible = root.get("compatible")
        if compatible != PAYLOAD_COMPATIBLE.encode() + b"\0":
            raise PayloadError(
                f"root FDT: compatible is {compatible!r}, expected {PAYLOAD_COMPATIBLE!r}"
            )
        handover_id = _printable(root.get("handover-id"), _HANDOVER_ID_MAX)
        if handover_id is None:
            raise PayloadError("root FDT: handover-id is missing or not printable text")

        refs = [_read_link(node, base) for node in root.children]
        keys: dict[tuple[str, int | str], str] = {}
        for ref in refs:
            key = (ref.compatible, ref.instance)
            if key in keys:
                raise PayloadError(
                    f"participants {keys[key]!r} and {ref.name!r} share compatible and instance"
                )
            keys[key] = ref.name
        end, previous = root_size, "the root FDT"
        for ref in sorted(refs, key=lambda r: r.offset):
            at = f"participant {ref.name!r} at offset 0x{ref.offset:x}"
            if ref.offset % page_size:
                raise PayloadError(f"{at}: not aligned to the {page_size}-byte page")
            if ref.offset < end:
                raise PayloadError(f"{at}: overlaps {previous} (which ends at 0x{end:x})")
            if ref.offset + ref.size > len(data):
                raise PayloadError(
                    f"{at}: its {ref.size} bytes end at 0x{ref.offset + ref.size:x}, past the "
                    f"end of the image (0x{len(data):x}): truncated or bad blob-size"
                )
            _check_zero(data, end, ref.offset)
            blob = data[ref.offset : ref.offset + ref.size]
            if hashlib.sha256(blob).digest() != ref.sha256:
                raise PayloadError(f"{at}: sha256 mismatch, the fragment is corrupt")
            try:
                verify_fragment(blob, compatible=ref.compatible, instance=ref.instance)
            except FragmentError as e:
                raise PayloadError(f"{at}: {e}") from None
            end, previous = ref.offset + ref.size, f"participant {ref.name!r}"
        if len(data) != end:
            raise PayloadError(
                f"{len(data) - end} bytes after {previous}, which ends the image at 0x{end:x}"
            )
        return cls(handover_id, base, tuple(refs), data, root_size, page_size)

    @classmethod
    def from_file(
        cls, path: str | PathLike[str], *, base: int = 0, page_size: int = DEFAULT_PAGE_SIZE
    ) -> PayloadImage:
        """Read and :meth:`parse` a file; OSError if it cannot be read."""
        return cls.parse(Path(path).read_bytes(), base=base, page_size=page_size)

    @cached_property
    def _by_name(self) -> dict[str, FragmentRef]:
        return {ref.name: ref for ref in self.entries}

    @property
    def size(self) -> int:
        return len(self.data)

    def fragment(self, ref: FragmentRef) -> bytes:
        return self.data[ref.offset : ref.offset + ref.size]

    def retrieve(self, name: str) -> bytes:
        """The fragment of participant ``name``; PayloadError if there is none."""
        ref = self._by_name.get(name)
        if ref is None:
            raise PayloadError(f"no fragment for participant {name!r}")
        return self.fragment(ref)

    def manifest(self) -> dict[str, Any]:
        """A JSON-able description of the image, as written next to it on commit."""
        return {
            "format": PAYLOAD_COMPATIBLE,
            "handover_id": self.handover_id,
            "base": self.base,
            "page_size": self.page_size,
            "size": self.size,
            "sha256": hashlib.sha256(self.data).hexdigest(),
            "participants": [
                {
                    "name": ref.name,
                    "compatible": ref.compatible,
                    "instance": ref.instance,
                    "offset": ref.offset,
                    "size": ref.size,
                    "sha256": ref.sha256_hex,
                    "restore_after": list(ref.restore_after),
                }
                for ref in self.entries
            ],
        }
