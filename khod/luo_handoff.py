"""The ``luo`` backend: the payload crosses the kexec in a preserved memfd.

khod owns ``/dev/liveupdate`` from start-up to exit. Its session is named
``khod-<host id>`` and holds one file, the payload image in a sealed memfd,
under the token :data:`IMAGE_TOKEN` (``0x6b686f64``, "khod"). Both are part of
the contract with the next kernel's khod, which finds the session by that
name and the image by that token.

Outgoing: the handover is committed only once PRESERVE_FD succeeded; any
failure closes the session, which unpreserves whatever it held, so an aborted
handover leaves nothing for the kexec to carry. The session fd must stay open
until the kexec: a khod that stops after the commit takes the payload with it
(the kernel unpreserves the files of a closed session), and says so.

Incoming: the session is retrieved once (the kernel allows no second time),
the image is read from the memfd and written to the state directory, so that
a daemon restarted during the restore resumes from it like from any image;
the session is FINISHed when the restore is released.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from khod import luo
from khod.atomicfile import atomic_write
from khod_wire.errors import ConfigError, KhodError

log = logging.getLogger(__name__)

SESSION_PREFIX = "khod-"
IMAGE_TOKEN = 0x6B686F64  # "khod"


def session_name(host_id: str) -> str:
    """``khod-<host id>``; ConfigError if it does not fit LUO's 63 bytes."""
    name = SESSION_PREFIX + host_id
    if len(name.encode()) > luo.NAME_LENGTH - 1:
        raise ConfigError(
            f"backend 'luo': session name {name!r} is longer than {luo.NAME_LENGTH - 1} bytes; "
            "choose a shorter host_id"
        )
    return name


class LuoHandoff:
    """khod's hold on ``/dev/liveupdate`` and its one session on each side of the kexec."""

    def __init__(self, host_id: str, device: Path = luo.DEVICE) -> None:
        self.name = session_name(host_id)
        self.device = luo.Device(device)
        self.outgoing: luo.Session | None = None
        self.incoming: luo.Session | None = None
        #: the retrieved memfd, kept open so that the image can be inspected
        #: as /proc/<khod pid>/fd/<n> until the session is finished
        self.incoming_fd: int | None = None

    # -- the incoming side -----------------------------------------------------

    def receive(self, path: Path) -> Path | None:
        """Retrieve the image the previous kernel's khod preserved, into ``path``.

        Returns ``path``, or None when this boot has no session of ours (a
        cold boot, a first start, an aborted handover, a restarted daemon).
        A session that is there but unusable is logged, finished and
        forgotten: the host must still be able to begin its next handover.
        """
        try:
            session = self.device.retrieve_session(self.name)
        except luo.LuoError as exc:
            log.error("LUO session %s cannot be retrieved, not restoring: %s", self.name, exc)
            return None
        if session is None:
            log.info("no LUO session %s from before this boot: nothing to restore", self.name)
            return None
        self.incoming = session
        try:
            self.incoming_fd = session.retrieve(IMAGE_TOKEN)
            image = luo.read_all(self.incoming_fd)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, image, mode=0o600)
        except (KhodError, OSError) as exc:
            log.error("LUO session %s retrieved, but not its payload: %s", self.name, exc)
            self.finish()
            return None
        log.info(
            "retrieved payload from LUO session %s: %d bytes, sha256 %s (memfd /proc/%d/fd/%d)",
            self.name,
            len(image),
            hashlib.sha256(image).hexdigest()[:16],
            os.getpid(),
            self.incoming_fd,
        )
        return path

    def finish(self) -> None:
        """The restore is over: the kernel may free what the session preserved."""
        session, self.incoming = self.incoming, None
        if self.incoming_fd is not None:
            luo.close_quietly(self.incoming_fd)
            self.incoming_fd = None
        if session is None:
            return
        try:
            session.finish()
            log.info("LUO session %s finished", self.name)
        except luo.LuoError as exc:
            # Closing finishes it too, or the next live update resets it.
            log.warning("LUO session %s: %s; closing it", self.name, exc)
        session.close()

    # -- the outgoing side -----------------------------------------------------

    def preserve(self, image: bytes) -> dict[str, Any]:
        """Put ``image`` in a sealed memfd preserved in a fresh session of ours."""
        self.withdraw()
        session = self.device.create_session(self.name)
        try:
            fd = luo.sealed_memfd(self.name, image)
            try:
                session.preserve(fd, IMAGE_TOKEN)
            finally:
                # The session holds the file now; our descriptor is not needed.
                os.close(fd)
        except BaseException:
            session.close()
            raise
        self.outgoing = session
        return {"session": self.name, "token": IMAGE_TOKEN}

    def withdraw(self) -> None:
        """Unpreserve: close the outgoing session (the kernel drops its files)."""
        session, self.outgoing = self.outgoing, None
        if session is not None:
            session.close()
            log.info("LUO session %s closed: nothing preserved", self.name)

    def close(self) -> None:
        if self.outgoing is not None:
            log.warning(
                "khod stops with a committed payload in LUO session %s: closing it "
                "unpreserves the payload, the kexec will not carry it",
                self.name,
            )
        self.withdraw()
        self.finish()
        self.device.close()
