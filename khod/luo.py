"""The Live Update Orchestrator's uAPI (``/dev/liveupdate``), thinly wrapped.

Checked against ``include/uapi/linux/liveupdate.h`` of Linux 7.3: every
command is ``_IO(0xBA, nr)`` (no size in the number: the size is the first
u32 of the struct, so that a newer, larger struct stays compatible).

    /dev/liveupdate   CREATE_SESSION 0x00, RETRIEVE_SESSION 0x01
                      struct { u32 size; s32 fd; u8 name[64]; }
    session fd        PRESERVE_FD 0x40, RETRIEVE_FD 0x41
                      struct { u32 size; s32 fd; aligned u64 token; }
                      FINISH 0x42  struct { u32 size; u32 reserved; }
                      GET_NAME 0x43  struct { u32 size; u32 reserved; u8 name[64]; }

What the kernel does with them (``kernel/liveupdate/luo_session.c``): the
device has one opener at a time (a second one gets EBUSY); closing an
outgoing session before the kexec unpreserves its files; a preserved session
is serialized at ``reboot(LINUX_REBOOT_CMD_KEXEC)``; after the kexec it can be
retrieved once, by name, and closing a retrieved session finishes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from pathlib import Path
from types import TracebackType

from khod_wire.errors import KhodError

DEVICE = Path("/dev/liveupdate")
IOCTL_TYPE = 0xBA
NAME_LENGTH = 64  # including the terminating NUL

CREATE_SESSION = 0x00
RETRIEVE_SESSION = 0x01
PRESERVE_FD = 0x40
RETRIEVE_FD = 0x41
FINISH = 0x42
GET_NAME = 0x43  # not called by khod: listed so that the table matches the uAPI

_SESSION = struct.Struct(f"=Ii{NAME_LENGTH}s")  # create / retrieve session: 72 bytes
_FD_TOKEN = struct.Struct("=Ii Q")  # preserve / retrieve fd: 16 bytes, token 8-aligned
_FINISH = struct.Struct("=II")

# Seals a preserved memfd may carry (MEMFD_LUO_ALL_SEALS minus the ones we do
# not need): the image can neither change nor change size once committed.
IMAGE_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


class LuoError(KhodError):
    """A LUO operation failed; the message names the operation and the cause."""

    # On the bus it is only ever seen as the reason a commit failed.
    code = "commit-failed"

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


class DeviceBusy(LuoError):
    """Another agent holds ``/dev/liveupdate`` (it has one owner at a time)."""


class NoDevice(LuoError):
    """No ``/dev/liveupdate``: no LUO in this kernel, or it was not enabled."""


def ioc(nr: int) -> int:
    """``_IO(LIVEUPDATE_IOCTL_TYPE, nr)``: direction and size bits are zero."""
    return (IOCTL_TYPE << 8) | nr


def encode_name(name: str) -> bytes:
    raw = name.encode("ascii", "replace")
    if not name.isascii() or not raw or len(raw) > NAME_LENGTH - 1 or b"\0" in raw:
        raise LuoError(f"LUO session name {name!r} must be 1..{NAME_LENGTH - 1} ASCII bytes")
    return raw


def pack_session(name: str) -> bytearray:
    return bytearray(_SESSION.pack(_SESSION.size, -1, encode_name(name)))


def pack_fd_token(fd: int, token: int) -> bytearray:
    return bytearray(_FD_TOKEN.pack(_FD_TOKEN.size, fd, token))


def unpack_fd(buf: bytes | bytearray) -> int:
    """The ``fd`` the kernel wrote into a session or fd struct."""
    return int(struct.unpack_from("=i", buf, 4)[0])


def _cmdline() -> str:
    try:
        return Path("/proc/cmdline").read_text()
    except OSError:
        return ""


def describe(op: str, err: int, device: Path = DEVICE) -> LuoError:
    """The error for ``op`` failing with ``err``, saying what an operator can do."""
    why = os.strerror(err)
    if op == "open" and err == errno.ENOENT:
        if "liveupdate=on" not in _cmdline().split():
            hint = "the kernel was booted without liveupdate=on on its command line"
        else:
            hint = "this kernel has no LUO (Linux 6.19+ with CONFIG_LIVEUPDATE)"
        return NoDevice(f"{device} does not exist: {hint}", err)
    if op == "open" and err == errno.EBUSY:
        return DeviceBusy(
            f"{device} is held by another agent (it has one owner at a time): "
            "stop the other khod, or the agent that holds it (e.g. systemd's fd store), first",
            err,
        )
    if op == "open" and err in (errno.EACCES, errno.EPERM):
        return LuoError(f"cannot open {device}: {why} (the unit needs DeviceAllow={device} rw)")
    if op == "create session" and err == errno.EEXIST:
        return LuoError(f"LUO {op}: a session of that name exists already", err)
    if err == errno.ENOTTY:
        return LuoError(f"LUO {op}: the kernel does not know this ioctl ({why})", err)
    return LuoError(f"LUO {op} failed: {why}", err)


def _ioctl(fd: int, nr: int, buf: bytearray, op: str) -> None:
    try:
        fcntl.ioctl(fd, ioc(nr), buf, True)
    except OSError as exc:
        raise describe(op, exc.errno or errno.EIO) from None


class Session:
    """One LUO session fd. Closing it before the kexec unpreserves its files."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name

    def preserve(self, fd: int, token: int) -> None:
        _ioctl(self.fd, PRESERVE_FD, pack_fd_token(fd, token), "preserve fd")

    def retrieve(self, token: int) -> int:
        buf = pack_fd_token(-1, token)
        _ioctl(self.fd, RETRIEVE_FD, buf, "retrieve fd")
        return unpack_fd(buf)

    def finish(self) -> None:
        _ioctl(self.fd, FINISH, bytearray(_FINISH.pack(_FINISH.size, 0)), "finish session")

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class Device:
    """``/dev/liveupdate``, held open: whoever holds it owns live update on the host."""

    def __init__(self, path: Path = DEVICE) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise describe("open", exc.errno or errno.EIO, path) from None

    def create_session(self, name: str) -> Session:
        buf = pack_session(name)
        _ioctl(self.fd, CREATE_SESSION, buf, "create session")
        return Session(unpack_fd(buf), name)

    def retrieve_session(self, name: str) -> Session | None:
        """The session of that name from before the kexec, or None if there is none."""
        buf = pack_session(name)
        try:
            _ioctl(self.fd, RETRIEVE_SESSION, buf, "retrieve session")
        except LuoError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return Session(unpack_fd(buf), name)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> Device:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def sealed_memfd(name: str, data: bytes) -> int:
    """A memfd holding exactly ``data``, sealed against any change."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, IMAGE_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_all(fd: int) -> bytes:
    """The whole content of ``fd`` from offset 0 (its own position is left alone)."""
    size = os.fstat(fd).st_size
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
