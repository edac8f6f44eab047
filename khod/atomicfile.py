"""Replace a file so that readers, and a crash, see the old or the new version, never a mix.

The new content goes to a uniquely named temporary file in the same directory
(``os.replace`` is only atomic within one filesystem), is fsynced, renamed
over the final name, and the directory is fsynced so that the rename itself
survives a power loss. A crash at any point leaves the old file or the new
one under the final name; at worst a stray ``.<name>.*.tmp`` stays behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from khod_wire.errors import StoreError

__all__ = [
    "atomic_write",
    "atomic_write_all",
    "fsync_directory",
    "json_bytes",
    "remove_stale_temps",
]


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Durably replace ``path`` with ``data``, with permissions exactly ``mode``.

    Raises StoreError (naming ``path``) if any step fails; the temporary file
    is removed and whatever was under ``path`` before is left untouched,
    unless the failure is the final directory fsync, when the new content is
    in place but its durability is unknown.
    """
    atomic_write_all([(Path(path), data)], mode=mode)


def atomic_write_all(files: Sequence[tuple[Path, bytes]], *, mode: int = 0o644) -> None:
    """Durably replace each ``(path, data)``, renamed in the given order.

    Like :func:`atomic_write` for each file, with one fsync per directory
    rather than one per file: every new content is written and fsynced
    first, then renamed into place in order (a crash in between leaves the
    files before it new and the others old), then each directory is fsynced
    once. On a failure before the renames nothing is replaced.
    """
    temps: list[tuple[str, Path]] = []
    try:
        for path, data in files:
            # mkstemp opens with O_CREAT | O_EXCL: a concurrent writer or a
            # stale temp file can never be shared with this one.
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            except OSError as exc:
                raise StoreError(f"cannot write {path} atomically: {exc}") from exc
            temps.append((tmp, path))
            try:
                # fchmod rather than relying on the umask: the caller asked for a mode.
                os.fchmod(fd, mode)
                _write_all(fd, data)
                os.fsync(fd)
            except OSError as exc:
                raise StoreError(f"cannot write {path} atomically: {exc}") from exc
            finally:
                # close() can report a deferred write error (NFS): it counts.
                try:
                    os.close(fd)
                except OSError as exc:
                    raise StoreError(f"cannot write {path} atomically: {exc}") from exc
        while temps:
            tmp, path = temps[0]
            try:
                os.replace(tmp, path)
            except OSError as exc:
                raise StoreError(f"cannot write {path} atomically: {exc}") from exc
            temps.pop(0)
    finally:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    for directory in dict.fromkeys(path.parent for path, _ in files):
        fsync_directory(directory)


def json_bytes(obj: Any) -> bytes:
    """``obj`` as the JSON khod writes to files (sorted keys, indent 2, final newline)."""
    try:
        # allow_nan=False: NaN and Infinity are not JSON, and other languages
        # read these files (manifests).
        text = json.dumps(obj, sort_keys=True, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise StoreError(f"value is not JSON-serializable: {exc}") from exc
    return text.encode("utf-8")


def _write_all(fd: int, data: bytes) -> None:
    # os.write may write less than asked (signals, pipes, some filesystems).
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_directory(directory: Path) -> None:
    """Make the names created, renamed or removed in ``directory`` survive a power loss."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StoreError(f"cannot fsync directory {directory}: {exc}") from exc


def remove_stale_temps(targets: list[Path]) -> list[Path]:
    """Remove the temporary files a crash left behind while replacing ``targets``.

    Only names :func:`atomic_write` makes for those very files
    (``.<name>.<random>.tmp`` next to each): the directory may hold other
    people's files. Call it only while no writer runs (at start, under the
    daemon's lock). Returns what was removed.
    """
    removed = []
    for target in targets:
        stale = re.compile(rf"\.{re.escape(target.name)}\.[A-Za-z0-9_]+\.tmp")
        try:
            entries = list(target.parent.iterdir())
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StoreError(f"cannot list {target.parent}: {exc}") from exc
        for entry in entries:
            if stale.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
                try:
                    entry.unlink()
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise StoreError(f"cannot remove stale temporary file {entry}: {exc}") from exc
                removed.append(entry)
    return removed
