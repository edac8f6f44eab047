"""Committing the payload: the kernel hand-off backends.

``dir`` writes the image and its manifest atomically (a crash never leaves a
partial image under the final name). ``exec`` does the same, then runs the
operator's command on the image (the host's kexec step). ``luo`` needs
``/dev/liveupdate`` (Linux 6.19+); it is refused at start-up when the device
is missing, rather than failing at the worst moment, the commit.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

from khod.atomicfile import atomic_write, atomic_write_json
from khod.config import Settings
from khod.errors import ConfigError, KhodError

LUO_DEVICE = Path("/dev/liveupdate")


class CommitError(KhodError):
    """The payload could not be committed; the handover aborts."""

    code = "commit-failed"


def check_backend(settings: Settings) -> None:
    """Refuse a backend that cannot work on this host, at start-up."""
    if settings.backend == "exec" and not settings.exec_command:
        raise ConfigError("backend 'exec' needs exec_command (argv, '{image}' is the image path)")
    if settings.backend == "luo":
        raise ConfigError(
            f"backend 'luo' needs {LUO_DEVICE} (Linux 6.19+ with CONFIG_LIVEUPDATE); "
            "this build of khod does not drive LUO sessions yet: use 'dir' or 'exec'"
        )


def manifest_path(image: Path) -> Path:
    return image.with_suffix(".json")


async def commit(settings: Settings, image: bytes, manifest: dict[str, Any]) -> dict[str, Any]:
    """Make the payload durable where the next kernel will find it.

    Returns what the retained handover state shows about the payload.
    """
    path = settings.payload_path
    path.parent.mkdir(parents=True, exist_ok=True)
    # The image first: a manifest never describes an image that is not there.
    await asyncio.to_thread(atomic_write, path, image)
    await asyncio.to_thread(atomic_write_json, manifest_path(path), manifest)
    info = {
        "backend": settings.backend,
        "path": str(path),
        "size": len(image),
        "sha256": hashlib.sha256(image).hexdigest(),
        "participants": len(manifest.get("participants", [])),
    }
    if settings.backend == "exec":
        argv = [a.replace("{image}", str(path)) for a in settings.exec_command]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
        except OSError as exc:
            withdraw(path)
            raise CommitError(f"cannot run {argv[0]!r}: {exc.strerror}") from None
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            # The handover aborts: no image of it may stay where a kexec could take it.
            withdraw(path)
            tail = out.decode(errors="replace").strip()[-500:]
            raise CommitError(f"{argv[0]} exited with {proc.returncode}: {tail}")
    return info


def withdraw(image: Path) -> None:
    for p in (image, manifest_path(image)):
        p.unlink(missing_ok=True)
