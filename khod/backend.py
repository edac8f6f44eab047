"""Committing the payload: the kernel hand-off backends.

``dir`` writes the image atomically (a crash never leaves a partial image
under the final name), and its manifest once committed (``describe``).
``exec`` writes both, then runs the operator's command on the image (the
host's kexec step). ``luo`` puts the image in a memfd preserved in khod's LUO
session (see ``khod.luo_handoff``) and, once committed, writes the manifest
beside where a ``dir`` image would be; ``khod run``
opens ``/dev/liveupdate`` at start-up, so a host without it is refused then,
rather than at the worst moment, the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Any

from khod.atomicfile import atomic_write_all, json_bytes
from khod.config import Settings
from khod.luo_handoff import LuoHandoff, session_name
from khod_wire.errors import CommitError, ConfigError, KhodError, WithdrawError

#: the LUO hand-off of this process, for backend "luo" (``khod run`` opens it)
_luo: LuoHandoff | None = None


def use_luo(handoff: LuoHandoff | None) -> None:
    global _luo
    _luo = handoff


def check_backend(settings: Settings) -> None:
    """Refuse a backend that cannot work on this host, at start-up."""
    if settings.backend == "exec" and not settings.exec_command:
        raise ConfigError("backend 'exec' needs exec_command (argv, '{image}' is the image path)")
    if settings.backend == "luo":
        session_name(settings.host_id)


def manifest_path(image: Path) -> Path:
    return image.with_suffix(".json")


async def commit(
    settings: Settings, image: bytes, manifest: dict[str, Any], *, timeout: float
) -> dict[str, Any]:
    """Make the payload durable where the next kernel will find it.

    Returns what the retained handover state shows about the payload. On any
    failure the image is withdrawn (an aborted handover leaves no payload a
    kexec could take) and CommitError is raised.
    """
    path = settings.payload_path
    try:
        return await _commit(settings, path, image, manifest, timeout)
    except BaseException as exc:
        withdraw(path)
        if isinstance(exc, OSError):
            raise CommitError(f"cannot write {path}: {exc.strerror or exc}") from None
        if isinstance(exc, KhodError) and not isinstance(exc, CommitError):
            raise CommitError(str(exc)) from None
        raise


async def _commit(
    settings: Settings, path: Path, image: bytes, manifest: dict[str, Any], timeout: float
) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    where: dict[str, Any] = {"path": str(path)}
    described = manifest_path(path)
    if settings.backend == "exec":
        # The operator's command may read the manifest: both first (the
        # image before it: a manifest never describes an image not there).
        await asyncio.to_thread(
            atomic_write_all, [(path, image), (described, json_bytes(manifest))]
        )
        await _run(settings.exec_command, path, timeout)
    else:
        # The manifest follows the commit (``describe``), outside the
        # blackout; the old one goes first, so it never sits beside a new image.
        described.unlink(missing_ok=True)
        if settings.backend == "luo":
            if _luo is None:
                raise CommitError("backend 'luo': /dev/liveupdate is not open in this process")
            where = _luo.preserve(image)
        else:
            await asyncio.to_thread(atomic_write_all, [(path, image)])
    return {
        "backend": settings.backend,
        **where,
        "size": len(image),
        # The root holds every fragment's sha256: its hash vouches for the image
        # without reading every fragment again inside the blackout.
        "root_sha256": manifest.get("root_sha256"),
        "participants": len(manifest.get("participants", [])),
    }


async def describe(settings: Settings, manifest: dict[str, Any]) -> None:
    """Write the manifest of a committed payload beside it (``exec`` wrote it already).

    Once committed, so not inside the blackout: it is derived from the image
    (``khod inspect --json`` prints the same), for people and scripts.
    """
    if settings.backend != "exec":
        data = json_bytes(manifest)
        await asyncio.to_thread(atomic_write_all, [(manifest_path(settings.payload_path), data)])


async def _run(command: list[str], image: Path, timeout: float) -> None:
    argv = [a.replace("{image}", str(image)) for a in command]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Its own process group, so that a timeout stops what it spawned too.
            start_new_session=True,
        )
    except OSError as exc:
        raise CommitError(f"cannot run {argv[0]!r}: {exc.strerror}") from None
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:
        # Timed out, or the daemon is stopping: never leave it running behind us.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise CommitError(f"{argv[0]} did not finish within {timeout:g}s") from None
    if proc.returncode != 0:
        tail = out.decode(errors="replace").strip()[-500:]
        raise CommitError(f"{argv[0]} exited with {proc.returncode}: {tail}")


async def withdraw_committed(settings: Settings, *, timeout: float) -> None:
    """Take back a committed payload: the kexec will not happen.

    With ``exec``, the operator's undo command runs first (e.g. ``kexec -u``):
    if it fails, the payload stays committed (WithdrawError) — participants
    must not thaw while a kernel may still boot into it.
    """
    path = settings.payload_path
    if settings.backend == "exec" and settings.exec_undo_command:
        try:
            await _run(settings.exec_undo_command, path, timeout)
        except CommitError as exc:
            raise WithdrawError(f"cannot withdraw the payload: {exc}") from None
    try:
        withdraw(path)
    except OSError as exc:
        raise WithdrawError(f"cannot remove {path}: {exc.strerror or exc}") from None


def withdraw(image: Path) -> None:
    if _luo is not None:
        _luo.withdraw()
    for p in (image, manifest_path(image)):
        p.unlink(missing_ok=True)
