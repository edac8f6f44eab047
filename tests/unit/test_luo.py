"""The LUO uAPI wrapper and the luo backend, without a LUO kernel.

What needs a real /dev/liveupdate is proven in tests/kernel (a guest kernel
and a real kexec); here: the ioctl numbers and struct layouts against
include/uapi/linux/liveupdate.h, the errors an operator sees, the sealed
memfd, and that a failed preserve leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from khod import backend, luo, luo_service
from khod.config import Settings, load_settings
from khod.daemon import Daemon
from khod.luo_handoff import IMAGE_TOKEN, LuoHandoff, session_name
from khod.store import Store
from khod_wire.errors import ConfigError
from khod_wire.fragment import start_storage
from tests.fakes import Recorder


def test_ioctl_numbers_are_io_with_type_0xba() -> None:
    # _IO(0xBA, nr): no direction, no size bits.
    assert luo.ioc(luo.CREATE_SESSION) == 0xBA00
    assert luo.ioc(luo.RETRIEVE_SESSION) == 0xBA01
    assert luo.ioc(luo.PRESERVE_FD) == 0xBA40
    assert luo.ioc(luo.RETRIEVE_FD) == 0xBA41
    assert luo.ioc(luo.FINISH) == 0xBA42
    assert luo.ioc(luo.GET_NAME) == 0xBA43


def test_session_struct_layout() -> None:
    buf = luo.pack_session("khod-h1")
    assert len(buf) == 4 + 4 + 64
    size, fd = struct.unpack_from("=Ii", buf)
    assert (size, fd) == (72, -1)
    assert bytes(buf[8:]) == b"khod-h1".ljust(64, b"\0")
    buf[4:8] = struct.pack("=i", 17)  # what the kernel writes back
    assert luo.unpack_fd(buf) == 17


def test_fd_token_struct_has_the_token_aligned_at_8() -> None:
    buf = luo.pack_fd_token(5, IMAGE_TOKEN)
    assert len(buf) == 16
    assert struct.unpack("=IiQ", buf) == (16, 5, 0x6B686F64)


@pytest.mark.parametrize("name", ["", "x" * 64, "a\0b", "é"])
def test_bad_session_names_are_refused(name: str) -> None:
    with pytest.raises(luo.LuoError):
        luo.pack_session(name)


def test_the_longest_session_name_fits() -> None:
    assert len(luo.pack_session("x" * 63)) == 72


def test_session_name_is_khod_host() -> None:
    assert session_name("hv-0042") == "khod-hv-0042"
    with pytest.raises(ConfigError, match="shorter host_id"):
        session_name("h" * 60)


def test_a_missing_device_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(luo.NoDevice, match="does not exist") as exc:
        luo.Device(tmp_path / "liveupdate")
    assert "liveupdate=on" in str(exc.value) or "CONFIG_LIVEUPDATE" in str(exc.value)


def test_a_busy_device_names_the_other_owner() -> None:
    err = luo.describe("open", errno.EBUSY)
    assert isinstance(err, luo.DeviceBusy)
    assert "held by another agent" in str(err)


def test_a_device_that_is_not_luo_refuses_the_ioctl(tmp_path: Path) -> None:
    fake = tmp_path / "liveupdate"
    fake.write_bytes(b"")
    with luo.Device(fake) as dev, pytest.raises(luo.LuoError, match="create session") as exc:
        dev.create_session("khod-h1")
    assert exc.value.errno == errno.ENOTTY


def test_sealed_memfd_holds_exactly_the_image_and_cannot_change() -> None:
    data = os.urandom(300_000)
    fd = luo.sealed_memfd("khod-test", data)
    try:
        assert luo.read_all(fd) == data
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & luo.IMAGE_SEALS == luo.IMAGE_SEALS
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 10)
    finally:
        os.close(fd)


def test_handoff_on_a_fake_device_preserves_nothing(tmp_path: Path) -> None:
    fake = tmp_path / "liveupdate"
    fake.write_bytes(b"")
    handoff = LuoHandoff("h1", device=fake)
    try:
        with pytest.raises(luo.LuoError):
            handoff.preserve(b"image")
        assert handoff.outgoing is None
        # Logged, not fatal: the host must still be able to begin its next handover.
        assert handoff.receive(tmp_path / "payload.kho") is None
        assert not (tmp_path / "payload.kho").exists()
    finally:
        handoff.close()


def test_luo_commit_failure_withdraws_everything(tmp_path: Path) -> None:
    fake = tmp_path / "liveupdate"
    fake.write_bytes(b"")
    settings = load_settings(None, state_dir=tmp_path / "state", backend="luo", host_id="h1")
    handoff = LuoHandoff("h1", device=fake)
    backend.use_luo(handoff)
    try:
        with pytest.raises(backend.CommitError, match="LUO create session"):
            asyncio.run(backend.commit(settings, b"img", {"participants": []}, timeout=5))
    finally:
        backend.use_luo(None)
        handoff.close()
    assert not backend.manifest_path(settings.payload_path).exists()
    assert not settings.payload_path.exists()


def test_luo_commit_without_the_device_open_is_a_commit_error(tmp_path: Path) -> None:
    settings = load_settings(None, state_dir=tmp_path, backend="luo", host_id="h1")
    with pytest.raises(backend.CommitError, match="not open"):
        asyncio.run(backend.commit(settings, b"img", {}, timeout=5))


def test_khod_run_without_liveupdate_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    if luo.DEVICE.exists():
        pytest.skip("this host has /dev/liveupdate")
    env = {
        **os.environ,
        "KHOD_BACKEND": "luo",
        "KHOD_STATE_DIR": str(tmp_path),
        "KHOD_BROKER": "unix:///nonexistent",
        "KHOD_HOST_ID": "h1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "khod.cli", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "backend 'luo': /dev/liveupdate does not exist" in proc.stderr
    # It changed nothing: no store was created.
    assert not any(p.suffix in (".db", ".sqlite") for p in tmp_path.iterdir())


def test_read_all_ignores_the_file_position(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"abcdef")
    fd = os.open(p, os.O_RDONLY)
    try:
        os.lseek(fd, 4, os.SEEK_SET)
        assert hashlib.sha256(luo.read_all(fd)).digest() == hashlib.sha256(b"abcdef").digest()
    finally:
        os.close(fd)


# -- the daemon's side of the hand-off (the image the kernel carried) ----------


def committed_image(tmp_path: Path) -> tuple[bytes, str]:
    """The image a khod in the old boot would have preserved."""
    from khod.payload_layout import PayloadEntry, layout

    blob = start_storage("test,vm-v1", 1).finish_storage()
    entry = PayloadEntry("vm", "test,vm-v1", 1, blob, hashlib.sha256(blob).digest())
    return layout("h-luo", [entry]).image, hashlib.sha256(blob).hexdigest()


def test_a_handed_over_image_is_restored_like_a_found_one(tmp_path: Path) -> None:
    image, sha = committed_image(tmp_path)
    handed = tmp_path / "state" / "payload.kho"
    handed.parent.mkdir()
    handed.write_bytes(image)
    settings = Settings(state_dir=tmp_path / "state", host_id="h", backend="luo")
    with Store(settings.state_dir) as store:
        d = Daemon(settings, store, Recorder(), clock=lambda: 10.0)
        d.load_incoming(None, handed_over=handed)
        assert d.inc is not None and d.inc.handover_id == "h-luo"
        assert d.image is not None
        assert hashlib.sha256(d.image.retrieve("vm")).hexdigest() == sha
    # A daemon restarted during the restore resumes it from the store (no second handover).
    with Store(settings.state_dir) as store:
        d = Daemon(settings, store, Recorder(), clock=lambda: 11.0)
        d.load_incoming(None)
        assert d.inc is not None and d.inc.handover_id == "h-luo"


def test_a_corrupt_handed_over_image_is_not_fatal(tmp_path: Path) -> None:
    handed = tmp_path / "payload.kho"
    handed.write_bytes(b"not an fdt at all")
    settings = Settings(state_dir=tmp_path, host_id="h", backend="luo")
    with Store(tmp_path) as store:
        d = Daemon(settings, store, Recorder(), clock=lambda: 10.0)
        d.load_incoming(None, handed_over=handed)  # logged, not raised
        assert d.inc is None
        assert d.out.handover.state == "idle"


class FakeHandoff:
    """Records what the service asks of the LUO hand-off."""

    def __init__(self) -> None:
        self.preserved: list[bytes] = []
        self.incoming: object | None = object()
        self.finished = 0
        self.name = "khod-h"

    def preserve(self, image: bytes) -> dict[str, object]:
        self.preserved.append(image)
        return {}

    def finish(self) -> None:
        self.finished += 1
        self.incoming = None


def test_a_restarted_khod_preserves_the_same_payload_again(tmp_path: Path) -> None:
    from tests.unit.test_daemon_startup import frozen_handover, resumed

    with Store(tmp_path) as store:
        frozen_handover(store, deadline=100.0)
    settings = Settings(state_dir=tmp_path, host_id="h")
    with Store(tmp_path) as store:
        d = Daemon(settings, store, Recorder(), clock=lambda: 50.0)
        asyncio.run(resumed(d))  # commits with the dir backend: the reference image
        assert d.out.handover.state == "committed"
        fake = FakeHandoff()
        luo_service.preserve_again(d, fake)  # type: ignore[arg-type]
        assert fake.preserved == [(tmp_path / "payload.kho").read_bytes()]
        # In another boot (after the kexec) there is nothing to preserve again.
        store.set_meta("boot_id", "an-older-boot")
        luo_service.preserve_again(d, fake)  # type: ignore[arg-type]
        assert len(fake.preserved) == 1


def test_the_session_is_finished_only_once_the_restore_is_released(tmp_path: Path) -> None:
    image, _ = committed_image(tmp_path)
    handed = tmp_path / "payload.kho"
    handed.write_bytes(image)
    settings = Settings(state_dir=tmp_path, host_id="h", restore_deadline=5)
    now = [10.0]
    with Store(tmp_path) as store:
        d = Daemon(settings, store, Recorder(), clock=lambda: now[0])
        d.load_incoming(None, handed_over=handed)
        fake = FakeHandoff()

        async def scenario() -> None:
            async with d.running():
                task = asyncio.create_task(luo_service.finish_when_released(d, fake))  # type: ignore[arg-type]
                await asyncio.sleep(0.6)
                assert fake.finished == 0 and not task.done()  # still restoring
                now[0] = 100.0  # the restore deadline passes: released
                await d.tick()
                await d.settled()
                await asyncio.wait_for(task, 5)

        asyncio.run(scenario())
        assert fake.finished == 1


def test_withdrawing_a_committed_luo_payload_closes_the_session(tmp_path: Path) -> None:
    settings = load_settings(None, state_dir=tmp_path, backend="luo", host_id="h1")
    closed: list[bool] = []

    class Held:
        def withdraw(self) -> None:
            closed.append(True)

    backend.manifest_path(settings.payload_path).write_text("{}")
    backend.use_luo(Held())  # type: ignore[arg-type]
    try:
        asyncio.run(backend.withdraw_committed(settings, timeout=5))
    finally:
        backend.use_luo(None)
    assert closed == [True]
    assert not backend.manifest_path(settings.payload_path).exists()
