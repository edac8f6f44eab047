"""The operator commands as an operator runs them: ``khod ...`` processes against a real daemon.

Participants are played by raw MQTT v5 requests (``khod_wire.transport.Connection``),
so these tests depend on the wire contract only, not on the SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from khod.broker import PrivateBroker
from khod_wire.fragment import start_storage
from khod_wire.protocol import (
    DTB,
    JSON,
    ParticipantOp,
    RegisterRequest,
    Reply,
    Topics,
    encode,
)
from khod_wire.transport import Connection, client_id
from khod_wire.urls import BrokerURL

if TYPE_CHECKING:
    from tests.daemonproc import DaemonProc

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    rc: int
    out: str
    err: str
    seconds: float


def cli_env(broker_url: str, host: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KHOD_")}
    env.update(KHOD_BROKER=broker_url, KHOD_HOST_ID=host)
    return env


async def khod(*args: str, env: dict[str, str], timeout: float = 30.0) -> Run:
    """``khod <args>`` as a child process; its exit status and output."""
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "khod.cli",
        *args,
        env=env,
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(
            f"khod {' '.join(args)} still running after {timeout}s: {out!r}"
        ) from None
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode(), time.monotonic() - start)


class Monitor:
    """``khod monitor --exit-when-done`` in the background (its output is not a tty)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.lines: list[str] = []

    async def start(self) -> Monitor:
        self.proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "khod.cli", "monitor", "--exit-when-done"),
            env=self.env,
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        # Its first line means it is subscribed and has seen the retained state.
        await asyncio.wait_for(self._line(), 20)
        return self

    async def _line(self) -> str:
        assert self.proc.stdout is not None
        line = (await self.proc.stdout.readline()).decode()
        if line:
            self.lines.append(line.rstrip("\n"))
        return line

    async def wait(self, timeout: float = 60) -> Run:
        async with asyncio.timeout(timeout):
            while await self._line():
                pass
            err = await self.proc.stderr.read() if self.proc.stderr else b""
            rc = await self.proc.wait()
        return Run(rc, "\n".join(self.lines), err.decode(), 0.0)

    def running(self) -> bool:
        return self.proc.returncode is None


class RawParticipant:
    """A participant speaking the wire contract by hand."""

    def __init__(self, url: str, host: str, name: str, instance: int) -> None:
        self.name, self.instance, self.compatible = name, instance, f"test,{name}"
        self.topics = Topics(host)
        self.conn = Connection(BrokerURL.parse(url), identifier=client_id(f"p-{name}"))
        self.conn.reply_topic = self.topics.reply(name)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RawParticipant:
        self.task = asyncio.create_task(self.conn.run())
        await self.conn.wait_connected(10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def raw(self, op: ParticipantOp, body: bytes = b"", ctype: str = JSON) -> bytes:
        m = await self.conn.request(
            self.topics.request(self.name, op), body, content_type=ctype, timeout=10
        )
        assert isinstance(m.payload, bytes)
        return m.payload

    async def request(self, op: ParticipantOp, body: bytes = b"", ctype: str = JSON) -> Reply:
        reply = Reply.model_validate_json(await self.raw(op, body, ctype))
        assert reply.ok, reply.error
        return reply

    async def register(self) -> Reply:
        body = encode(RegisterRequest(compatible=self.compatible, instance=self.instance))
        return await self.request(ParticipantOp.REGISTER, body)

    async def submit(self) -> Reply:
        blob = start_storage(self.compatible, self.instance).finish_storage()
        return await self.request(ParticipantOp.FRAGMENT, blob, DTB)

    async def frozen(self) -> Reply:
        return await self.request(ParticipantOp.FROZEN)


@contextlib.asynccontextmanager
async def participants(
    d: DaemonProc, *names: str, register: bool = True
) -> AsyncIterator[list[RawParticipant]]:
    ps = [RawParticipant(d.broker.url, d.host_id, n, i) for i, n in enumerate(names)]
    for p in ps:
        await p.__aenter__()
        if register:
            await p.register()
    try:
        yield ps
    finally:
        for p in ps:
            await p.__aexit__()


@pytest.fixture
def env(daemon: DaemonProc) -> dict[str, str]:
    return cli_env(daemon.broker.url, daemon.host_id)


async def status(env: dict[str, str]) -> dict[str, Any]:
    r = await khod("status", "--json", env=env)
    assert r.rc == 0, r.err
    data: dict[str, Any] = json.loads(r.out)
    return data


# -- the commands against a daemon -----------------------------------------------------


async def test_status_json_on_an_idle_daemon(env: dict[str, str], daemon: DaemonProc) -> None:
    data = await status(env)
    assert data["handover"]["state"] == "idle"
    assert data["handover"]["id"] is None
    assert data["participants"] == []
    assert data["daemon"]["side"] == "outgoing"
    r = await khod("status", env=env)
    assert r.rc == 0, r.err
    assert f"host {daemon.host_id}" in r.out and "idle" in r.out
    assert "no participant registered" in r.out


async def test_begin_with_no_participant_is_refused(env: dict[str, str]) -> None:
    r = await khod("begin", env=env)
    assert r.rc == 1
    assert r.err.startswith("khod: ")
    assert "no participant is registered" in r.err
    assert (await status(env))["handover"]["state"] == "idle"


async def test_begin_freeze_force_abort(env: dict[str, str], daemon: DaemonProc) -> None:
    async with participants(daemon, "a", "b", "c") as (a, _b, _c):
        r = await khod("begin", "--expect", "a", "b", "--deadline", "120", env=env)
        assert r.rc == 0, r.err
        data = await status(env)
        hid = data["handover"]["id"]
        assert hid and hid in r.out
        assert "expecting 2 participants: a, b" in r.out
        assert "deadline:" in r.out
        await a.submit()

        # Not everyone is serialized: a plain freeze is refused and says who is missing.
        r = await khod("freeze", env=env)
        assert r.rc == 1
        assert "khod: " in r.err and "b" in r.err.split("not serialized yet:")[1]

        r = await khod("status", env=env)
        assert r.rc == 0, r.err
        assert f"handover {hid} preparing" in r.out
        assert "waiting for: b" in r.out
        rows = {line.split()[0]: line for line in r.out.splitlines() if line[:2] in ("a ", "b ")}
        assert "serialized" in rows["a"] and "test,a" in rows["a"]
        assert "preparing" in rows["b"]

        r = await khod("freeze", "--force", env=env)
        assert r.rc == 0, r.err
        assert "left out: b" in r.out and "freezing" in r.out
        data = await status(env)
        assert data["handover"]["state"] == "freezing"
        assert data["handover"]["left_out"] == ["b"]

        r = await khod("status", env=env)
        assert "waiting for: a" in r.out  # to report frozen, now

        r = await khod("monitor", "--once", env=env)
        assert r.rc == 0, r.err
        assert f"handover {hid} freezing" in r.out
        assert "waiting for a" in r.out
        assert "left out b" in r.out
        for name in ("a", "b", "c"):
            assert any(line.startswith(f"{name} ") for line in r.out.splitlines()), r.out

        r = await khod("abort", "--reason", "x", env=env)
        assert r.rc == 0, r.err
        assert "aborted (x)" in r.out
        data = await status(env)
        assert data["handover"]["state"] == "idle"
        assert data["handover"]["abort_reason"] == "x"
        assert {p["name"]: p["state"] for p in data["participants"]} == dict.fromkeys(
            "abc", "registered"
        )
        r = await khod("status", env=env)
        assert "aborted: x" in r.out

        # Nothing to freeze or abort any more: refused with the daemon's code.
        r = await khod("abort", env=env)
        assert r.rc == 1 and r.err.startswith("khod: illegal-transition: ")


async def test_monitor_exits_when_the_handover_commits(
    env: dict[str, str], daemon: DaemonProc
) -> None:
    async with participants(daemon, "a", "b") as (a, b):
        mon = await Monitor(env).start()
        assert "idle" in mon.lines[0]
        await asyncio.sleep(0.5)
        assert mon.running()  # it is waiting on an idle host
        r = await khod("begin", env=env)
        assert r.rc == 0, r.err
        await a.submit()
        await b.submit()  # everyone serialized: the freeze starts by itself
        await a.frozen()
        await b.frozen()  # its reply waits for the commit
        run = await mon.wait()
        assert run.rc == 0, run.err
        last = run.out.strip().splitlines()[-1]
        assert "committed" in last and "frozen 2/2" in last and "blackout" in last
        assert (await status(env))["handover"]["state"] == "committed"


async def test_monitor_exits_1_when_the_handover_aborts(
    env: dict[str, str], daemon: DaemonProc
) -> None:
    async with participants(daemon, "a"):
        r = await khod("begin", env=env)
        assert r.rc == 0, r.err
        mon = await Monitor(env).start()
        assert "preparing" in mon.lines[0]
        r = await khod("abort", "--reason", "changed my mind", env=env)
        assert r.rc == 0, r.err
        run = await mon.wait()
        assert run.rc == 1, run.err
        assert "aborted: changed my mind" in run.out


async def test_monitor_follows_the_restore_after_the_kexec(
    daemon_factory: Any, daemon: DaemonProc
) -> None:
    env = cli_env(daemon.broker.url, daemon.host_id)
    async with participants(daemon, "a", "b") as (a, b):
        assert (await khod("begin", env=env)).rc == 0
        await a.submit()
        await b.submit()
        await a.frozen()
        await b.frozen()
    daemon.stop()
    # The next kernel's khod: a fresh state directory, the committed image.
    nxt = daemon_factory("next")
    await asyncio.to_thread(nxt.start, restore=daemon.state_dir / "payload.kho")
    r = await khod("monitor", "--once", env=env)
    assert r.rc == 0, r.err
    assert "restoring" in r.out and "available" in r.out and "0/2" in r.out
    mon = await Monitor(env).start()
    assert "restore" in mon.lines[0] and "available 2/2" in mon.lines[0]
    async with participants(nxt, "a", "b", register=False) as (a, b):
        for p in (a, b):
            blob = await p.raw(ParticipantOp.RETRIEVE)
            assert blob == start_storage(p.compatible, p.instance).finish_storage()
        r = await khod("status", env=env)
        assert "restore " in r.out and "waiting for: a, b" in r.out
        await a.request(ParticipantOp.FINISH)
        await b.request(ParticipantOp.FINISH)
        run = await mon.wait()
    assert run.rc == 0, run.err
    assert "released" in run.out.splitlines()[-1]


# -- failures before the daemon ------------------------------------------------------


async def test_no_daemon_on_the_host_exits_3_within_the_timeout(broker: PrivateBroker) -> None:
    env = cli_env(broker.url, "nobody-" + uuid.uuid4().hex[:8])
    r = await khod("status", "--timeout", "2", env=env)
    assert r.rc == 3
    assert "no answer from the daemon on host nobody-" in r.err
    assert "is `khod run` running?" in r.err
    assert r.seconds < 8  # 2 s of waiting plus the interpreter's start-up

    r = await khod("monitor", "--once", env=env)
    assert r.rc == 0, r.err
    assert "daemon unknown" in r.out


async def test_unreachable_broker_exits_3(tmp_path: Path) -> None:
    env = cli_env(f"unix://{tmp_path}/no.sock", "h")
    for args in (["begin"], ["monitor", "--once"]):
        r = await khod(*args, "--timeout", "1", env=env)
        assert r.rc == 3, args
        assert "cannot reach the broker at unix://" in r.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["status", "--broker", "foo://"], "broker URL 'foo://'"),
        (["begin", "--host-id", "a/b"], "host_id"),
        (["begin", "--deadline", "-1"], "--deadline"),
        (["status", "--timeout", "0"], "--timeout"),
    ],
)
async def test_bad_arguments_exit_2(args: list[str], message: str) -> None:
    r = await khod(*args, env=cli_env("mqtt://127.0.0.1:1", "h"))
    assert r.rc == 2
    assert r.err.startswith("khod: ") and message in r.err
