"""The README's first command, as a newcomer runs it (minus the setup)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from khod import broker
from khod.payload import PayloadImage
from khod_wire.errors import ConfigError

pytestmark = pytest.mark.integration


def test_demo_hands_over_and_restores_every_fragment(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "khod.cli", "demo", "-n", "6", "-o", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "6/6 fragments verified byte for byte" in r.stdout
    image = PayloadImage.from_file(out / "payload.kho")
    manifest = json.loads((out / "payload.json").read_text())
    assert manifest["handover_id"] == image.handover_id
    assert len(image.entries) == 6
    inspect = subprocess.run(
        [sys.executable, "-m", "khod.cli", "inspect", str(out / "payload.kho")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert inspect.returncode == 0, inspect.stderr
    # Every process it started, it stopped: no daemon left on its state dirs.
    assert processes_mentioning(str(out)) == []


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line or environment mentions ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            blob = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if text.encode() in blob:
            found.append(int(proc.name))
    return found


def test_demo_refuses_an_output_directory_that_holds_a_payload(tmp_path: Path) -> None:
    (tmp_path / "payload.kho").write_bytes(b"old")
    r = subprocess.run(
        [sys.executable, "-m", "khod.cli", "demo", "-o", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "choose a fresh --output" in r.stdout
    assert (tmp_path / "payload.kho").read_bytes() == b"old"


def test_a_missing_mosquitto_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker.shutil, "which", lambda _name: None)
    monkeypatch.setattr(broker, "CANDIDATES", ("/nonexistent/mosquitto",))
    with pytest.raises(ConfigError, match="apt-get install mosquitto"):
        broker.find_mosquitto()
