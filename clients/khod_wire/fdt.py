"""The libfdt layer: a sequential writer and a checked reader (:mod:`khod_wire.dts` prints).

Writing goes through libfdt's sequential writer (``FdtSw``); checking goes
through ``fdt_check_full``. Reading walks the structure block in Python, but
only after ``fdt_check_full`` has accepted the blob: pylibfdt's readers raise
``SystemError`` on property names that are not UTF-8 and cannot see
properties that follow a subnode, and hostile blobs have both.

Conventions (the payload format in the design contract relies on them):

- Values KHO itself defines (``preserved-data`` and ``blob-size`` in the
  payload root) are **native-endian u64**, as mainline ``kho_add_subtree``
  writes them.
- Values a participant writes with ``property_u32`` / ``property_u64``
  follow the devicetree convention: **big-endian cells**.
  (``FragmentBuilder.property_u64_native`` writes the KHO one.)
- How an ``instance`` is written is :mod:`khod_wire.identity`'s business.
- Names follow dtc's rules (dtc refuses trees that break them): node names
  use ``[A-Za-z0-9,._+-]`` plus at most one ``@`` after a non-empty base;
  property names use ``[A-Za-z0-9,._+*#?-]``. ``name``, ``phandle`` and
  ``linux,phandle`` are refused: dtc gives them meaning a fragment has no use
  for. Within a node, names are unique and properties come before subnodes.
- Nodes nest at most ``MAX_DEPTH`` (32) deep, the root counting as one,
  and names are at most ``MAX_NAME_LEN`` (255) bytes.
  Reading costs time and memory linear in the blob's size at any depth.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import libfdt

from khod_wire.errors import FragmentError

FDT_VERSION = 17
FDT_MAGIC = 0xD00DFEED
FDT_HEADER_SIZE = 40
#: Nodes on the path from the root to the deepest node, the root included.
#: Linux unflattens at most 64 (FDT_MAX_DEPTH); nothing a component hands
#: over needs more than a few, and a bound keeps hostile nesting cheap.
MAX_DEPTH = 32
#: Bytes in a node or property name. The devicetree spec says 31; this is
#: generous, and keeps a reader from scanning (and copying) a long string of
#: the strings block once per property that points into it.
MAX_NAME_LEN = 255

_NODE_RE = re.compile(r"[A-Za-z0-9,._+-]+(@[A-Za-z0-9,._+-]*)?")
_PROP_RE = re.compile(r"[A-Za-z0-9,._+*#?-]+")
_LONG_NAME_RE = re.compile(b"[^\\0]{%d}" % (MAX_NAME_LEN + 1))
_RESERVED_PROPS = frozenset({"name", "phandle", "linux,phandle"})
_BEGIN_NODE, _END_NODE, _PROP, _NOP, _END = 1, 2, 3, 4, 9
_U32 = struct.Struct(">I")
#: How KHO writes its own u64 values (preserved-data, blob-size).
NATIVE_U64 = "=Q"  # '=' is native byte order with standard sizes: KHO's convention


def _align4(n: int) -> int:
    return (n + 3) & ~3


# -- libfdt's errors -----------------------------------------------------------
# The one place where libfdt's failures, raised (FdtException) or returned
# (a negative code), become khod's FragmentError; nothing outside this module
# calls libfdt.


def _libfdt_error(what: str, err: int) -> FragmentError:
    return FragmentError(f"libfdt {what} failed: {libfdt.fdt_strerror(err)}")


def _libfdt_result(what: str, value: int) -> int:
    """``value`` if libfdt returned success (>= 0); FragmentError otherwise."""
    if value < 0:
        raise _libfdt_error(what, value)
    return value


@contextmanager
def _libfdt(what: str) -> Iterator[None]:
    """Turn an FdtException raised in the block into a FragmentError."""
    try:
        yield
    except libfdt.FdtException as exc:
        raise _libfdt_error(what, int(exc.err)) from None


# -- names -------------------------------------------------------------------


def check_node_name(name: str) -> None:
    """FragmentError unless ``name`` is a node name dtc accepts."""
    if len(name) > MAX_NAME_LEN:
        raise FragmentError(f"node name of {len(name)} bytes is longer than {MAX_NAME_LEN}")
    if not _NODE_RE.fullmatch(name):
        raise FragmentError(
            f"bad node name {name!r}: use letters, digits and ,._+- with at most one "
            "'@unit' suffix after a non-empty base"
        )


def check_property_name(name: str) -> None:
    """FragmentError unless ``name`` is a property name dtc accepts and gives no meaning."""
    if len(name) > MAX_NAME_LEN:
        raise FragmentError(f"property name of {len(name)} bytes is longer than {MAX_NAME_LEN}")
    if not _PROP_RE.fullmatch(name):
        raise FragmentError(f"bad property name {name!r}: use letters, digits and ,._+*#?-")
    if name in _RESERVED_PROPS:
        raise FragmentError(f"property name {name!r} is reserved by the devicetree format")


# -- writing -----------------------------------------------------------------


class _Path:
    """A node's path as a link to its parent's: O(1) to make, a str only when shown.

    Building every path as a string costs time and memory quadratic in the depth.
    """

    __slots__ = ("name", "parent")

    def __init__(self, name: str, parent: _Path | None) -> None:
        self.name, self.parent = name, parent

    def __str__(self) -> str:
        names: list[str] = []
        at: _Path | None = self
        while at is not None and at.parent is not None:
            names.append(at.name)
            at = at.parent
        return "/" + "/".join(reversed(names))


_ROOT_PATH = _Path("", None)


@dataclass
class _Frame:
    path: _Path
    props: set[str] = field(default_factory=set)
    children: set[str] = field(default_factory=set)


def _too_deep(where: object) -> FragmentError:
    return FragmentError(f"nodes nest deeper than {MAX_DEPTH} levels, under {where}")


class FdtWriter:
    """Sequential FDT writer that enforces the naming rules and grows by doubling.

    FdtSw grows by 1 KiB per failed write, which is quadratic for big values;
    reserving space up front keeps growth amortized linear.
    """

    def __init__(self, size_hint: int = 1024) -> None:
        with _libfdt("writer setup"):
            self._sw = libfdt.FdtSw(max(int(size_hint), 256))
            self._sw.finish_reservemap()
        self._frames: list[_Frame] = []
        self._finished = False
        self._slack = 0  # free bytes known without asking libfdt: a lower bound
        self.struct_offset = 0
        """Offset of the structure block in the finished blob (set by ``finish``)."""

    @property
    def depth(self) -> int:
        return len(self._frames)

    def _live(self) -> None:
        if self._finished:
            raise FragmentError("the FDT is already finished")

    def _reserve(self, n: int) -> None:
        """Make sure the next write, which takes at most ``n`` bytes, fits."""
        self._live()
        if self._slack < n:
            sw = self._sw
            used = int(sw.off_dt_struct()) + int(sw.size_dt_struct()) + int(sw.size_dt_strings())
            total = int(sw.totalsize())
            if total - used < n:
                total = max(2 * total, used + 2 * n)
                with _libfdt("resize"):
                    sw.resize(total)
            self._slack = total - used
        self._slack -= n

    def begin_node(self, name: str) -> None:
        self._live()
        if self._frames:
            parent = self._frames[-1]
            check_node_name(name)
            if name in parent.children:
                raise FragmentError(f"duplicate node {name!r} under {parent.path}")
            if len(self._frames) >= MAX_DEPTH:
                raise _too_deep(parent.path)
            parent.children.add(name)
            path = _Path(name, parent.path)
        elif name:
            raise FragmentError(f"the root node has an empty name, got {name!r}")
        else:
            path = _ROOT_PATH
        self._reserve(len(name) + 16)
        with _libfdt("begin_node"):
            self._sw.begin_node(name)
        self._frames.append(_Frame(path))

    def end_node(self) -> None:
        self._live()
        if not self._frames:
            raise FragmentError("end_node() without an open node")
        self._reserve(8)
        with _libfdt("end_node"):
            self._sw.end_node()
        self._frames.pop()

    def property(self, name: str, value: bytes) -> int:
        """Write a property; return where its value starts, relative to ``struct_offset``."""
        self._live()
        if not self._frames:
            raise FragmentError(f"property {name!r} outside of any node")
        frame = self._frames[-1]
        check_property_name(name)
        if name in frame.props:
            raise FragmentError(f"duplicate property {name!r} in {frame.path}")
        if frame.children:
            # libfdt readers stop looking for properties at the first subnode.
            raise FragmentError(f"property {name!r} in {frame.path} after a subnode")
        value = bytes(value)
        self._reserve(len(value) + len(name) + 32)
        before = int(self._sw.size_dt_struct())
        with _libfdt("property"):
            self._sw.property(name, value)
        # An FDT_PROP record is tag, length and name offset (3 x u32), then the value.
        assert int(self._sw.size_dt_struct()) == before + 12 + _align4(len(value))
        frame.props.add(name)
        return before + 12

    def finish(self) -> bytes:
        """Close every open node and return the packed blob; the writer is then spent."""
        while self._frames:
            self.end_node()
        self._reserve(16)
        with _libfdt("finish"):
            fdt = self._sw.as_fdt()
            fdt.pack()
        self._finished = True
        self.struct_offset = int(fdt.off_dt_struct())
        return bytes(fdt.as_bytearray())


def native_u64(value: int) -> bytes:
    """``value`` as KHO writes it: a native-endian u64."""
    return struct.pack(NATIVE_U64, value)


def read_native_u64(raw: bytes) -> int:
    """The inverse of :func:`native_u64`; ``raw`` must be 8 bytes."""
    return int(struct.unpack(NATIVE_U64, raw)[0])


# -- reading -----------------------------------------------------------------


class FdtHeader(NamedTuple):
    magic: int
    totalsize: int
    off_dt_struct: int
    off_dt_strings: int
    off_mem_rsvmap: int
    version: int
    last_comp_version: int
    boot_cpuid_phys: int
    size_dt_strings: int
    size_dt_struct: int


def read_header(data: bytes) -> FdtHeader:
    """The header fields, unchecked; FragmentError if ``data`` is shorter than a header."""
    if len(data) < FDT_HEADER_SIZE:
        raise FragmentError(
            f"too short for an FDT: {len(data)} bytes, the header alone is {FDT_HEADER_SIZE}"
        )
    return FdtHeader(*struct.unpack_from(">10I", data))


def check_blob(data: bytes) -> None:
    """FragmentError unless ``data`` is exactly one FDT v17 that passes libfdt's full check."""
    h = read_header(data)
    if h.magic != FDT_MAGIC:
        raise FragmentError(f"bad magic 0x{h.magic:08x}, expected 0x{FDT_MAGIC:08x}")
    if h.version != FDT_VERSION:
        raise FragmentError(f"FDT version {h.version}, expected {FDT_VERSION}")
    if h.totalsize > len(data):
        raise FragmentError(f"truncated: the header says {h.totalsize} bytes, got {len(data)}")
    if h.totalsize < len(data):
        raise FragmentError(
            f"{len(data) - h.totalsize} stray bytes after the FDT "
            f"(header totalsize {h.totalsize}, got {len(data)})"
        )
    # libfdt finds each property's name with a memchr to the end of the strings
    # block: quadratic when many properties point into one long string.
    strings = data[h.off_dt_strings : h.off_dt_strings + h.size_dt_strings]
    long_name = _LONG_NAME_RE.search(strings)
    if long_name is not None:
        raise FragmentError(
            f"a name in the strings block (offset {long_name.start()}) is longer than "
            f"{MAX_NAME_LEN} bytes"
        )
    _libfdt_result("full check", int(libfdt.fdt_check_full(bytearray(data), len(data))))


@dataclass(frozen=True)
class Node:
    """One node as read from a blob; names are latin-1 so that any byte survives."""

    name: str
    where: _Path = field(repr=False, compare=False)
    properties: tuple[tuple[str, bytes], ...]
    children: tuple[Node, ...]

    @property
    def path(self) -> str:
        return str(self.where)

    def get(self, name: str) -> bytes | None:
        """The value of the first property called ``name``, or None."""
        return next((v for n, v in self.properties if n == name), None)


@dataclass
class _OpenNode:
    name: str
    where: _Path
    props: list[tuple[str, bytes]] = field(default_factory=list)
    children: list[Node] = field(default_factory=list)


def read_tree(data: bytes) -> Node:
    """Check ``data`` with :func:`check_blob` and return its root node."""
    data = bytes(data)
    check_blob(data)
    h = read_header(data)
    strings = data[h.off_dt_strings : h.off_dt_strings + h.size_dt_strings]
    pos, end = h.off_dt_struct, h.off_dt_struct + h.size_dt_struct
    stack: list[_OpenNode] = []
    root: Node | None = None
    # Iterative on purpose: a hostile blob may nest deeper than Python recurses.
    while root is None and pos + 4 <= end:
        (tag,) = _U32.unpack_from(data, pos)
        pos += 4
        if tag == _BEGIN_NODE:
            nul = data.find(b"\0", pos, min(end, pos + MAX_NAME_LEN + 1))
            if nul < 0:
                raise FragmentError(
                    f"node name at offset {pos} is longer than {MAX_NAME_LEN} bytes"
                )
            name = data[pos:nul].decode("latin-1")
            if len(stack) >= MAX_DEPTH:
                raise _too_deep(stack[-1].where)
            stack.append(_OpenNode(name, _Path(name, stack[-1].where) if stack else _ROOT_PATH))
            pos = _align4(nul + 1)
        elif tag == _END_NODE and stack:
            top = stack.pop()
            node = Node(top.name, top.where, tuple(top.props), tuple(top.children))
            if stack:
                stack[-1].children.append(node)
            else:
                root = node
        elif tag == _PROP and stack and pos + 8 <= end:
            length, nameoff = struct.unpack_from(">II", data, pos)
            value = data[pos + 8 : pos + 8 + length]
            pos = _align4(pos + 8 + length)
            nul = strings.find(b"\0", nameoff, nameoff + MAX_NAME_LEN + 1)
            if nul < 0:
                raise FragmentError(
                    f"property name at strings offset {nameoff} is longer than {MAX_NAME_LEN} bytes"
                )
            pname = strings[nameoff:nul].decode("latin-1")
            if stack[-1].children:
                raise FragmentError(
                    f"property {pname!r} in {stack[-1].where} follows a subnode; "
                    "libfdt readers would not see it"
                )
            stack[-1].props.append((pname, value))
        elif tag != _NOP:
            break
    if root is None:  # fdt_check_full accepted it, so this is not expected
        raise FragmentError(f"malformed structure block near offset {pos}")
    return root


def memreserve(data: bytes) -> list[tuple[int, int]]:
    """``(address, size)`` of each memory reservation of a blob that :func:`check_blob` accepted."""
    h = read_header(data)
    count = _libfdt_result("memreserve count", int(libfdt.fdt_num_mem_rsv(bytearray(data))))
    return [
        (int(addr), int(size))
        for addr, size in struct.iter_unpack(
            ">QQ", data[h.off_mem_rsvmap : h.off_mem_rsvmap + 16 * count]
        )
    ]


def check_tree(root: Node) -> None:
    """FragmentError if any name breaks the rules or repeats among its siblings."""
    stack = [root]
    while stack:
        node = stack.pop()
        seen: set[str] = set()
        for name, _ in node.properties:
            check_property_name(name)
            if name in seen:
                raise FragmentError(f"duplicate property {name!r} in {node.path}")
            seen.add(name)
        seen.clear()
        for child in node.children:
            check_node_name(child.name)
            if child.name in seen:
                raise FragmentError(f"duplicate node {child.name!r} under {node.path}")
            seen.add(child.name)
        stack.extend(node.children)
