"""Reading a hostile fragment costs memory linear in its size (issue 8, item 7).

The reader used to build every node's path as a string (quadratic in the
depth: 1 GB at depth 32,000) and to copy a property's name out of the
strings block up to its NUL once per property (quadratic when many
properties point into one long string). Nesting is now bounded by
``fdt.MAX_DEPTH`` and names by ``fdt.MAX_NAME_LEN``; these tests measure
the reader's peak allocation with tracemalloc, not wall-clock time.
"""

from __future__ import annotations

import contextlib
import struct
import tracemalloc
from collections.abc import Callable

import libfdt
import pytest

from khod_wire import fdt, fragment, identity
from khod_wire.errors import FragmentError
from khod_wire.fragment import validate_fragment

COMPAT = "example,vm-v1"
MIB = 1 << 20


def nested(depth: int, *, siblings: int = 1) -> bytes:
    """A valid FDT with ``siblings`` chains of nodes ``depth`` deep, the root counting as one."""
    sw = libfdt.FdtSw(siblings * depth * 16 + 4096)
    sw.finish_reservemap()
    sw.begin_node("")
    sw.property("compatible", f"linux-kho,{COMPAT}".encode() + b"\0")
    sw.property("instance", identity.encode_instance(1))
    for s in range(siblings):
        sw.begin_node(f"c{s}")
        for _ in range(depth - 2):
            sw.begin_node("a")
        for _ in range(depth - 1):
            sw.end_node()
    sw.end_node()
    f = sw.as_fdt()
    f.pack()
    return bytes(f.as_bytearray())


def suffix_names(length: int, count: int) -> bytes:
    """A valid FDT whose ``count`` properties are named by suffixes of one long name."""
    head = b"compatible\0instance\0"
    strings = head + b"a" * length + b"\0"

    def prop(nameoff: int, value: bytes) -> bytes:
        return struct.pack(">III", 3, len(value), nameoff) + value + bytes(-len(value) % 4)

    st = struct.pack(">II", 1, 0)
    st += prop(0, f"linux-kho,{COMPAT}".encode() + b"\0") + prop(11, identity.encode_instance(1))
    st += b"".join(prop(len(head) + i, b"") for i in range(count))
    st += struct.pack(">II", 2, 9)
    off_struct = 40 + 16
    total = off_struct + len(st) + len(strings)
    header = struct.pack(
        ">10I", 0xD00DFEED, total, off_struct, off_struct + len(st), 40, 17, 16, 0,
        len(strings), len(st),
    )  # fmt: skip
    blob = header + bytes(16) + st + strings
    assert libfdt.fdt_check_full(bytearray(blob), len(blob)) == 0
    return blob


def peak(read: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        with contextlib.suppress(FragmentError):
            read()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def validate(blob: bytes) -> None:
    validate_fragment(blob, compatible=COMPAT, instance=1, max_size=MIB)


def test_the_maximum_depth_is_accepted_one_more_is_refused() -> None:
    validate(nested(fdt.MAX_DEPTH))
    with pytest.raises(FragmentError, match=f"deeper than {fdt.MAX_DEPTH}"):
        validate(nested(fdt.MAX_DEPTH + 1))


def test_the_builder_refuses_what_the_reader_refuses() -> None:
    b = fragment.start_storage(COMPAT, 1)
    for _ in range(fdt.MAX_DEPTH - 1):
        b.begin_node("a")
    with pytest.raises(FragmentError, match="deeper"):
        b.begin_node("a")
    validate(b.finish_storage())
    with pytest.raises(FragmentError, match="longer"):
        fragment.start_storage(COMPAT, 1).begin_node("n" * (fdt.MAX_NAME_LEN + 1))
    with pytest.raises(FragmentError, match="longer"):
        fragment.start_storage(COMPAT, 1).property_u32("p" * (fdt.MAX_NAME_LEN + 1), 1)
    b = fragment.start_storage(COMPAT, 1)
    b.property_u32("p" * fdt.MAX_NAME_LEN, 1)
    b.begin_node("n" * fdt.MAX_NAME_LEN)
    validate(b.finish_storage())


@pytest.mark.parametrize("depth", [8_000, 80_000])
def test_a_deep_fragment_costs_memory_linear_in_its_size(depth: int) -> None:
    blob = nested(depth)
    assert len(blob) <= MIB
    used = peak(lambda: validate(blob))
    assert used <= 4 * len(blob) + MIB, f"{used} bytes to read {len(blob)}"


def test_a_wide_legal_fragment_costs_memory_linear_in_its_size() -> None:
    blob = nested(fdt.MAX_DEPTH, siblings=1500)
    assert len(blob) <= MIB
    used = peak(lambda: validate(blob))
    # Every node becomes a few Python objects: a bounded factor, whatever the shape.
    assert used <= 64 * len(blob), f"{used} bytes to read {len(blob)}"


@pytest.mark.parametrize(("length", "count"), [(fdt.MAX_NAME_LEN + 1, 200), (100_000, 8_000)])
def test_names_pointing_into_one_long_string_are_refused_cheaply(length: int, count: int) -> None:
    blob = suffix_names(length, count)
    with pytest.raises(FragmentError, match=f"longer than {fdt.MAX_NAME_LEN}"):
        validate(blob)
    used = peak(lambda: validate(blob))
    assert used <= 4 * len(blob) + MIB, f"{used} bytes to read {len(blob)}"


def test_the_longest_name_is_read() -> None:
    validate(suffix_names(fdt.MAX_NAME_LEN, 1))
