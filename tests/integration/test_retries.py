"""Retries and restarts: the same answer after a daemon restart, statuses in order,
a committed payload withdrawn, and a slow commit that does not starve the watchdog.

Real mosquitto (persistent where the test needs it), real ``khod run`` processes.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from khod.broker import PrivateBroker
from khod_client import Participant
from khod_wire.fragment import start_storage
from khod_wire.protocol import ControlOp, ParticipantOp
from tests.busclient import RawClient, until
from tests.daemonproc import DaemonFactory, DaemonProc

pytestmark = pytest.mark.integration

COMPAT = "test,vm-v1"


def fragment(i: int) -> bytes:
    b = start_storage(COMPAT, i)
    b.property_u32("revision", 1)
    return b.finish_storage()


async def _request(c: RawClient, op: ParticipantOp, body: bytes, correlation: bytes) -> bytes:
    assert c.name is not None
    topic = c.topics.request(c.name, op)
    payload, _ = await c.raw(topic, body, correlation=correlation)
    return payload


async def test_a_request_resent_after_a_daemon_restart_gets_the_same_reply(
    daemon: DaemonProc, daemon_factory: DaemonFactory
) -> None:
    url, host = daemon.broker.url, daemon.host_id
    async with RawClient(url, host, "solo") as c, RawClient(url, host) as op:
        assert (await c.register(COMPAT, 0))["ok"]
        assert (await op.op(ControlOp.BEGIN, {"deadline": 60}))["ok"]
        assert (await c.op(ParticipantOp.FRAGMENT, fragment(0)))["ok"]
        first = await _request(c, ParticipantOp.FROZEN, b"{}", b"frozen-1")
        assert json.loads(first)["data"]["handover"]["state"] == "committed"
    # The reply was lost on its way (say): the daemon dies, the participant retries.
    daemon.kill()
    daemon.start()
    async with RawClient(url, host, "solo") as c:
        again = await _request(c, ParticipantOp.FROZEN, b"{}", b"frozen-1")
        assert again == first
        # A new request for the same thing is not an error either: it is done.
        fresh = await c.op(ParticipantOp.FROZEN)
        assert fresh["ok"] and fresh["data"]["handover"]["state"] == "committed"
    daemon.stop()

    incoming = daemon_factory("incoming")
    incoming.start(restore=daemon.state_dir / "payload.kho")
    async with RawClient(url, host, "solo") as c:
        assert await c.op(ParticipantOp.RETRIEVE) == fragment(0)
        done = await _request(c, ParticipantOp.FINISH, b"{}", b"finish-1")
        assert json.loads(done)["ok"]
    incoming.kill()
    incoming.start()
    async with RawClient(url, host, "solo") as c:
        assert await _request(c, ParticipantOp.FINISH, b"{}", b"finish-1") == done
        # A new finish of a finished fragment is not an error either.
        assert (await c.op(ParticipantOp.FINISH))["ok"]


@pytest.fixture
def persistent_broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    b = PrivateBroker(tmp_path / "broker", persistence=True)
    b.start()
    yield b
    b.close()


@pytest.fixture
def stale_daemon(persistent_broker: PrivateBroker, tmp_path: Path) -> Iterator[DaemonProc]:
    d = DaemonProc(persistent_broker, "stale", tmp_path / "state")
    yield d
    if d.proc is not None:
        d.proc.send_signal(signal.SIGCONT)  # never leave it stopped behind
    d.kill()


async def test_a_stale_retained_handover_never_cancels_a_live_one(
    persistent_broker: PrivateBroker, stale_daemon: DaemonProc
) -> None:
    """A persistent broker killed mid-handover replays an old retained ``idle``."""
    host, d = "stale", stale_daemon
    d.start()
    # Saved at a clean stop: the broker's database now holds the idle handover.
    persistent_broker.stop()
    persistent_broker.start()
    d.wait_online()
    cancels: list[str] = []
    p = Participant(
        "vm",
        compatible=COMPAT,
        instance=0,
        broker=persistent_broker.url,
        host_id=host,
        on_cancel=cancels.append,
    )
    async with p, RawClient(persistent_broker.url, host) as op:
        await p.register()
        assert (await op.op(ControlOp.BEGIN, {"deadline": 120, "auto_freeze": False}))["ok"]
        await p.wait_for_begin()
        await p.submit(fragment(0))
        # The daemon comes back last: stopped before the broker dies.
        assert d.proc is not None
        d.proc.send_signal(signal.SIGSTOP)
        try:
            persistent_broker.stop(kill=True)
            persistent_broker.start()
            connects = p._conn.connects
            await until(lambda: p._conn.connects > connects, what="participant reconnected")
            await asyncio.sleep(1.0)  # the stale retained messages arrive meanwhile
            assert cancels == [], "an old status cancelled the live handover"
        finally:
            d.proc.send_signal(signal.SIGCONT)
        assert (await op.op(ControlOp.FREEZE, {}))["ok"]
        await asyncio.wait_for(p.wait_for_freeze(), 30)
        await p.frozen()
        signal_ = await p.wait_for_handover(lambda s: s.state == "committed")
        assert signal_.id == p.handover_id
    assert cancels == []


async def _one_committed(d: DaemonProc, p: Participant) -> None:
    async with RawClient(d.broker.url, d.host_id) as op:
        await p.register()
        assert (await op.op(ControlOp.BEGIN, {"deadline": 120}))["ok"]
    await p.wait_for_begin()
    await p.submit(fragment(0))
    await p.wait_for_freeze()
    await p.frozen()
    await p.wait_for_handover(lambda s: s.state == "committed")


async def test_abort_after_commit_withdraws_the_payload_and_everyone_thaws(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    undone = tmp_path / "kexec-unloaded"
    d = daemon_factory(
        KHOD_BACKEND="exec",
        KHOD_EXEC_COMMAND=json.dumps(["true", "{image}"]),
        KHOD_EXEC_UNDO_COMMAND=json.dumps(["sh", "-c", f'echo "$0" > {undone}', "{image}"]),
    )
    await asyncio.to_thread(d.start)
    p = Participant("vm", compatible=COMPAT, instance=0, broker=d.broker.url, host_id=d.host_id)
    async with p, RawClient(d.broker.url, d.host_id) as op:
        await _one_committed(d, p)
        hid = p.handover_id
        image = d.state_dir / "payload.kho"
        assert image.exists()
        reply = await op.op(ControlOp.ABORT, {"reason": "kexec postponed"})
        assert reply["ok"], reply
        h = reply["data"]["handover"]
        assert h["state"] == "idle" and h["id"] == hid
        assert h["abort_reason"] == "payload withdrawn: kexec postponed"
        assert not image.exists() and not image.with_suffix(".json").exists()
        assert undone.read_text().strip() == str(image)
        # The participant is told to thaw, and takes part in the next handover.
        reason = await asyncio.wait_for(p.wait_for_cancel(), 20)
        assert reason == "payload withdrawn: kexec postponed"
        assert (await op.op(ControlOp.BEGIN, {"deadline": 60}))["ok"]
        began = await asyncio.wait_for(p.wait_for_begin(), 20)
        assert began.id != hid


async def test_a_failing_undo_keeps_the_payload_committed(
    daemon_factory: DaemonFactory,
) -> None:
    d = daemon_factory(
        KHOD_BACKEND="exec",
        KHOD_EXEC_COMMAND=json.dumps(["true"]),
        KHOD_EXEC_UNDO_COMMAND=json.dumps(["sh", "-c", "echo busy >&2; exit 1"]),
    )
    await asyncio.to_thread(d.start)
    p = Participant("vm", compatible=COMPAT, instance=0, broker=d.broker.url, host_id=d.host_id)
    async with p, RawClient(d.broker.url, d.host_id) as op:
        await _one_committed(d, p)
        reply = await op.op(ControlOp.ABORT, {"reason": "try"})
        assert not reply["ok"] and reply["error"]["code"] == "withdraw-failed"
        assert "busy" in reply["error"]["message"]
        status = (await op.op(ControlOp.STATUS))["data"]
        assert status["handover"]["state"] == "committed"
        assert (d.state_dir / "payload.kho").exists()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(p.wait_for_cancel(), 1.0)


def test_a_commit_slower_than_the_watchdog_still_feeds_it(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    started, ended = tmp_path / "started", tmp_path / "ended"
    slow = f"touch {started}; sleep 3; touch {ended}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0.2)
    # A watchdog of 1 s: khod must ping it every 0.5 s, also while the commit runs.
    d = daemon_factory(
        NOTIFY_SOCKET=str(tmp_path / "notify.sock"),
        WATCHDOG_USEC="1000000",
        KHOD_BACKEND="exec",
        KHOD_EXEC_COMMAND=json.dumps(["sh", "-c", slow]),
    )
    pings: list[float] = []
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            try:
                data = sock.recv(4096).decode()
            except TimeoutError:
                continue
            if "WATCHDOG=1" in data.split("\n"):
                pings.append(time.time())

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    try:
        d.start()

        async def handover() -> dict[str, object]:
            async with (
                RawClient(d.broker.url, d.host_id, "solo") as c,
                RawClient(d.broker.url, d.host_id) as op,
            ):
                assert (await c.register(COMPAT, 0))["ok"]
                assert (await op.op(ControlOp.BEGIN, {"deadline": 60}))["ok"]
                assert (await c.op(ParticipantOp.FRAGMENT, fragment(0)))["ok"]
                reply = await c.op(ParticipantOp.FROZEN)
                assert reply["ok"], reply
                return reply["data"]["handover"]  # type: ignore[no-any-return]

        h = asyncio.run(handover())
        assert h["state"] == "committed"
    finally:
        stop.set()
        listener.join()
        sock.close()
    t0, t1 = started.stat().st_mtime, ended.stat().st_mtime
    during = [t for t in pings if t0 < t < t1]
    assert len(during) >= 3, f"{len(during)} watchdog pings while the commit ran {t1 - t0:.1f}s"
    assert d.proc is not None and d.proc.poll() is None
    d.stop()
