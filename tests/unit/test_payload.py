"""khod.payload: assembly, read-back, and every corruption refused with its place."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import subprocess
from pathlib import Path
from typing import Any

import libfdt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from khod.payload import PayloadImage
from khod.payload_layout import PayloadEntry, layout
from khod_wire import dts, fdt, identity
from khod_wire.errors import PayloadError
from khod_wire.fragment import start_storage, validate_fragment

HID = "2b1f6a8e-8f53-4c1e-9d0a-5f1c2e3d4b5a"
PAGE = 4096


def instance_of(i: int) -> int | str:
    return i if i % 2 else f"vm-{i}"


def fragment(compatible: str, instance: int | str, filler: int = 100) -> bytes:
    b = start_storage(compatible, instance)
    b.property_bytes("state", bytes([len(str(instance))]) * filler)
    with b.node("memfd"):
        b.property_u32("token", 7)
    return b.finish_storage()


def entry(
    name: str, compatible: str, instance: int | str, blob: bytes | None = None
) -> PayloadEntry:
    blob = fragment(compatible, instance) if blob is None else blob
    return PayloadEntry(name, compatible, instance, blob, hashlib.sha256(blob).digest())


def entries(n: int) -> list[PayloadEntry]:
    return [entry(f"vm-{i}", "cloud-hypervisor,vm-v1", instance_of(i)) for i in range(n)]


def root_of(image: bytes) -> bytes:
    return image[: fdt.read_header(image).totalsize]


def links(image: bytes) -> dict[str, fdt.Node]:
    return {n.name: n for n in fdt.read_tree(root_of(image)).children}


# -- round trip --------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 50])
def test_round_trip(n: int) -> None:
    given_entries = entries(n)
    image = layout(HID, given_entries).image
    parsed = PayloadImage.parse(image)
    assert parsed.handover_id == HID
    assert parsed.base == 0
    assert parsed.size == len(image)
    assert [(r.name, r.compatible, r.instance) for r in parsed.entries] == [
        (e.name, e.compatible, e.instance) for e in given_entries
    ]
    for e, ref in zip(given_entries, parsed.entries, strict=True):
        assert ref.size == len(e.blob)
        assert ref.sha256 == e.sha256
        assert parsed.retrieve(e.name) == e.blob
    if n == 0:
        assert image == root_of(image)


def test_deterministic_and_ordered() -> None:
    es = entries(5)
    assert layout(HID, es).image == layout(HID, list(es)).image
    reordered = layout(HID, es[::-1]).image
    assert reordered != layout(HID, es).image
    assert [r.name for r in PayloadImage.parse(reordered).entries] == [e.name for e in es[::-1]]


@pytest.mark.parametrize(("base", "page"), [(0, 4096), (0x1_0000_0000, 4096), (0x20000, 65536)])
def test_alignment_and_native_endian_links(base: int, page: int) -> None:
    es = entries(4)
    image = layout(HID, es, base=base, page_size=page).image
    parsed = PayloadImage.parse(image, base=base, page_size=page)
    root_size = fdt.read_header(image).totalsize
    offsets = [r.offset for r in parsed.entries]
    assert offsets[0] == -(-root_size // page) * page
    assert all(o % page == 0 for o in offsets)
    assert offsets == sorted(offsets)
    assert len(image) == offsets[-1] + len(es[-1].blob)
    for e, o in zip(es, offsets, strict=True):
        node = links(image)[e.name]
        assert node.get("preserved-data") == struct.pack("=Q", base + o)
        assert node.get("blob-size") == struct.pack("=Q", len(e.blob))
        assert node.get("sha256") == e.sha256
        assert image[o : o + len(e.blob)] == e.blob
    gaps = [(root_size, offsets[0])] + [
        (o + len(e.blob), nxt) for e, o, nxt in zip(es, offsets, offsets[1:], strict=False)
    ]
    assert all(image[a:b] == bytes(b - a) for a, b in gaps)
    with pytest.raises(PayloadError):  # read with the wrong base
        PayloadImage.parse(image, base=base + page, page_size=page)


def test_retrieve_misses() -> None:
    parsed = PayloadImage.parse(layout(HID, [entry("a", "x,y", 3), entry("b", "x,y", "3")]).image)
    # An integer instance and its decimal string are two participants, not one.
    keys = [(r.compatible, r.instance, type(r.instance)) for r in parsed.entries]
    assert keys == [("x,y", 3, int), ("x,y", "3", str)]
    assert parsed.retrieve("a") != parsed.retrieve("b")
    for name in ("c", "", "A", "linux-kho,x,y"):
        with pytest.raises(PayloadError, match="no fragment for"):
            parsed.retrieve(name)


def test_manifest_and_from_file(tmp_path: Path) -> None:
    es = entries(3)
    image = layout(HID, es).image
    path = tmp_path / "payload.kho"
    path.write_bytes(image)
    parsed = PayloadImage.from_file(path)
    m = parsed.manifest()
    assert m["format"] == "khod-v1"
    assert m["handover_id"] == HID
    assert m["size"] == len(image)
    assert m["sha256"] == hashlib.sha256(image).hexdigest()
    assert m["participants"][1] == {
        "name": "vm-1",
        "compatible": "cloud-hypervisor,vm-v1",
        "instance": 1,
        "offset": parsed.entries[1].offset,
        "size": len(es[1].blob),
        "sha256": es[1].sha256.hex(),
        "restore_after": [],
    }
    with pytest.raises(OSError):
        PayloadImage.from_file(tmp_path / "missing.kho")


def test_commit_manifest_describes_participants_as_the_reader_does() -> None:
    es = entries(3)
    es[2] = dataclasses.replace(es[2], restore_after=("vm-0",))
    done = layout(HID, es, base=0x10000)
    written = done.manifest(HID, es, base=0x10000)
    read = PayloadImage.parse(done.image, base=0x10000).manifest()
    assert written["participants"] == read["participants"]
    assert written["root_sha256"] == hashlib.sha256(done.image[: done.root_size]).hexdigest()
    assert {k: written[k] for k in ("format", "handover_id", "base", "page_size", "size")} == {
        k: read[k] for k in ("format", "handover_id", "base", "page_size", "size")
    }


def test_restore_order_travels_in_the_image() -> None:
    es = entries(3)
    es[2] = dataclasses.replace(es[2], restore_after=("vm-0", "vm-1"))
    image = layout(HID, es).image
    parsed = PayloadImage.parse(image)
    assert [r.restore_after for r in parsed.entries] == [(), (), ("vm-0", "vm-1")]
    assert parsed.manifest()["participants"][2]["restore_after"] == ["vm-0", "vm-1"]
    assert links(image)["vm-2"].get("restore-after") == b"vm-0\0vm-1\0"
    assert links(image)["vm-0"].get("restore-after") is None
    assert 'restore-after = "vm-0", "vm-1";' in dts.to_dts(root_of(image))


def libfdt_root(handover_id: str, es: list[PayloadEntry], offsets: list[int]) -> bytes:
    """The root as libfdt's sequential writer writes it: the reference for khod's own."""
    w = fdt.FdtWriter()
    w.begin_node("")
    w.property("compatible", b"khod-v1\0")
    w.property("handover-id", handover_id.encode() + b"\0")
    for e, off in zip(es, offsets, strict=True):
        w.begin_node(e.name)
        w.property("compatible", (identity.KHO_COMPATIBLE_PREFIX + e.compatible).encode() + b"\0")
        w.property("instance", identity.encode_instance(e.instance))
        w.property("preserved-data", fdt.native_u64(off))
        w.property("blob-size", fdt.native_u64(len(e.blob)))
        w.property("sha256", e.sha256)
        if e.restore_after:
            w.property("restore-after", b"".join(n.encode() + b"\0" for n in e.restore_after))
        w.end_node()
    return w.finish()


@pytest.mark.parametrize("n", [0, 1, 7])
@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("base", [0, 0x1_0000_0000])
def test_the_root_is_byte_for_byte_what_libfdt_writes(n: int, ordered: bool, base: int) -> None:
    # khod writes the root itself (it is built inside the blackout); libfdt's
    # sequential writer is the reference, strings block and padding included.
    es = entries(n)
    if ordered and n > 1:
        es[n // 2] = dataclasses.replace(es[n // 2], restore_after=("vm-0",))
        es[-1] = dataclasses.replace(es[-1], restore_after=("vm-0", f"vm-{n // 2}"))
    es = [dataclasses.replace(e, name=e.name + "x" * i) for i, e in enumerate(es)]  # every padding
    done = layout(HID, es, base=base)
    root = done.image[: done.root_size]
    assert root == libfdt_root(HID, es, [base + off for off in done.offsets])
    assert libfdt.fdt_check_full(bytearray(root), len(root)) == 0


@pytest.mark.parametrize("bad", ["vm-0", ("",), ("a\0b",), ("é",)])
def test_assemble_refuses_bad_restore_order(bad: Any) -> None:
    e = entry("a", "x,y", 1)
    with pytest.raises(PayloadError, match="participant 'a': restore_after"):
        layout(HID, [PayloadEntry(e.name, e.compatible, e.instance, e.blob, e.sha256, bad)])


def test_assembly_only_links() -> None:
    # Not an FDT at all: assembly must not look inside, the reader must refuse it.
    junk = b"not an fdt" * 10
    image = layout(HID, [entry("a", "x,y", 1), entry("junk", "x,y", 2, junk)]).image
    assert junk in image
    with pytest.raises(PayloadError, match=r"participant 'junk' at offset 0x2000: bad magic"):
        PayloadImage.parse(image)


def test_assemble_refusals() -> None:
    a = entry("a", "x,y", 1)
    cases: list[tuple[list[PayloadEntry], str]] = [
        ([a, entry("a", "x,y", 2)], "duplicate participant name 'a'"),
        ([a, entry("b", "x,y", 1)], "participant 'b': another participant has the same"),
        ([entry("a b", "x,y", 1)], "participant 'a b': bad node name"),
        ([entry("c", "linux-kho,x", 1, a.blob)], "without the 'linux-kho,' prefix"),
        ([PayloadEntry("d", "x,y", 1, a.blob, b"short")], "sha256 is 5 bytes"),
        ([PayloadEntry("e", "x,y", 1, b"", a.sha256)], "empty fragment"),
        ([PayloadEntry("f", "x,y", -1, a.blob, a.sha256)], "u32 range"),
    ]
    for es, message in cases:
        with pytest.raises(PayloadError, match=message):
            layout(HID, es)
    for hid in ("", "a\0b", "é", "x" * 129):
        with pytest.raises(PayloadError, match="handover id"):
            layout(hid, [a])
    with pytest.raises(ValueError, match="page_size"):
        layout(HID, [a], page_size=3000)
    with pytest.raises(ValueError, match="base"):
        layout(HID, [a], base=0x1001)


def test_root_and_fragments_pass_dtc_and_fdtdump(tmp_path: Path) -> None:
    es = entries(3)
    image = layout(HID, es).image
    parsed = PayloadImage.parse(image)
    blobs = {"root": root_of(image)} | {r.name: image[r.offset : r.offset + r.size]
                                         for r in parsed.entries}  # fmt: skip
    out = {}
    for name, blob in blobs.items():
        path = tmp_path / f"{name}.dtb"
        path.write_bytes(blob)
        out[name] = subprocess.run(["dtc", "-I", "dtb", "-O", "dts", str(path)],
                                   capture_output=True, text=True, check=True).stdout  # fmt: skip
        subprocess.run(["fdtdump", str(path)], capture_output=True, check=True)
        assert out[name] == dts.to_dts(blob)
    assert 'compatible = "khod-v1";' in out["root"]
    assert f'handover-id = "{HID}";' in out["root"]
    for e in es:
        assert f"\t{e.name} {{" in out["root"]
        assert 'compatible = "linux-kho,cloud-hypervisor,vm-v1";' in out[e.name]
    assert 'instance = "vm-0";' in out["vm-0"]
    assert "instance = <0x01>;" in out["vm-1"]


# -- corruptions -------------------------------------------------------------

FRAGS = [fragment("x,y", i) for i in range(3)]


def craft(
    link_props: list[list[tuple[str, bytes]]],
    layout: list[tuple[int, bytes]],
    *,
    root_props: list[tuple[str, bytes]] | None = None,
    size: int | None = None,
) -> bytes:
    """An image put together by hand: a root with these link nodes, blobs at these offsets."""
    sw = libfdt.FdtSw()
    sw.finish_reservemap()
    sw.begin_node("")
    for name, value in [("compatible", b"khod-v1\0"), ("handover-id", HID.encode() + b"\0")] \
            if root_props is None else root_props:  # fmt: skip
        sw.property(name, value)
    for i, props in enumerate(link_props):
        sw.begin_node(f"p{i}")
        for name, value in props:
            sw.property(name, value)
        sw.end_node()
    sw.end_node()
    f = sw.as_fdt()
    f.pack()
    image = bytearray(f.as_bytearray())
    for offset, blob in layout:
        image.extend(bytes(max(0, offset + len(blob) - len(image))))
        image[offset : offset + len(blob)] = blob
    if size is not None:
        image.extend(bytes(size - len(image)))
    return bytes(image)


def link(i: int, offset: int, **override: bytes | None) -> list[tuple[str, bytes]]:
    blob = FRAGS[i]
    props: dict[str, bytes | None] = {
        "compatible": b"linux-kho,x,y\0",
        "instance": identity.encode_instance(i),
        "preserved-data": struct.pack("=Q", offset),
        "blob-size": struct.pack("=Q", len(blob)),
        "sha256": hashlib.sha256(blob).digest(),
    }
    props.update(override)
    return [(k, v) for k, v in props.items() if v is not None]


def good_layout() -> tuple[list[list[tuple[str, bytes]]], list[tuple[int, bytes]]]:
    return [link(i, PAGE * (i + 1)) for i in range(3)], [
        (PAGE * (i + 1), FRAGS[i]) for i in range(3)
    ]


def refused(image: bytes, message: str) -> str:
    with pytest.raises(PayloadError, match=message) as info:
        PayloadImage.parse(image)
    return str(info.value)


def test_crafted_good_image_parses() -> None:
    links_, layout = good_layout()
    assert [r.name for r in PayloadImage.parse(craft(links_, layout)).entries] == ["p0", "p1", "p2"]
    # Unknown link properties are tolerated: a newer khod may add some.
    links_[0].append(("x-future", b"\1"))
    assert PayloadImage.parse(craft(links_, layout)).entries[0].name == "p0"


def test_flipped_byte_in_a_fragment() -> None:
    image = bytearray(layout(HID, entries(3)).image)
    ref = PayloadImage.parse(bytes(image)).entries[1]
    image[ref.offset + ref.size - 5] ^= 0x40
    refused(bytes(image), r"participant 'vm-1' at offset 0x2000: sha256 mismatch")


def test_truncated_image() -> None:
    image = layout(HID, entries(3)).image
    refused(image[:-1], r"participant 'vm-2' at offset 0x3000: .* past the end of the image")
    refused(image[:100], r"root FDT: truncated image: 100 bytes, the root alone is")
    refused(image[:20], "root FDT: too short for an FDT: 20 bytes")
    refused(b"", "root FDT: too short")


def test_offset_out_of_bounds() -> None:
    links_, layout = good_layout()
    links_[2] = link(2, 64 * PAGE)
    refused(craft(links_, layout), r"participant 'p2' at offset 0x40000: .* past the end")


def test_blob_size_out_of_bounds() -> None:
    links_, layout = good_layout()
    links_[2] = link(2, 3 * PAGE, **{"blob-size": struct.pack("=Q", 1 << 40)})
    refused(craft(links_, layout), r"participant 'p2' at offset 0x3000: .* past the end")


def test_misaligned_offset() -> None:
    links_, layout = good_layout()
    links_[1] = link(1, 2 * PAGE + 8)
    layout[1] = (2 * PAGE + 8, FRAGS[1])
    refused(craft(links_, layout), r"participant 'p1' at offset 0x2008: not aligned")


def test_below_base() -> None:
    links_, layout = good_layout()
    image = craft(links_, layout)
    with pytest.raises(PayloadError, match=r"participant 'p0': preserved-data 0x1000 is below"):
        PayloadImage.parse(image, base=0x100000)


def test_overlapping_fragments() -> None:
    links_, layout = good_layout()
    links_[2] = link(2, 2 * PAGE)  # p2 claims p1's page
    msg = refused(craft(links_, layout), r"at offset 0x2000: overlaps participant 'p[12]'")
    assert "'p1'" in msg and "'p2'" in msg


def test_fragment_overlapping_the_root() -> None:
    links_, layout = good_layout()
    links_[0] = link(0, 0)
    refused(craft(links_, layout), r"participant 'p0' at offset 0x0: overlaps the root FDT")


def test_wrong_root_compatible_or_handover_id() -> None:
    links_, layout = good_layout()
    kho = [("compatible", b"kho-v1\0"), ("handover-id", b"x\0")]
    refused(craft(links_, layout, root_props=kho), r"root FDT: compatible is b'kho-v1\\x00'")
    no_id = [("compatible", b"khod-v1\0")]
    refused(craft(links_, layout, root_props=no_id), "root FDT: handover-id is missing")
    bad_id = [*no_id, ("handover-id", b"\1\2\0")]
    refused(craft(links_, layout, root_props=bad_id), "handover-id is missing or not printable")


@pytest.mark.parametrize(
    "prop", ["compatible", "instance", "preserved-data", "blob-size", "sha256"]
)
def test_missing_link_property(prop: str) -> None:
    links_, layout = good_layout()
    links_[1] = link(1, 2 * PAGE, **{prop: None})
    refused(craft(links_, layout), f"participant 'p1': missing property '{prop}'")


@pytest.mark.parametrize(
    ("prop", "value", "message"),
    [
        ("preserved-data", b"\0" * 4, "'preserved-data' is 4 bytes, expected 8"),
        ("blob-size", b"\0" * 16, "'blob-size' is 16 bytes, expected 8"),
        ("sha256", b"\0" * 20, "'sha256' is 20 bytes, expected 32"),
        ("compatible", b"x,y\0", "lacks the 'linux-kho,' prefix"),
        ("instance", b"\1\2", "neither a u32 cell nor a printable string"),
        ("restore-after", b"vm-0", "restore-after is not a list of printable names"),
        ("restore-after", b"a\0\0", "restore-after is not a list of printable names"),
    ],
)
def test_bad_link_property(prop: str, value: bytes, message: str) -> None:
    links_, layout = good_layout()
    links_[1] = link(1, 2 * PAGE, **{prop: value})
    refused(craft(links_, layout), f"participant 'p1': .*{message}")


def test_link_and_fragment_disagree() -> None:
    links_, layout = good_layout()
    links_[1] = link(1, 2 * PAGE, instance=identity.encode_instance(9))
    refused(craft(links_, layout), r"participant 'p1' at offset 0x2000: root instance is 1")
    links_, layout = good_layout()
    links_[1] = link(1, 2 * PAGE, compatible=b"linux-kho,x,z\0")
    refused(craft(links_, layout), r"participant 'p1' at offset 0x2000: root compatible")


def test_duplicate_compatible_and_instance_in_links() -> None:
    links_, layout = good_layout()
    links_[2] = link(2, 3 * PAGE, instance=identity.encode_instance(1))
    refused(craft(links_, layout), "participants 'p1' and 'p2' share compatible and instance")


def test_non_zero_padding_and_trailing_bytes() -> None:
    links_, layout = good_layout()
    refused(craft(links_, [*layout, (PAGE - 1, b"\1")]), "non-zero byte at offset 0xfff")
    refused(craft(links_, [*layout, (5 * PAGE, b"\1")]), "bytes after participant")
    # The image ends with its last fragment (payload.md §2.1): zeros after it are refused too.
    refused(craft(links_, layout, size=6 * PAGE), "bytes after participant")
    image = craft(links_, layout)
    assert PayloadImage.parse(image).size == len(image)


def test_bad_parse_arguments() -> None:
    with pytest.raises(ValueError, match="page_size"):
        PayloadImage.parse(b"", page_size=0)


# -- hostile images ----------------------------------------------------------

IMAGE = layout(HID, entries(3)).image


def fragments_verify(parsed: PayloadImage) -> None:
    for ref in parsed.entries:
        blob = parsed.retrieve(ref.name)
        assert hashlib.sha256(blob).digest() == ref.sha256
        validate_fragment(blob, compatible=ref.compatible, instance=ref.instance,
                          max_size=len(blob))  # fmt: skip


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, len(IMAGE) - 1), st.integers(1, 255)), max_size=4),
    st.integers(0, len(IMAGE)),
)
def test_flips_and_truncations_never_escape_payload_error(
    flips: list[tuple[int, int]], keep: int
) -> None:
    image = bytearray(IMAGE)
    for at, mask in flips:
        image[at] ^= mask
    try:
        parsed = PayloadImage.parse(bytes(image[:keep]))
    except PayloadError:
        return
    fragments_verify(parsed)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, fdt.read_header(IMAGE).totalsize - 1), st.integers(1, 255))
def test_flips_in_the_root_never_escape_payload_error(at: int, mask: int) -> None:
    image = bytearray(IMAGE)
    image[at] ^= mask
    try:
        parsed = PayloadImage.parse(bytes(image))
    except PayloadError:
        return
    fragments_verify(parsed)


# -- link nodes built as the fragments arrive --------------------------------------


def test_nodes_built_before_the_blackout_are_joined_not_rebuilt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import khod.payload_layout as pl

    es = entries(6)
    es[3] = dataclasses.replace(es[3], restore_after=("vm-0",))
    cold = layout(HID, es, base=PAGE)
    rest = [e for e in es if not e.restore_after]
    cold_rest = layout(HID, rest).image
    cache = pl.Links()
    for e in es:
        cache.prepare(e)

    def rebuilt(*_: object) -> None:
        raise AssertionError("a node was built inside the blackout")

    monkeypatch.setattr(pl, "_node", rebuilt)
    warm = layout(HID, es, base=PAGE, links=cache)
    assert warm.image == cold.image
    # Without the participant that names a restore order, the other form of each node.
    assert layout(HID, rest, links=cache).image == cold_rest


def test_a_fragment_sent_again_gets_a_node_of_its_own() -> None:
    import khod.payload_layout as pl

    cache = pl.Links()
    first = entry("vm-1", "cloud-hypervisor,vm-v1", 1)
    cache.prepare(first)
    again = entry("vm-1", "cloud-hypervisor,vm-v1", 1, fragment("cloud-hypervisor,vm-v1", 1, 7))
    assert again.sha256 != first.sha256
    image = layout(HID, [again], links=cache).image
    assert image == layout(HID, [again]).image
    assert links(image)["vm-1"].get("sha256") == again.sha256


def test_links_are_bounded_and_a_bad_entry_is_refused_as_at_assembly() -> None:
    import khod.payload_layout as pl

    cache = pl.Links(limit=2)
    for i in range(5):
        cache.prepare(entry(f"vm-{i}", "cloud-hypervisor,vm-v1", i))
    assert len(cache) <= 2
    with pytest.raises(PayloadError, match="participant 'bad/name'"):
        cache.prepare(entry("bad/name", "cloud-hypervisor,vm-v1", 9))
