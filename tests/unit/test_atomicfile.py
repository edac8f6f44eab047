"""khod.atomicfile: contents, modes, failures that leave the old file, and SIGKILL mid-rewrite."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import re
import stat
import time
from pathlib import Path
from types import ModuleType

import pytest

from khod.atomicfile import atomic_write, atomic_write_all, json_bytes
from khod_wire.errors import StoreError


def _load_child_module() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "store_child.py"
    spec = importlib.util.spec_from_file_location("store_child", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


child = _load_child_module()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_writes_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "payload.kho"
    atomic_write(path, b"first")
    assert path.read_bytes() == b"first"
    atomic_write(path, b"second, longer than the first")
    assert path.read_bytes() == b"second, longer than the first"
    atomic_write(path, b"")
    assert path.read_bytes() == b""
    assert leftovers(tmp_path) == []


def test_large_content(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    atomic_write(tmp_path / "big", data)
    assert (tmp_path / "big").read_bytes() == data


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o640])
def test_mode_is_exact(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "f"
    old_umask = os.umask(0o077)
    try:
        atomic_write(path, b"x", mode=mode)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_json_format() -> None:
    text = json_bytes({"b": [1, 2], "a": {"z": None, "y": "é"}}).decode()
    expected = (
        '{\n  "a": {\n    "y": "\\u00e9",\n    "z": null\n  },\n  "b": [\n    1,\n    2\n  ]\n}\n'
    )
    assert text == expected
    assert json.loads(text) == {"a": {"y": "é", "z": None}, "b": [1, 2]}


@pytest.mark.parametrize("obj", [{"x": {1}}, {"x": object()}, {"x": math.nan}])
def test_json_unserializable_is_refused_before_anything_is_written(obj: object) -> None:
    with pytest.raises(StoreError, match="not JSON-serializable"):
        json_bytes(obj)


def test_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "f"
    with pytest.raises(StoreError, match=re.escape(str(path))):
        atomic_write(path, b"x")


def test_target_is_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "d"
    path.mkdir()
    (path / "inside").write_text("kept")
    with pytest.raises(StoreError, match=re.escape(str(path))):
        atomic_write(path, b"x")
    assert (path / "inside").read_text() == "kept"
    assert leftovers(tmp_path) == []


def test_failed_fsync_keeps_old_file_and_removes_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f"
    atomic_write(path, b"old")

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(StoreError, match=re.escape(str(path))) as info:
        atomic_write(path, b"new")
    assert isinstance(info.value.__cause__, OSError)
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_several_files_one_fsync_each_and_one_for_their_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, manifest = tmp_path / "payload.kho", tmp_path / "payload.json"
    atomic_write_all([(image, b"old image"), (manifest, b"old manifest")])
    real = os.fsync
    synced: list[str] = []

    def counting(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    atomic_write_all([(image, b"new image"), (manifest, b"new manifest")])
    assert synced == ["file", "file", "dir"]
    assert (image.read_bytes(), manifest.read_bytes()) == (b"new image", b"new manifest")
    assert leftovers(tmp_path) == []


def test_a_failure_on_a_later_file_replaces_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, manifest = tmp_path / "payload.kho", tmp_path / "payload.json"
    atomic_write_all([(image, b"old image"), (manifest, b"old manifest")])
    real, calls = os.fsync, []

    def second_fails(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", second_fails)
    with pytest.raises(StoreError, match=re.escape(str(manifest))):
        atomic_write_all([(image, b"new image"), (manifest, b"new manifest")])
    monkeypatch.undo()
    assert (image.read_bytes(), manifest.read_bytes()) == (b"old image", b"old manifest")
    assert leftovers(tmp_path) == []


def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def dribble(fd: int, data: bytes | memoryview) -> int:
        return real_write(fd, bytes(data[:7]))

    monkeypatch.setattr(os, "write", dribble)
    atomic_write(tmp_path / "f", b"a" * 100 + b"b" * 100)
    monkeypatch.undo()
    assert (tmp_path / "f").read_bytes() == b"a" * 100 + b"b" * 100


def test_sigkill_never_leaves_a_partial_file(tmp_path: Path) -> None:
    rng = random.Random()
    path = tmp_path / "payload.kho"
    acked: set[int] = set()
    for round_ in range(6):
        with child.Child("atomic", str(path)) as proc:
            proc.wait_for(rng.randint(1, 8))
            time.sleep(rng.uniform(0, 0.02))
            acked |= {int(line) for line in proc.kill()}
        # Whole (its header's length and sha256 match), and no older than
        # the last acknowledged version.
        version = child.parse_version(path.read_bytes())
        assert max(acked) <= version <= max(acked) + 1, f"round {round_}"
        assert all(name.startswith(".payload.kho.") for name in leftovers(tmp_path))
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".tmp")) == [
            "payload.kho"
        ]


def test_stale_temporary_files_of_the_targets_are_removed_and_nothing_else(
    tmp_path: Path,
) -> None:
    from khod.atomicfile import remove_stale_temps

    stale = [tmp_path / ".payload.json.k2j_x9qa.tmp", tmp_path / ".payload.kho.abc12345.tmp"]
    kept = [
        tmp_path / "payload.json",
        tmp_path / ".other.json.abc12345.tmp",  # not one of ours
        tmp_path / "payload.json.abc12345.tmp",  # not a name atomic_write makes
        tmp_path / ".payload.json.abc12345.tmp.orig",
    ]
    for f in stale + kept:
        f.write_bytes(b"x")
    (tmp_path / ".payload.kho.dir12345.tmp").mkdir()  # not a file: not ours either
    removed = remove_stale_temps([tmp_path / "payload.kho", tmp_path / "payload.json"])
    assert sorted(removed) == sorted(stale)
    assert not any(f.exists() for f in stale)
    assert all(f.exists() for f in kept)
    assert remove_stale_temps([tmp_path / "missing" / "payload.kho"]) == []
