"""``khod inspect``: exit codes, human, JSON and dts output, through the real CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from khod import cli
from khod.payload import PayloadImage
from khod.payload_layout import PayloadEntry, layout
from khod_wire import fragment

HID = "7d3c1b2a-0f9e-4d8c-b7a6-5e4d3c2b1a09"
PARTICIPANTS: list[tuple[str, str, int | str]] = [
    ("vmm-a", "cloud-hypervisor,vm-v1", 7),
    ("iommu", "iommufd,ioas-v1", "ioas-0"),
]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    entries = []
    for name, compatible, instance in PARTICIPANTS:
        b = fragment.start_storage(compatible, instance)
        b.property_string("owner", name)
        blob = b.finish_storage()
        entries.append(
            PayloadEntry(name, compatible, instance, blob, hashlib.sha256(blob).digest())
        )
    path = tmp_path / "payload.kho"
    path.write_bytes(layout(HID, entries).image)
    return path


def corrupt(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    last = PayloadImage.parse(bytes(data)).entries[-1]
    data[last.offset + 60] ^= 0xFF
    bad = path.with_name("corrupt.kho")
    bad.write_bytes(bytes(data))
    return bad


def test_valid_human(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["inspect", str(image)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert HID in out
    assert "valid payload image" in out
    for name, compatible, instance in PARTICIPANTS:
        assert name in out
        assert compatible in out
        assert repr(instance) in out
    assert "@0x1000" in out
    assert "/dts-v1/" not in out


def test_valid_json(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["inspect", str(image), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["valid"] is True
    assert doc["handover_id"] == HID
    assert doc["format"] == "khod-v1"
    assert doc["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert [(p["name"], p["compatible"], p["instance"]) for p in doc["participants"]] == [
        tuple(p) for p in PARTICIPANTS
    ]
    assert all("dts" not in p for p in doc["participants"])


def test_dts(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["inspect", str(image), "--dts"]) == 0
    out = capsys.readouterr().out
    assert 'compatible = "linux-kho,cloud-hypervisor,vm-v1";' in out
    assert 'instance = "ioas-0";' in out
    assert 'owner = "iommu";' in out
    assert cli.main(["inspect", str(image), "--json", "--dts"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "instance = <0x07>;" in doc["participants"][0]["dts"]


def test_corrupt_image(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = corrupt(image)
    assert cli.main(["inspect", str(bad)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("invalid payload image: participant 'iommu' at offset 0x2000")
    assert "sha256 mismatch" in err
    assert cli.main(["inspect", str(bad), "--json"]) == 1
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["valid"] is False
    assert "sha256 mismatch" in doc["error"]
    assert err.startswith("invalid payload image:")


def test_not_an_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.kho"
    junk.write_bytes(b"\x7fELF" + bytes(100))
    assert cli.main(["inspect", str(junk)]) == 1
    assert "invalid payload image: root FDT: bad magic" in capsys.readouterr().err


def test_unreadable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["inspect", str(tmp_path / "missing.kho")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert cli.main(["inspect", str(tmp_path), "--json"]) == 2  # a directory
    out, err = capsys.readouterr()
    assert out == ""
    assert "cannot read" in err


def test_console_script(image: Path) -> None:
    run = [sys.executable, "-m", "khod.cli", "inspect"]
    ok = subprocess.run([*run, str(image)], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "vmm-a" in ok.stdout and "iommu" in ok.stdout
    bad = subprocess.run([*run, str(corrupt(image))], capture_output=True, text=True, check=False)
    assert bad.returncode == 1
    assert "sha256 mismatch" in bad.stderr
    missing = subprocess.run([*run, "/nonexistent/x.kho"], capture_output=True, check=False)
    assert missing.returncode == 2


def test_inspect_base_option_reads_an_image_built_for_a_physical_base(tmp_path: Path) -> None:
    blob = fragment.start_storage("test,base-v1", 1).finish_storage()
    entry = PayloadEntry("p", "test,base-v1", 1, blob, hashlib.sha256(blob).digest())
    path = tmp_path / "based.kho"
    path.write_bytes(
        layout("00000000-0000-4000-8000-000000000000", [entry], base=0x8000_0000).image
    )
    assert cli.main(["inspect", str(path)]) == 1  # offsets read as from 0: out of bounds
    assert cli.main(["inspect", str(path), "--base", "0x80000000"]) == 0
