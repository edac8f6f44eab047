"""khod_wire.fdt: the fragment builder, instance encoding, checks, reader and dts decoder."""

from __future__ import annotations

import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import libfdt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from khod_wire import dts, fdt, fragment, identity
from khod_wire.errors import FragmentError, RegistrationError


def sample_fragment() -> bytes:
    b = fragment.start_storage("cloud-hypervisor,vm-v1", 3)
    b.property_string("name-str", "hello world")
    b.property_strings("list", ["a", "bc", "def"])
    b.property_u32("u32", 0x01020304)
    b.property_u64("u64", 0x0102030405060708)
    b.property_u64_native("n64", 0x0102030405060708)
    b.property_bytes("raw", b"\x01\x02\x03")
    b.property_bytes("flag", b"")
    with b.node("queues"):
        b.property_u32("count", 2)
        with b.node("queue@0"):
            b.property_u64("base", 0x1000)
        with b.node("queue@1"):
            b.property_u64("base", 0x2000)
    with b.node("memfd"):
        b.property_string("token", "abc")
    return b.finish_storage()


def node_paths(root: fdt.Node) -> list[str]:
    """Every node's path, root first, in document order."""
    return [root.path] + [p for child in root.children for p in node_paths(child)]


def raw_fdt(props: list[tuple[str, bytes]], nodes: Sequence[str] = (), late: str = "") -> bytes:
    """An FDT written with bare libfdt, without any of khod's rules."""
    sw = libfdt.FdtSw()
    sw.finish_reservemap()
    sw.begin_node("")
    for name, value in props:
        sw.property(name, value)
    for name in nodes:
        sw.begin_node(name)
        sw.end_node()
    if late:
        sw.property(late, b"late\0")
    sw.end_node()
    f = sw.as_fdt()
    f.pack()
    return bytes(f.as_bytearray())


def dtc(blob: bytes, tmp_path: Path, name: str = "blob.dtb") -> str:
    path = tmp_path / name
    path.write_bytes(blob)
    out = subprocess.run(
        ["dtc", "-I", "dtb", "-O", "dts", str(path)], capture_output=True, text=True, check=True
    )
    subprocess.run(["fdtdump", str(path)], capture_output=True, check=True)
    return out.stdout


# -- builder -----------------------------------------------------------------


def test_builder_round_trip_every_property_kind() -> None:
    blob = sample_fragment()
    fdt.check_blob(blob)
    root = fdt.read_tree(blob)
    assert root.path == "/"
    assert root.get("compatible") == b"linux-kho,cloud-hypervisor,vm-v1\0"
    assert root.get("instance") == b"\0\0\0\3"
    assert root.get("name-str") == b"hello world\0"
    assert root.get("list") == b"a\0bc\0def\0"
    assert root.get("raw") == b"\x01\x02\x03"
    assert root.get("flag") == b""
    assert root.get("missing") is None
    assert [p for p, _ in root.properties][:2] == ["compatible", "instance"]
    paths = node_paths(fdt.read_tree(blob))
    assert paths == ["/", "/queues", "/queues/queue@0", "/queues/queue@1", "/memfd"]
    queue1 = root.children[0].children[1]
    assert queue1.name == "queue@1"
    assert queue1.get("base") == struct.pack(">Q", 0x2000)


def test_integer_endianness_at_byte_level() -> None:
    root = fdt.read_tree(sample_fragment())
    assert root.get("u32") == bytes([1, 2, 3, 4])
    assert root.get("u64") == bytes([1, 2, 3, 4, 5, 6, 7, 8])
    native = bytes([8, 7, 6, 5, 4, 3, 2, 1]) if sys.byteorder == "little" else bytes(range(1, 9))
    assert root.get("n64") == native
    assert fdt.native_u64(0x0102030405060708) == native
    assert fdt.read_native_u64(native) == 0x0102030405060708


def test_minimal_fragment_and_string_instance() -> None:
    blob = fragment.start_storage("x,y", "vm-7").finish_storage()
    root = fdt.read_tree(blob)
    assert root.properties == (("compatible", b"linux-kho,x,y\0"), ("instance", b"vm-7\0"))
    assert root.children == ()
    assert fdt.read_header(blob).totalsize == len(blob)  # packed: no slack


def test_buffer_grows_beyond_size_hint() -> None:
    b = fragment.start_storage("big,v1", 1, size_hint=16)
    b.property_bytes("blob", bytes(range(256)) * 400)  # 100 KiB in one value
    for i in range(300):
        with b.node(f"n{i}"):
            b.property_u32("i", i)
    blob = b.finish_storage()
    fdt.check_blob(blob)
    root = fdt.read_tree(blob)
    assert root.get("blob") == bytes(range(256)) * 400
    assert [c.get("i") for c in root.children] == [struct.pack(">I", i) for i in range(300)]


def test_finish_closes_open_nodes_and_is_final() -> None:
    b = fragment.start_storage("x,y", 1)
    b.begin_node("a")
    b.begin_node("b")
    blob = b.finish_storage()
    assert node_paths(fdt.read_tree(blob)) == ["/", "/a", "/a/b"]
    for later in (
        b.finish_storage,
        lambda: b.property_u32("x", 1),
        lambda: b.begin_node("c"),
        b.end_node,
    ):
        with pytest.raises(FragmentError, match="already finished"):
            later()


@pytest.mark.parametrize("name", ["compatible", "instance"])
def test_root_compatible_and_instance_only_once(name: str) -> None:
    b = fragment.start_storage("x,y", 1)
    with pytest.raises(FragmentError, match="start_storage"):
        b.property_string(name, "again")
    with b.node("child"):
        b.property_string(name, "fine in a subnode")
    fdt.check_blob(b.finish_storage())


def test_builder_refuses_duplicates_and_late_properties() -> None:
    b = fragment.start_storage("x,y", 1)
    b.property_u32("a", 1)
    with pytest.raises(FragmentError, match="duplicate property 'a' in /"):
        b.property_u32("a", 2)
    with b.node("n"):
        pass
    with pytest.raises(FragmentError, match="duplicate node 'n' under /"):
        b.begin_node("n")
    with pytest.raises(FragmentError, match="after a subnode"):
        b.property_u32("late", 1)
    with pytest.raises(FragmentError, match="without a matching begin_node"):
        b.end_node()


@pytest.mark.parametrize("name", ["", "a#b", "a b", "a@1@2", "@1", "é", "a/b"])
def test_builder_refuses_bad_node_names(name: str) -> None:
    with pytest.raises(FragmentError, match="bad node name"):
        fragment.start_storage("x,y", 1).begin_node(name)


@pytest.mark.parametrize("name", ["", "a b", "a@b", "x\0y", "é"])
def test_builder_refuses_bad_property_names(name: str) -> None:
    with pytest.raises(FragmentError, match="bad property name"):
        fragment.start_storage("x,y", 1).property_u32(name, 1)


@pytest.mark.parametrize("name", ["name", "phandle", "linux,phandle"])
def test_builder_refuses_reserved_property_names(name: str) -> None:
    with pytest.raises(FragmentError, match="reserved"):
        fragment.start_storage("x,y", 1).property_u32(name, 1)


def test_builder_refuses_bad_values() -> None:
    b = fragment.start_storage("x,y", 1)
    for bad in (-1, 1 << 32, True, 1.0):
        with pytest.raises(FragmentError, match="not a u32"):
            b.property_u32("v", bad)  # type: ignore[arg-type]
    with pytest.raises(FragmentError, match="not a u64"):
        b.property_u64("v", 1 << 64)
    with pytest.raises(FragmentError, match="not a u64"):
        b.property_u64_native("v", -1)
    with pytest.raises(FragmentError, match="NUL"):
        b.property_string("s", "a\0b")
    with pytest.raises(TypeError, match="not a str"):
        b.property_strings("s", "abc")
    b.property_u64("v", (1 << 64) - 1)  # the failed writes left nothing behind
    fdt.check_blob(b.finish_storage())


@pytest.mark.parametrize("compatible", ["", "a b", "linux-kho,x", "é", "a\0b"])
def test_start_storage_refuses_bad_compatible(compatible: str) -> None:
    # The same rule, and the same error, as a participant's registration.
    with pytest.raises(RegistrationError, match="compatible"):
        fragment.start_storage(compatible, 1)


# -- instance ----------------------------------------------------------------


def test_instance_encoding_examples() -> None:
    assert identity.encode_instance(3) == b"\0\0\0\3"
    assert identity.encode_instance(0xFFFFFFFF) == b"\xff\xff\xff\xff"
    assert identity.encode_instance("vm3") == b"vm3\0"
    assert identity.decode_instance(b"\0\0\0\3") == 3
    assert identity.decode_instance(b"abc\0") == "abc"
    assert identity.decode_instance(b"a\0") == "a"
    assert identity.decode_instance(b"\x20\x20\x1f\x00") == 0x20201F00  # not printable: an int


@pytest.mark.parametrize(
    "bad", [-1, 1 << 32, True, 1.5, None, "", "a" * 65, "a\0b", "é", "tab\there", 0x61626300]
)
def test_encode_instance_refuses(bad: object) -> None:
    with pytest.raises(ValueError):
        identity.encode_instance(bad)  # type: ignore[arg-type]


def test_ambiguous_integer_names_its_string() -> None:
    with pytest.raises(ValueError, match="'abc'"):
        identity.encode_instance(0x61626300)


@pytest.mark.parametrize("raw", [b"", b"\0", b"\x01\x02", b"ab", b"a\0\0", b"\xff" * 5])
def test_decode_instance_refuses(raw: bytes) -> None:
    with pytest.raises(FragmentError, match="neither"):
        identity.decode_instance(raw)


instances = st.one_of(
    st.integers(0, 0xFFFFFFFF).filter(
        lambda i: not identity._instance_string(struct.pack(">I", i))
    ),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=64),
)


@settings(max_examples=200, deadline=None)
@given(instances)
def test_instance_round_trip(instance: int | str) -> None:
    decoded = identity.decode_instance(identity.encode_instance(instance))
    assert decoded == instance
    assert type(decoded) is type(instance)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=70))
def test_instance_decoding_is_a_bijection(raw: bytes) -> None:
    try:
        value = identity.decode_instance(raw)
    except FragmentError:
        return
    assert identity.encode_instance(value) == raw


def test_every_small_integer_is_an_instance() -> None:
    for i in (0, 1, 255, 0x20201FFF, 0x20202000 - 1):
        assert identity.decode_instance(identity.encode_instance(i)) == i


# -- check_blob --------------------------------------------------------------


def patched(blob: bytes, offset: int, value: bytes) -> bytes:
    return blob[:offset] + value + blob[offset + len(value) :]


def test_check_blob_refusals() -> None:
    blob = sample_fragment()
    h = fdt.read_header(blob)
    cases = {
        "too short for an FDT: 39 bytes": blob[:39],
        "bad magic 0xdeadbeef": patched(blob, 0, b"\xde\xad\xbe\xef"),
        "FDT version 16, expected 17": patched(blob, 20, struct.pack(">I", 16)),
        "truncated: the header says": blob[:-1],
        "4 stray bytes after the FDT": blob + b"\0" * 4,
        # The first tag of the structure block must be FDT_BEGIN_NODE.
        "libfdt full check failed: FDT_ERR_": patched(blob, h.off_dt_struct, b"\0\0\0\x0f"),
    }
    for message, bad in cases.items():
        with pytest.raises(FragmentError, match=message):
            fdt.check_blob(bad)
        with pytest.raises(FragmentError):
            fdt.read_tree(bad)


def test_full_check_failure_in_the_middle_of_the_struct_block() -> None:
    blob = sample_fragment()
    h = fdt.read_header(blob)
    end = h.off_dt_struct + h.size_dt_struct
    bad = patched(blob, end - 4, b"\0\0\0\x02")  # FDT_END becomes a stray FDT_END_NODE
    with pytest.raises(FragmentError, match="libfdt full check failed"):
        fdt.check_blob(bad)


# -- what libfdt's full check lets through, and khod's checks catch ----------


def test_full_check_accepts_duplicates_check_tree_refuses() -> None:
    dup_prop = raw_fdt([("a", b"1\0"), ("a", b"2\0")])
    dup_node = raw_fdt([], ["n", "n"])
    for blob in (dup_prop, dup_node):
        assert libfdt.fdt_check_full(bytearray(blob), len(blob)) == 0
        fdt.check_blob(blob)
    with pytest.raises(FragmentError, match="duplicate property 'a' in /"):
        fdt.check_tree(fdt.read_tree(dup_prop))
    with pytest.raises(FragmentError, match="duplicate node 'n' under /"):
        fdt.check_tree(fdt.read_tree(dup_node))


def test_property_after_subnode_is_refused_by_the_reader() -> None:
    blob = raw_fdt([("a", b"1\0")], ["n"], late="late")
    assert libfdt.fdt_check_full(bytearray(blob), len(blob)) == 0
    # libfdt's own lookup cannot see it: that is why it is refused.
    assert libfdt.FdtRo(blob).getprop(0, "late", libfdt.QUIET_NOTFOUND) == -libfdt.NOTFOUND
    with pytest.raises(FragmentError, match="'late' in / follows a subnode"):
        fdt.read_tree(blob)


def test_check_tree_refuses_names_dtc_refuses() -> None:
    for blob, message in (
        (raw_fdt([("a b", b"")]), "bad property name 'a b'"),
        (raw_fdt([], ["a#b"]), "bad node name 'a#b'"),
        (raw_fdt([("phandle", b"\1")]), "reserved"),
        (raw_fdt([], ["é"]), r"bad node name 'Ã©'"),  # UTF-8 bytes read as latin-1
    ):
        with pytest.raises(FragmentError, match=message):
            fdt.check_tree(fdt.read_tree(blob))


# -- to_dts and the real tools -----------------------------------------------


def test_fragment_passes_dtc_and_fdtdump(tmp_path: Path) -> None:
    out = dtc(sample_fragment(), tmp_path)
    assert 'compatible = "linux-kho,cloud-hypervisor,vm-v1";' in out
    assert "instance = <0x03>;" in out
    for node in ("queues {", "queue@0 {", "queue@1 {", "memfd {"):
        assert node in out
    string_instance = fragment.start_storage("x,y", "vm-7").finish_storage()
    assert 'instance = "vm-7";' in dtc(string_instance, tmp_path)


def test_to_dts_matches_dtc(tmp_path: Path) -> None:
    blob = sample_fragment()
    text = dts.to_dts(blob)
    # dtc 1.6 shows a string list from a dtb as one string with \0 inside; khod
    # shows it the way people write it. Everything else is byte-identical.
    assert 'list = "a", "bc", "def";' in text
    assert text.replace('"a", "bc", "def"', '"a\\0bc\\0def"') == dtc(blob, tmp_path)
    assert "raw = [01 02 03];" in text
    assert "flag;" in text
    assert "u64 = <0x1020304 0x5060708>;" in text


def test_to_dts_escapes_and_memreserve() -> None:
    sw = libfdt.FdtSw()
    sw.add_reservemap_entry(0x1000, 0x2000)
    sw.finish_reservemap()
    sw.begin_node("")
    sw.property("q", b'say "hi" \\ bye\0')
    sw.begin_node("\u00e9")
    sw.end_node()
    sw.end_node()
    f = sw.as_fdt()
    f.pack()
    text = dts.to_dts(bytes(f.as_bytearray()))
    assert "/memreserve/ 0x0000000000001000 0x0000000000002000;" in text
    assert r'q = "say \"hi\" \\ bye";' in text
    assert r"\xc3\xa9 {" in text


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.text("abcdefghij,._+*#?-", min_size=1, max_size=8).filter(
            lambda n: n not in ("compatible", "instance")
        ),
        st.binary(max_size=40),
        max_size=8,
    )
)
def test_builder_round_trips_arbitrary_properties(props: dict[str, bytes]) -> None:
    b = fragment.start_storage("x,y", 1, size_hint=64)
    for name, value in props.items():
        b.property_bytes(name, value)
    blob = b.finish_storage()
    root = fdt.read_tree(blob)
    fdt.check_tree(root)
    assert dict(root.properties[2:]) == props
    assert dts.to_dts(blob).startswith("/dts-v1/;")


def test_libfdt_failures_become_fragment_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    # Raised by pylibfdt: no caller of the writer ever sees an FdtException.
    def refuse(self: libfdt.FdtSw, name: str) -> None:
        raise libfdt.FdtException(-libfdt.BADSTATE)

    blob = fragment.start_storage("x,y", 1).finish_storage()
    w = fdt.FdtWriter()
    w.begin_node("")
    monkeypatch.setattr(libfdt.FdtSw, "begin_node", refuse)
    with pytest.raises(FragmentError, match=r"^libfdt begin_node failed: FDT_ERR_BADSTATE$"):
        w.begin_node("a")
    # Returned as a negative code: the same translation.
    monkeypatch.setattr(libfdt, "fdt_num_mem_rsv", lambda data: -libfdt.TRUNCATED)
    with pytest.raises(FragmentError, match=r"^libfdt memreserve count failed: FDT_ERR_TRUNCATED$"):
        dts.to_dts(blob)
