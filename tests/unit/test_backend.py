"""khod.backend: what is on disk after a commit, and when the manifest is written."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from khod import backend
from khod.config import load_settings

MANIFEST = {"handover_id": "h", "root_sha256": "ab" * 32, "participants": [{"name": "a"}]}


def test_dir_drops_the_old_manifest_and_describes_the_new_payload_once_committed(
    tmp_path: Path,
) -> None:
    settings = load_settings(None, state_dir=tmp_path, host_id="h1")
    image, described = settings.payload_path, backend.manifest_path(settings.payload_path)
    image.write_bytes(b"old image")
    described.write_text('{"handover_id": "older"}')
    info = asyncio.run(backend.commit(settings, b"new image", MANIFEST, timeout=5))
    assert info["size"] == len(b"new image") and info["participants"] == 1
    assert image.read_bytes() == b"new image"
    # The commit ends without a manifest (it is written after the blackout),
    # and never with the old one beside the new image.
    assert not described.exists()
    asyncio.run(backend.describe(settings, MANIFEST))
    assert json.loads(described.read_text()) == MANIFEST


def test_exec_writes_the_manifest_before_its_command_runs(tmp_path: Path) -> None:
    seen = tmp_path / "seen.json"
    check = f"import shutil, sys; shutil.copy(sys.argv[1][:-4] + '.json', {str(seen)!r})"
    settings = load_settings(
        None,
        state_dir=tmp_path / "state",
        host_id="h1",
        backend="exec",
        exec_command=[sys.executable, "-c", check, "{image}"],
    )
    asyncio.run(backend.commit(settings, b"image", MANIFEST, timeout=30))
    assert json.loads(seen.read_text()) == MANIFEST
    before = backend.manifest_path(settings.payload_path).read_bytes()
    asyncio.run(backend.describe(settings, {"other": 1}))  # exec: written already
    assert backend.manifest_path(settings.payload_path).read_bytes() == before
