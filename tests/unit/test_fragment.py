"""khod_wire.fragment: every refusal reason, and hostile input never escapes FragmentError."""

from __future__ import annotations

import hashlib
import struct
import subprocess
import tempfile
from pathlib import Path

import libfdt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from khod_wire import dts, fdt
from khod_wire.errors import FragmentError, FragmentMismatch, FragmentTooLarge
from khod_wire.fragment import FragmentInfo, start_storage, validate_fragment

COMPATIBLE = "cloud-hypervisor,vm-v1"


def fragment(instance: int | str = 3, *, compatible: str = COMPATIBLE) -> bytes:
    b = start_storage(compatible, instance)
    b.property_string("state", "running")
    b.property_bytes("config", bytes(range(64)))
    with b.node("devices"):
        b.property_u32("count", 2)
        with b.node("net@0"):
            b.property_string("mac", "52:54:00:12:34:56")
        with b.node("blk@1"):
            b.property_u64("sectors", 1 << 30)
    return b.finish_storage()


def raw_fdt(props: list[tuple[str, bytes]], nodes: list[str] | None = None) -> bytes:
    """Written with bare libfdt, so that it can break khod's rules."""
    sw = libfdt.FdtSw()
    sw.finish_reservemap()
    sw.begin_node("")
    for name, value in props:
        sw.property(name, value)
    for name in nodes or []:
        sw.begin_node(name)
        sw.end_node()
    sw.end_node()
    f = sw.as_fdt()
    f.pack()
    return bytes(f.as_bytearray())


IDENTITY = [("compatible", f"linux-kho,{COMPATIBLE}\0".encode()), ("instance", b"\0\0\0\3")]


def validate(blob: object, **kw: object) -> FragmentInfo:
    args: dict[str, object] = {"compatible": COMPATIBLE, "instance": 3} | kw
    return validate_fragment(blob, **args)  # type: ignore[arg-type]


def test_valid_fragment() -> None:
    blob = fragment()
    info = validate(blob)
    assert info == FragmentInfo(size=len(blob), sha256=hashlib.sha256(blob).digest())
    assert info.sha256_hex == hashlib.sha256(blob).hexdigest()
    assert validate(bytearray(blob)) == info
    assert validate(memoryview(blob)) == info
    assert validate(fragment("vm-3"), instance="vm-3").size > 0


@pytest.mark.parametrize("bad", [None, "text", 42, [1, 2]])
def test_refuses_non_bytes(bad: object) -> None:
    with pytest.raises(FragmentError, match="a fragment is bytes"):
        validate(bad)


def test_size_limit_is_checked_before_parsing() -> None:
    with pytest.raises(FragmentTooLarge, match="4097 bytes, max_fragment_size is 4096"):
        validate(b"\xff" * 4097)
    blob = fragment()
    assert validate(blob, max_size=len(blob)).size == len(blob)
    with pytest.raises(FragmentTooLarge, match=f"{len(blob)} bytes, max_fragment_size is 100"):
        validate(blob, max_size=100)


def patched(blob: bytes, offset: int, value: bytes) -> bytes:
    return blob[:offset] + value + blob[offset + len(value) :]


def test_structural_refusals() -> None:
    blob = fragment()
    h = fdt.read_header(blob)
    cases = {
        "too short": b"",
        "bad magic": patched(blob, 0, b"\0\0\0\0"),
        "truncated": blob[:-8],
        "stray bytes": blob + b"\0" * 8,
        "FDT version 16, expected 17": patched(blob, 20, struct.pack(">I", 16)),
        "libfdt full check failed": patched(blob, h.off_dt_struct, b"\0\0\0\x03"),
    }
    for message, bad in cases.items():
        with pytest.raises(FragmentError, match=message) as info:
            validate(bad)
        assert type(info.value) is FragmentError


def test_wrong_compatible() -> None:
    with pytest.raises(FragmentMismatch) as info:
        validate(fragment(compatible="qemu,vm-v1"))
    assert str(info.value) == (
        "root compatible is 'linux-kho,qemu,vm-v1', expected 'linux-kho,cloud-hypervisor,vm-v1'"
    )
    with pytest.raises(FragmentMismatch, match="root compatible is missing"):
        validate(raw_fdt(IDENTITY[1:]))


def test_wrong_instance() -> None:
    with pytest.raises(FragmentMismatch, match=r"root instance is 4 \(integer\), expected 3"):
        validate(fragment(4))
    with pytest.raises(FragmentMismatch, match="root instance is missing"):
        validate(raw_fdt(IDENTITY[:1]))
    with pytest.raises(FragmentMismatch, match=r"is \[01 02\], expected 3"):
        validate(raw_fdt([*IDENTITY[:1], ("instance", b"\1\2")]))


def test_int_and_string_instances_never_match() -> None:
    with pytest.raises(
        FragmentMismatch, match=r"root instance is '3' \(string\), expected 3 \(integer\)"
    ):
        validate(fragment("3"), instance=3)
    with pytest.raises(FragmentMismatch, match=r"is 3 \(integer\), expected '3' \(string\)"):
        validate(fragment(3), instance="3")


def test_duplicate_property_passes_libfdt_but_not_khod() -> None:
    blob = raw_fdt([*IDENTITY, ("state", b"a\0"), ("state", b"b\0")])
    # libfdt's full check does not look for duplicate names: khod must.
    assert libfdt.fdt_check_full(bytearray(blob), len(blob)) == 0
    with pytest.raises(FragmentError, match="duplicate property 'state' in /") as info:
        validate(blob)
    assert type(info.value) is FragmentError


def test_duplicate_root_compatible_is_refused() -> None:
    with pytest.raises(FragmentError, match="duplicate property 'compatible'"):
        validate(raw_fdt([*IDENTITY, IDENTITY[0]]))


def test_duplicate_sibling_node() -> None:
    blob = raw_fdt(IDENTITY, ["dev@0", "dev@1", "dev@0"])
    assert libfdt.fdt_check_full(bytearray(blob), len(blob)) == 0
    with pytest.raises(FragmentError, match="duplicate node 'dev@0' under /"):
        validate(blob)


def test_bad_names_and_reserved_properties() -> None:
    for blob, message in (
        (raw_fdt([*IDENTITY, ("bad name", b"")]), "bad property name 'bad name'"),
        (raw_fdt(IDENTITY, ["bad#node"]), "bad node name 'bad#node'"),
        (raw_fdt([*IDENTITY, ("name", b"x\0")]), "'name' is reserved"),
    ):
        with pytest.raises(FragmentError, match=message):
            validate(blob)


def test_unencodable_registered_instance_is_a_mismatch_not_a_crash() -> None:
    # 0x61626300 is b"abc\0": it would read back as the string "abc".
    with pytest.raises(FragmentMismatch, match=r"registered instance cannot be matched.*'abc'"):
        validate(fragment("abc"), instance=0x61626300)
    with pytest.raises(FragmentMismatch, match="u32 range"):
        validate(fragment(), instance=-1)


# -- hostile input -----------------------------------------------------------

VALID = fragment()
SMALL = fragment("vm-1")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=5000))
def test_random_bytes_only_raise_fragment_errors(data: bytes) -> None:
    with pytest.raises(FragmentError):
        validate(data)


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    blob = bytearray(draw(st.sampled_from([VALID, SMALL])))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "word"]))
        at = draw(st.integers(0, len(blob)))
        if kind == "flip" and at < len(blob):
            blob[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and at < len(blob):
            blob[at] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del blob[at:]
        elif kind == "insert":
            blob[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del blob[at : at + draw(st.integers(1, 8))]
        elif kind == "word" and at + 4 <= len(blob):
            # Header fields and tags are big-endian words: hit them with small values.
            blob[at : at + 4] = struct.pack(">I", draw(st.integers(0, 0x200)))
    return bytes(blob)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations())
def test_mutations_are_refused_cleanly_or_stay_valid(blob: bytes) -> None:
    instance: int | str = 3 if blob[:40] == VALID[:40] else "vm-1"
    for expected_instance in {instance, 3, "vm-1"}:
        try:
            info = validate(blob, instance=expected_instance)
        except FragmentError:
            continue
        assert info.size == len(blob)
        assert libfdt.fdt_check_full(bytearray(blob), len(blob)) == 0
        fdt.check_tree(fdt.read_tree(blob))
        dts.to_dts(blob)
        # What khod accepts, dtc accepts too (the payload must pass dtc).
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "f.dtb"
            path.write_bytes(blob)
            subprocess.run(["dtc", "-I", "dtb", "-O", "dts", str(path)], capture_output=True,
                           check=True)  # fmt: skip
