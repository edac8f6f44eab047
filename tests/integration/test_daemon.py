"""The daemon as a process: durability, crashes, broker restarts, systemd, bad input."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from khod.payload import PayloadImage
from khod.payload_layout import PayloadEntry, layout
from khod.store import Store
from khod_wire.fragment import start_storage
from khod_wire.protocol import JSON, ControlOp, ParticipantOp, Topics
from tests.busclient import RawClient, until, watcher
from tests.daemonproc import DaemonFactory, DaemonProc

pytestmark = pytest.mark.integration

COMPAT = "test,vm-v1"


def fragment(i: int, rev: int = 1) -> bytes:
    b = start_storage(COMPAT, i)
    b.property_u32("revision", rev)
    b.property_bytes("state", bytes([i % 256]) * (64 + i))
    return b.finish_storage()


def state_of(latest: dict[str, bytes], topic: str) -> dict[str, object]:
    body = latest.get(topic)
    return json.loads(body) if body else {}


async def test_late_monitor_sees_everything_retained(daemon: DaemonProc) -> None:
    url, host = daemon.broker.url, daemon.host_id
    t = Topics(host)
    for i, name in enumerate(["a", "b", "c"]):
        async with RawClient(url, host, name) as c:
            assert (await c.register(COMPAT, i))["ok"]
    async with RawClient(url, host) as op:
        assert (await op.op(ControlOp.BEGIN, {"deadline": 60}))["ok"]
    # Connects after everything happened, and still sees all of it at once.
    async with watcher(url, f"khod/v1/{host}/#") as latest:
        await until(lambda: len([k for k in latest if k.endswith("/state")]) == 3, what="states")
        assert state_of(latest, t.daemon)["state"] == "online"
        h = state_of(latest, t.handover)
        assert h["state"] == "preparing" and "expected" not in h  # O(1): no lists
        await until(lambda: t.progress in latest, what="progress")
        assert state_of(latest, t.progress)["expected"] == ["a", "b", "c"]
        assert {state_of(latest, t.state(n))["state"] for n in "abc"} == {"preparing"}


async def test_killed_daemon_resumes_and_produces_the_same_payload(
    daemon: DaemonProc,
) -> None:
    """SIGKILL after random acknowledgements; nothing acknowledged is lost."""
    url, host = daemon.broker.url, daemon.host_id
    rng = random.Random(1234)
    names = [f"p{i}" for i in range(6)]
    blobs = {n: fragment(i) for i, n in enumerate(names)}
    kills = 0

    async def maybe_kill() -> None:
        nonlocal kills
        if rng.random() < 0.35:
            kills += 1
            assert daemon.kill() == -signal.SIGKILL
            await asyncio.to_thread(daemon.start)

    async with RawClient(url, host) as op:
        for i, n in enumerate(names):
            async with RawClient(url, host, n) as c:
                assert (await c.register(COMPAT, i))["ok"]
            await maybe_kill()
        begun = await op.op(ControlOp.BEGIN, {"deadline": 120})
        handover_id = begun["data"]["handover"]["id"]
        await maybe_kill()
        for n in names:
            async with RawClient(url, host, n) as c:
                assert (await c.op(ParticipantOp.FRAGMENT, blobs[n]))["ok"]
            await maybe_kill()
        for n in names:
            async with RawClient(url, host, n) as c:
                reply = await c.op(ParticipantOp.FROZEN)
                assert reply["ok"], reply
            if n != names[-1]:
                await maybe_kill()
        status = (await op.op(ControlOp.STATUS))["data"]
    assert kills >= 2, "the seed must exercise at least two crashes"
    assert status["handover"]["state"] == "committed"
    assert status["handover"]["id"] == handover_id
    image = (daemon.state_dir / "payload.kho").read_bytes()
    expected = layout(
        handover_id,
        [
            PayloadEntry(n, COMPAT, i, blobs[n], hashlib.sha256(blobs[n]).digest())
            for i, n in enumerate(names)
        ],
    ).image
    assert image == expected
    parsed = PayloadImage.parse(image)
    assert [parsed.retrieve(n) for n in names] == [blobs[n] for n in names]


async def test_sigterm_stops_cleanly_and_keeps_state(daemon: DaemonProc) -> None:
    url, host = daemon.broker.url, daemon.host_id
    async with RawClient(url, host, "keep") as c:
        assert (await c.register(COMPAT, 1))["ok"]
    async with watcher(url, Topics(host).daemon) as latest:
        assert await asyncio.to_thread(daemon.stop) == 0
        await until(
            lambda: state_of(latest, Topics(host).daemon).get("state") == "offline",
            what="daemon offline",
        )
    daemon.stop()
    with Store(daemon.state_dir) as store:
        assert store.load_participants()["keep"]["state"] == "registered"
    await asyncio.to_thread(daemon.start)
    async with RawClient(url, host) as op:
        names = [p["name"] for p in (await op.op(ControlOp.STATUS))["data"]["participants"]]
    assert names == ["keep"]


async def test_crash_publishes_the_will(daemon: DaemonProc) -> None:
    topic = Topics(daemon.host_id).daemon
    async with watcher(daemon.broker.url, topic) as latest:
        await until(lambda: state_of(latest, topic).get("state") == "online", what="online")
        daemon.kill()
        await until(lambda: state_of(latest, topic).get("state") == "offline", what="will")


async def test_broker_restart_costs_no_state(daemon: DaemonProc) -> None:
    url, host = daemon.broker.url, daemon.host_id
    t = Topics(host)
    async with RawClient(url, host, "a") as a, RawClient(url, host, "b") as b:
        await a.register(COMPAT, 0)
        await b.register(COMPAT, 1)
        async with RawClient(url, host) as op:
            await op.op(ControlOp.BEGIN, {"deadline": 120})
        assert (await a.op(ParticipantOp.FRAGMENT, fragment(0)))["ok"]
        # The broker keeps nothing: its retained state is gone with it.
        await asyncio.to_thread(daemon.broker.restart)
        # The request path survives: the client and the daemon both reconnect.
        assert (await b.op(ParticipantOp.FRAGMENT, fragment(1)))["ok"]
        async with watcher(url, t.handover, t.state("a")) as latest:
            # ... and the daemon has published its retained state again.
            await until(lambda: t.handover in latest and t.state("a") in latest, what="retained")
            assert state_of(latest, t.handover)["state"] == "freezing"
            assert state_of(latest, t.state("a"))["state"] == "serialized"
        for c in (a, b):
            assert (await c.op(ParticipantOp.FROZEN))["ok"]
    assert PayloadImage.from_file(daemon.state_dir / "payload.kho").retrieve("a") == fragment(0)


def _notify_socket(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(20)
    return sock


def _read_notifications(sock: socket.socket, until_field: str) -> list[str]:
    seen: list[str] = []
    while until_field not in seen:
        seen += sock.recv(4096).decode().split("\n")
    return seen


def test_systemd_notify_ready_watchdog_stopping(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    sock = _notify_socket(tmp_path)
    d = daemon_factory(NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="200000")
    with sock:
        d.start(wait=False)
        seen = _read_notifications(sock, "READY=1")
        assert any(f.startswith("STATUS=khod") for f in seen)
        assert "WATCHDOG=1" in _read_notifications(sock, "WATCHDOG=1")
        d.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert "STOPPING=1" in _read_notifications(sock, "STOPPING=1")
    assert d.stop() == 0


@pytest.mark.parametrize(
    ("env", "config", "message"),
    [
        ({"KHOD_BROKER": "http://nope"}, None, "broker URL"),
        ({"KHOD_MAX_FRAGMENT_SIZE": "12"}, None, "max_fragment_size"),
        ({"KHOD_HOST_ID": "a/b"}, None, "host id"),
        ({}, "handover_deadline = 'soon'\n", "handover_deadline"),
        ({}, "no_such_key = 1\n", "no_such_key"),
        ({}, "this is not toml\n", "not valid TOML"),
        ({"KHOD_BACKEND": "exec"}, None, "exec_command"),
    ],
)
def test_bad_config_is_exit_2_with_a_clear_message(
    tmp_path: Path, env: dict[str, str], config: str | None, message: str
) -> None:
    argv = [sys.executable, "-m", "khod.cli", "run"]
    if config is not None:
        (tmp_path / "khod.toml").write_text(config)
        argv += ["--config", str(tmp_path / "khod.toml")]
    full_env = {**os.environ, "KHOD_STATE_DIR": str(tmp_path / "s"), **env}
    full_env.pop("KHOD_CONFIG", None)
    r = subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert not (tmp_path / "s" / "khod.db").exists(), "a refused config must change nothing"


def test_second_daemon_on_the_same_state_dir_is_refused(daemon: DaemonProc) -> None:
    env = daemon.env
    r = subprocess.run(
        [sys.executable, "-m", "khod.cli", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert "another khod is running" in r.stderr


async def test_hostile_requests_get_clear_errors_and_change_nothing(daemon: DaemonProc) -> None:
    url, host = daemon.broker.url, daemon.host_id
    t = Topics(host)
    async with RawClient(url, host, "a") as a, RawClient(url, host) as op:
        before = (await op.op(ControlOp.STATUS))["data"]
        cases: list[tuple[str, bytes, str]] = [
            (t.request("a", ParticipantOp.REGISTER), b"{not json", "bad-request"),
            (t.request("a", ParticipantOp.REGISTER), b'{"compatible": 5}', "bad-request"),
            (
                t.request("a", ParticipantOp.REGISTER),
                b'{"compatible": "x,y", "instance": 1, "bogus": 1}',
                "bad-request",
            ),
            (
                t.request("a", ParticipantOp.REGISTER),
                b'{"protocol": 99, "compatible": "x,y", "instance": 1}',
                "bad-request",
            ),
            (t.request("a", ParticipantOp.REGISTER), b"x" * 70000, "bad-request"),
            (t.request("a", ParticipantOp.FROZEN), b"", "unknown-participant"),
            (f"{t.prefix}/p/a/req/explode", b"{}", "bad-request"),
            (
                t.request("a", ParticipantOp.REGISTER),
                b'{"compatible": "x,y", "instance": "has space"}',
                "bad-registration",
            ),
        ]
        for topic, body, code in cases:
            payload, _ = await a.raw(topic, body)
            reply = json.loads(payload)
            assert not reply["ok"] and reply["error"]["code"] == code, (topic, body, reply)
            assert reply["error"]["message"]
        async with RawClient(url, host, "a") as a2:
            frag, _ = await a2.raw(t.request("a", ParticipantOp.FRAGMENT), b"\0" * 100, "x")
        assert json.loads(frag)["error"]["code"] in ("unknown-participant", "busy")
        # Another participant's reply topic is refused: no reply, no effect.
        conn = a.conn
        await conn.publish(
            t.request("a", ParticipantOp.REGISTER),
            b'{"compatible": "x,y", "instance": 3}',
            content_type=JSON,
            response_topic=t.reply("b"),
            correlation=b"steer",
        )
        await asyncio.sleep(0.3)
        after = (await op.op(ControlOp.STATUS))["data"]
    before["handover"].pop("updated_at")
    after["handover"].pop("updated_at")
    assert after == before
    assert daemon.proc is not None and daemon.proc.poll() is None, "the daemon must survive"


async def test_stale_retained_state_is_cleared(daemon: DaemonProc) -> None:
    url, t = daemon.broker.url, Topics(daemon.host_id)
    async with RawClient(url, daemon.host_id) as op:
        await op.conn.publish(t.state("ghost"), b'{"state": "frozen"}', retain=True)
    async with watcher(url, t.state("ghost")) as latest:
        await asyncio.sleep(0.5)
        assert not latest.get(t.state("ghost")), "a ghost participant's state must be cleared"


async def _handover_of_one(d: DaemonProc) -> dict[str, object]:
    url, host = d.broker.url, d.host_id
    async with RawClient(url, host, "solo") as c, RawClient(url, host) as op:
        assert (await c.register(COMPAT, 0))["ok"]
        assert (await op.op(ControlOp.BEGIN, {"deadline": 60}))["ok"]
        assert (await c.op(ParticipantOp.FRAGMENT, fragment(0)))["ok"]
        reply = await c.op(ParticipantOp.FROZEN)
        assert reply["ok"], reply
        return reply["data"]["handover"]  # type: ignore[no-any-return]


async def test_exec_backend_runs_the_operators_command_on_the_image(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    copy = tmp_path / "handed-to-kexec.kho"
    command = json.dumps(["sh", "-c", f'cp "$0" {copy}', "{image}"])
    d = daemon_factory(KHOD_BACKEND="exec", KHOD_EXEC_COMMAND=command)
    await asyncio.to_thread(d.start)
    handover = await _handover_of_one(d)
    assert handover["state"] == "committed"
    assert copy.read_bytes() == (d.state_dir / "payload.kho").read_bytes()
    assert PayloadImage.from_file(copy).retrieve("solo") == fragment(0)


async def test_a_failing_commit_command_aborts_the_handover(daemon_factory: DaemonFactory) -> None:
    command = json.dumps(["sh", "-c", "echo kexec refused: no memory >&2; exit 3"])
    d = daemon_factory(KHOD_BACKEND="exec", KHOD_EXEC_COMMAND=command)
    await asyncio.to_thread(d.start)
    handover = await _handover_of_one(d)
    assert handover["state"] == "idle"
    reason = str(handover["abort_reason"])
    assert reason.startswith("commit failed") and "kexec refused: no memory" in reason
    assert not (d.state_dir / "payload.kho").exists(), "an aborted payload must not stay"
    async with RawClient(d.broker.url, d.host_id) as op:
        status = (await op.op(ControlOp.STATUS))["data"]
    assert [p["state"] for p in status["participants"]] == ["registered"]


async def test_after_a_kexec_the_committed_payload_is_restored_from_the_state_dir(
    daemon: DaemonProc,
) -> None:
    await _handover_of_one(daemon)
    # Restarted in the same boot: still committed, nothing to restore.
    daemon.stop()
    await asyncio.to_thread(daemon.start)
    async with RawClient(daemon.broker.url, daemon.host_id) as op:
        assert (await op.op(ControlOp.STATUS))["data"]["handover"]["state"] == "committed"
    daemon.stop()
    # The same state directory after a kexec: another boot id.
    with Store(daemon.state_dir) as store:
        store.set_meta("boot_id", "a-previous-boot")
    await asyncio.to_thread(daemon.start)
    async with RawClient(daemon.broker.url, daemon.host_id, "solo") as c:
        assert await c.op(ParticipantOp.RETRIEVE) == fragment(0)
        finished = await c.op(ParticipantOp.FINISH)
    assert finished["data"]["handover"]["side"] == "incoming"
    assert finished["data"]["handover"]["state"] == "released"


async def test_a_wildcard_reply_topic_is_refused_and_the_daemon_lives_on(
    daemon: DaemonProc,
) -> None:
    t = Topics(daemon.host_id)
    async with RawClient(daemon.broker.url, daemon.host_id) as op:
        for bad in (t.control_reply("+"), t.control_reply("#"), t.control_reply("a/b")):
            await op.conn.publish(
                t.control(ControlOp.STATUS),
                b"{}",
                content_type=JSON,
                response_topic=bad,
                correlation=b"wild",
            )
        await asyncio.sleep(0.3)
        assert (await op.op(ControlOp.STATUS))["ok"]
    assert daemon.proc is not None and daemon.proc.poll() is None


async def test_a_hung_commit_command_is_killed_at_the_deadline(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    marker = tmp_path / "still-running"
    command = json.dumps(["sh", "-c", f"sleep 30; touch {marker}"])
    d = daemon_factory(KHOD_BACKEND="exec", KHOD_EXEC_COMMAND=command)
    await asyncio.to_thread(d.start)
    url, host = d.broker.url, d.host_id
    async with RawClient(url, host, "solo") as c, RawClient(url, host) as op:
        await c.register(COMPAT, 0)
        await op.op(ControlOp.BEGIN, {"deadline": 2})
        await c.op(ParticipantOp.FRAGMENT, fragment(0))
        reply = await c.op(ParticipantOp.FROZEN)
    handover = reply["data"]["handover"]
    assert handover["state"] == "idle"
    # The commit runs beside the request path: the handover's deadline or the
    # command's own timeout (the time left until it), whichever is seen first.
    reason = handover["abort_reason"]
    assert "did not finish within" in reason or reason == "deadline passed in frozen"
    assert not (d.state_dir / "payload.kho").exists()
    d.stop()
    assert not marker.exists()


async def test_an_explicit_gone_is_done_when_acknowledged(daemon: DaemonProc) -> None:
    async with RawClient(daemon.broker.url, daemon.host_id, "leaving") as c:
        await c.register(COMPAT, 0)
        assert (await c.op(ParticipantOp.GONE))["ok"]
    daemon.kill()  # no grace period to survive: it was acknowledged
    with Store(daemon.state_dir) as store:
        assert "leaving" not in store.load_participants()


async def test_a_request_nobody_waits_for_is_not_run_later(daemon: DaemonProc) -> None:
    daemon.stop()
    async with RawClient(daemon.broker.url, daemon.host_id, "late") as c:
        from khod_wire.errors import RequestTimeout

        with pytest.raises(RequestTimeout):
            await c.conn.request(
                Topics(daemon.host_id).request("late", ParticipantOp.REGISTER),
                json.dumps({"compatible": COMPAT, "instance": 5}).encode(),
                content_type=JSON,
                timeout=1.0,
            )
        await asyncio.sleep(1.5)  # past the request's expiry
        await asyncio.to_thread(daemon.start)
        await asyncio.sleep(0.5)
    async with RawClient(daemon.broker.url, daemon.host_id) as op:
        assert (await op.op(ControlOp.STATUS))["data"]["participants"] == []


async def test_retrieve_of_a_name_without_a_fragment_is_unknown(
    daemon: DaemonProc, daemon_factory: DaemonFactory
) -> None:
    await _handover_of_one(daemon)
    daemon.stop()
    incoming = daemon_factory("incoming")
    await asyncio.to_thread(incoming.start, restore=daemon.state_dir / "payload.kho")
    async with RawClient(incoming.broker.url, incoming.host_id, "stranger") as c:
        reply = await c.op(ParticipantOp.RETRIEVE)
    assert reply["error"]["code"] == "unknown-participant"


def test_a_lost_incoming_payload_does_not_block_the_next_handover(
    daemon: DaemonProc, tmp_path: Path
) -> None:
    asyncio.run(_handover_of_one(daemon))
    daemon.stop()
    (daemon.state_dir / "payload.kho").unlink()  # e.g. a payload_dir on tmpfs
    with Store(daemon.state_dir) as store:
        store.set_meta("boot_id", "a-previous-boot")
    daemon.start()

    async def status() -> dict[str, object]:
        async with RawClient(daemon.broker.url, daemon.host_id) as op:
            return (await op.op(ControlOp.STATUS))["data"]  # type: ignore[no-any-return]

    data = asyncio.run(status())
    assert data["handover"]["side"] == "outgoing"  # type: ignore[index]
    assert data["handover"]["state"] == "idle"  # type: ignore[index]
    daemon.stop()
    with Store(daemon.state_dir) as store:
        last = store.transitions("restore")[-1]
    assert last.to_state == "failed" and "payload.kho" in last.detail
    # Asked for explicitly, a missing image is the operator's error: exit 2.
    argv = [sys.executable, "-m", "khod.cli", "run", "--restore", str(tmp_path / "nope.kho")]
    r = subprocess.run(argv, env=daemon.env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "cannot restore" in r.stderr


async def test_restore_is_not_repeated_by_a_stale_restore_flag(
    daemon: DaemonProc, daemon_factory: DaemonFactory
) -> None:
    await _handover_of_one(daemon)
    daemon.stop()
    image = daemon.state_dir / "payload.kho"
    incoming = daemon_factory("incoming")
    await asyncio.to_thread(incoming.start, restore=image)
    url, host = incoming.broker.url, incoming.host_id
    async with RawClient(url, host, "solo") as c, RawClient(url, host) as op:
        assert await c.op(ParticipantOp.RETRIEVE) == fragment(0)
        assert (await c.op(ParticipantOp.FINISH))["ok"]
        # This boot's next handover begins.
        assert (await c.register(COMPAT, 0))["ok"]
        assert (await op.op(ControlOp.BEGIN, {"deadline": 60}))["ok"]
    # The unit still says --restore: a restart must not restore (and wipe) again.
    incoming.stop()
    await asyncio.to_thread(incoming.start)
    async with RawClient(url, host) as op:
        status = (await op.op(ControlOp.STATUS))["data"]
    assert status["handover"]["side"] == "outgoing"
    assert status["handover"]["state"] == "preparing"
    assert [p["name"] for p in status["participants"]] == ["solo"]


async def test_the_manifest_describes_the_committed_image_once_the_blackout_is_over(
    daemon: DaemonProc,
) -> None:
    image_path = daemon.state_dir / "payload.kho"
    described = image_path.with_suffix(".json")
    described.write_text('{"handover_id": "an older one"}')
    url, host = daemon.broker.url, daemon.host_id
    async with RawClient(url, host, "a") as a, RawClient(url, host) as op:
        await a.register(COMPAT, 0)
        await op.op(ControlOp.BEGIN, {"deadline": 60})
        await a.op(ParticipantOp.FRAGMENT, fragment(0))
        reply = await a.op(ParticipantOp.FROZEN)
    assert reply["data"]["handover"]["state"] == "committed"

    def written() -> bool:
        try:
            return "older" not in described.read_text()
        except FileNotFoundError:
            return False

    await until(written, what="the manifest")
    manifest = json.loads(described.read_text())
    image = PayloadImage.from_file(image_path)
    assert manifest["handover_id"] == image.handover_id == reply["data"]["handover"]["id"]
    assert [p["name"] for p in manifest["participants"]] == [e.name for e in image.entries]
    assert manifest["root_sha256"] == reply["data"]["handover"]["payload"]["root_sha256"]
