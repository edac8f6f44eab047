"""The payload image: its format, and the reader that checks everything in it.

Layout (see "Payload image" in the design contract and ``docs/payload.md``)::

    offset 0         root FDT: / { compatible = "khod-v1"; handover-id = "<uuid>";
                                   <name> { compatible; instance; preserved-data;
                                            blob-size; sha256; [restore-after;] }; ... };
    page-aligned     fragment of the first participant (freeze order)
    page-aligned     fragment of the next one ...

Zero bytes fill the gaps. ``preserved-data`` (base + offset) and
``blob-size`` are native-endian u64 as in mainline KHO. ``restore-after``, a
string list present only when not empty, names the participants this one
restores after: the incoming daemon has nothing but the image to go by.

This module owns the rules both sides share (the values of a link, the page
layout) and the reader; :mod:`khod.payload_layout` writes images. Reading
trusts nothing: every link, offset, checksum and fragment is verified, and
any problem is a :class:`~khod_wire.errors.PayloadError` naming the
participant and offset. The FDT itself is :mod:`khod_wire.fdt`'s business.
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
HANDOVER_ID_MAX = 128
# Link properties and their exact lengths (0: any length).
_LINK_PROPS = (("compatible", 0), ("instance", 0), ("preserved-data", 8), ("blob-size", 8),
               ("sha256", 32))  # fmt: skip
#: What the fdt layer and the identity rules raise about one link or fragment;
#: inside an image each becomes a PayloadError that says where.
REFUSALS = (FragmentError, RegistrationError, ValueError)


def check_layout(base: int, page_size: int) -> None:
    if page_size < 8 or page_size & (page_size - 1):
        raise ValueError(f"page_size {page_size} is not a power of two >= 8")
    if base < 0 or base % page_size:
        raise ValueError(f"base 0x{base:x} is not a page-aligned address")


def printable(raw: bytes | None, limit: int) -> str | None:
    """The text of a NUL-terminated printable ASCII value, or None."""
    if raw is None or not raw.endswith(b"\0") or not 1 < len(raw) <= limit + 1:
        return None
    body = raw[:-1]
    return body.decode("ascii") if all(0x20 <= b < 0x7F for b in body) else None


def encode_names(names: Sequence[str]) -> bytes:
    """A string list of printable ASCII names, as ``restore-after`` holds; ValueError if not."""
    if isinstance(names, str):  # a str is a Sequence[str] of its characters
        raise ValueError(f"restore_after {names!r} is a str, not a list of names")
    raw = b"".join(str(n).encode("ascii", "replace") + b"\0" for n in names)
    if decode_names(raw) != tuple(names):
        raise ValueError(f"restore_after {names!r} is not a list of printable names")
    return raw


def decode_names(raw: bytes) -> tuple[str, ...] | None:
    """The names in a string list of printable ASCII names, or None."""
    if not raw:
        return ()
    if not raw.endswith(b"\0"):
        return None
    names: list[str] = []
    for part in raw[:-1].split(b"\0"):
        name = printable(part + b"\0", 256)
        if name is None:
            return None
        names.append(name)
    return tuple(names)


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

    def to_manifest(self) -> dict[str, Any]:
        """This participant's entry in a manifest (the one format both manifests share)."""
        return {
            "name": self.name,
            "compatible": self.compatible,
            "instance": self.instance,
            "offset": self.offset,
            "size": self.size,
            "sha256": self.sha256_hex,
            "restore_after": list(self.restore_after),
        }


def _read_link(node: fdt.Node, base: int) -> FragmentRef:
    where = f"participant {node.name!r}"
    for name, length in _LINK_PROPS:
        raw = node.get(name)
        if raw is None:
            raise PayloadError(f"{where}: missing property {name!r}")
        if length and len(raw) != length:
            raise PayloadError(f"{where}: {name!r} is {len(raw)} bytes, expected {length}")
    text = printable(node.get("compatible"), 512) or ""
    compatible = text.removeprefix(identity.KHO_COMPATIBLE_PREFIX)
    try:
        if compatible == text:
            raise ValueError(f"{text!r} lacks the {identity.KHO_COMPATIBLE_PREFIX!r} prefix")
        identity.check_compatible(compatible)
        instance = identity.decode_instance(node.get("instance") or b"")
    except REFUSALS as e:
        raise PayloadError(f"{where}: {e}") from None
    raw_after = node.get("restore-after")
    restore_after = () if raw_after is None else decode_names(raw_after)
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
        check_layout(base, page_size)
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
        except REFUSALS as e:
            raise PayloadError(f"root FDT: {e}") from None
        root_size = header.totalsize
        compatible = root.get("compatible")
        if compatible != PAYLOAD_COMPATIBLE.encode() + b"\0":
            raise PayloadError(
                f"root FDT: compatible is {compatible!r}, expected {PAYLOAD_COMPATIBLE!r}"
            )
        handover_id = printable(root.get("handover-id"), HANDOVER_ID_MAX)
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
            except REFUSALS as e:
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
        """A JSON-able description of the verified image, as ``khod inspect --json`` shows it.

        Like the manifest written on commit (``Layout.manifest``), but with the
        whole image's sha256, which costs nothing once every byte was read.
        """
        return {
            "format": PAYLOAD_COMPATIBLE,
            "handover_id": self.handover_id,
            "base": self.base,
            "page_size": self.page_size,
            "size": self.size,
            "sha256": hashlib.sha256(self.data).hexdigest(),
            "participants": [ref.to_manifest() for ref in self.entries],
        }
