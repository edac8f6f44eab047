"""The blackout of a live update, against what the broker itself costs.

One command starts a private mosquitto (listening on a Unix socket and on a
loopback TCP port, ``set_tcp_nodelay true``), a few worker processes, and a
fresh ``khod run`` for every handover, then measures:

* **blackout** (freeze signal -> payload durable) for N SDK participants
  spread over the workers, both as the daemon reports it (the committed
  status's ``payload.blackout_s``) and as a monitor sees it (the retained
  handover status turning ``freezing`` -> ``committed``). Every participant
  submits its fragment when the handover begins; the operator's ``freeze``
  follows once all are serialized (``--auto-freeze``: the handover freezes by
  itself as the last fragment arrives, and the window then also holds the
  replies to the fragments that arrived with it);
* the **CPU** each role (daemon, broker, participants) spends inside that
  window, and the floor's, read from /proc at both ends;
* the **floor**, in the same run with the same N and the same workers: a bare
  aiomqtt coordinator publishes one retained QoS 1 broadcast to N plain
  aiomqtt clients, each answers with one QoS 1 publish, the coordinator
  collects N answers and fsyncs a small file;
* **begin -> commit** (and register -> commit) of the whole lifecycle;
* **request latency** of khod ``status`` and ``fragment`` over TCP and over the
  Unix socket, against a bare MQTT v5 request/response echo over each;
* blackout at the largest N with 64-byte and with ~4 KiB fragments;
* the daemon's peak RSS (VmHWM) with 10,000 registered participants.

It prints a table with the issue's targets and writes every figure to JSON.
See BENCHMARKS.md. Usage::

    .venv/bin/python bench/bench_blackout.py [--sizes 10 100 1000] [--rounds 5]
        [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from khod.broker import PrivateBroker, find_mosquitto
from khod_client import Participant
from khod_wire.fragment import start_storage
from khod_wire.protocol import (
    DTB,
    JSON,
    BeginRequest,
    ControlOp,
    FreezeRequest,
    ParticipantOp,
    RegisterRequest,
    Topics,
    encode,
)
from khod_wire.transport import Connection, client_id
from khod_wire.urls import BrokerURL

ROOT = Path(__file__).resolve().parent.parent
COMPATIBLE = "bench,p-v1"
#: Fragment sizes of the fragment scenario: the ``state`` property of "64"
#: is 64 bytes; "4096" fills the fragment up to 4096 bytes (one page, the
#: default ``max_fragment_size``).
SMALL, PAGE = 64, 4096
#: Seconds after the commit for every participant's ``frozen()`` to return.
FROZEN_GRACE = 30.0
#: Size of the fragment that the request benchmark submits again and again.
REQUEST_FRAGMENT = 1024


# -- small helpers -------------------------------------------------------------


def now() -> float:
    return time.perf_counter()


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); with 5 samples p99 is the max."""
    s = sorted(samples)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def summary(samples: Sequence[float]) -> dict[str, Any]:
    if not samples:
        return {"n": 0, "p50": None, "p99": None, "min": None, "max": None, "samples": []}
    return {
        "n": len(samples),
        "p50": percentile(samples, 50),
        "p99": percentile(samples, 99),
        "min": min(samples),
        "max": max(samples),
        "samples": list(samples),
    }


def payload_bytes(m: aiomqtt.Message) -> bytes:
    """A bare aiomqtt message's payload as bytes (paho may hand over other types)."""
    p = m.payload
    if isinstance(p, bytes | bytearray):
        return bytes(p)
    return b"" if p is None else str(p).encode()


def message_props(m: aiomqtt.Message) -> tuple[str | None, str | None, bytes | None]:
    """(content type, response topic, correlation data) of a bare aiomqtt message."""
    p = m.properties
    if p is None:
        return None, None, None
    return (
        getattr(p, "ContentType", None),
        getattr(p, "ResponseTopic", None),
        getattr(p, "CorrelationData", None),
    )


def set_nodelay(client: aiomqtt.Client) -> None:
    """TCP_NODELAY on a plain aiomqtt client's socket (nothing to do on a Unix socket)."""
    paho = getattr(client, "_client", None)
    sock = paho.socket() if paho is not None else None
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def plain_client(url: str, prefix: str) -> aiomqtt.Client:
    u = BrokerURL.parse(url)
    return aiomqtt.Client(
        u.host,
        u.port,
        transport=u.transport,
        identifier=client_id(prefix),
        protocol=aiomqtt.ProtocolVersion.V5,
        keepalive=60,
        timeout=60,
    )


def request_props(response_topic: str, correlation: bytes) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = response_topic
    props.CorrelationData = correlation
    props.ContentType = JSON
    return props


def reply_ok(body: bytes) -> bool:
    """True when a khod reply says ok (read robustly: the protocol is changing)."""
    with contextlib.suppress(ValueError):
        data = json.loads(body)
        return isinstance(data, dict) and data.get("ok") is True
    return False


def fragment(compatible: str, instance: int | str, size: int) -> bytes:
    """A valid fragment: a ``state`` property of ``size`` bytes, or, for ``PAGE``,
    as large as fits in one page."""
    if size < PAGE:
        b = start_storage(compatible, instance, size_hint=size + 256)
        b.property_bytes("state", os.urandom(size))
        return b.finish_storage()
    n = PAGE
    while True:
        b = start_storage(compatible, instance, size_hint=PAGE + 256)
        b.property_bytes("state", os.urandom(n))
        blob = b.finish_storage()
        if len(blob) <= PAGE:
            return blob
        n -= max(4, len(blob) - PAGE)


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        out = subprocess.run([find_mosquitto(), "-h"], capture_output=True, text=True, timeout=10)
        mosq = (out.stdout or out.stderr).splitlines()[0].strip()
    except (OSError, IndexError, subprocess.SubprocessError):
        mosq = "unknown"
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "mosquitto": mosq,
    }


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS of a process, in KiB."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    return out


# -- worker process: many clients in one asyncio loop, driven by JSON lines ----


class CpuMeter:
    """CPU seconds (user + system) used so far by each role: where a window's work went.

    Read from /proc/<pid>/stat at both ends of a window (the monitor reads it
    the moment it sees a state), so a role's figure is the CPU it spent in
    that window, whatever the others were doing.
    """

    TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self) -> None:
        self.roles: dict[str, list[int]] = {}

    def snapshot(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for role, pids in self.roles.items():
            total = 0
            for pid in pids:
                try:
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                except (OSError, IndexError):
                    continue
                total += int(fields[11]) + int(fields[12])  # utime, stime
            out[role] = total / self.TICK
        return out

    @staticmethod
    def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {k: round(after[k] - before.get(k, 0.0), 3) for k in after}


class WorkerState:
    def __init__(self) -> None:
        self.parts: list[Participant] = []
        self.parts_stack: contextlib.AsyncExitStack | None = None
        self.lifecycle: list[asyncio.Task[None]] = []
        #: one per participant, done once its fragment is acknowledged
        self.submitted: list[asyncio.Future[None]] = []
        self.floor_stack: contextlib.AsyncExitStack | None = None
        self.echo_stack: contextlib.AsyncExitStack | None = None


async def gather_limited(calls: Sequence[Callable[[], Awaitable[Any]]], limit: int) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[Any]]) -> Any:
        async with sem:
            return await call()

    return await asyncio.gather(*(one(c) for c in calls))


async def participant_lifecycle(p: Participant, size: int, submitted: asyncio.Future[None]) -> None:
    """What a component does: fragment when the handover begins, frozen when told."""
    await p.wait_for_begin()
    await p.submit(fragment(p.compatible, p.instance, size))
    submitted.set_result(None)
    await p.wait_for_freeze()
    await p.frozen()


async def w_connect(st: WorkerState, cmd: dict[str, Any]) -> dict[str, Any]:
    st.parts_stack = contextlib.AsyncExitStack()
    st.parts = [
        Participant(
            name,
            compatible=COMPATIBLE,
            instance=int(inst),
            broker=cmd["url"],
            host_id=cmd["host"],
            request_timeout=float(cmd["timeout"]),
        )
        for name, inst in zip(cmd["names"], cmd["instances"], strict=True)
    ]
    stack = st.parts_stack
    await gather_limited([partial(stack.enter_async_context, p) for p in st.parts], 32)
    return {"ok": True}


async def w_register(st: WorkerState, cmd: dict[str, Any]) -> dict[str, Any]:
    await asyncio.gather(*(p.register() for p in st.parts))
    size = int(cmd["size"])
    loop = asyncio.get_running_loop()
    st.submitted = [loop.create_future() for _ in st.parts]
    st.lifecycle = [
        asyncio.create_task(participant_lifecycle(p, size, done))
        for p, done in zip(st.parts, st.submitted, strict=True)
    ]
    return {"ok": True}


async def w_await_submitted(st: WorkerState, cmd: dict[str, Any]) -> dict[str, Any]:
    """Until every participant's fragment is acknowledged (each one serialized)."""
    _, pending = await asyncio.wait(st.submitted, timeout=float(cmd["timeout"]))
    return {"ok": not pending, "pending": len(pending)}


async def w_await_frozen(st: WorkerState, cmd: dict[str, Any]) -> dict[str, Any]:
    done, pending = await asyncio.wait(st.lifecycle, timeout=float(cmd["timeout"]))
    for t in pending:
        t.cancel()
    errors = [repr(t.exception()) for t in done if t.exception() is not None]
    return {"ok": not pending and not errors, "pending": len(pending), "errors": errors[:5]}


async def w_close(st: WorkerState, cmd: dict[str, Any]) -> dict[str, Any]:
    for t in st.lifecycle:
        t.cancel()
    await asyncio.gather(*st.lifecycle, return_exceptions=True)
    st.lifecycle = []
    if st.parts_stack is not None:
        await st.parts_stack.aclose()
    st.parts_stack, st.parts = None, []
    return {"ok": True}


async def w_floor_connect(st: WorkerState, cmd: dict[str, Any]) -> dict[str, Any]:
    """Plain aiomqtt clients: on the broadcast, one QoS 1 publish back."""
    st.floor_stack = stack = contextlib.AsyncExitStack()
    go, ack = cmd["go"], cmd["ack"]

    async def answer(c: aiomqtt.Client, idx: int) -> None:
        async for m in c.messages:
            body = payload_bytes(m)
            if body:  # an empty retained message is the clean-up
                await c.publish(ack, body + b":" + str(idx).encode(), qos=1)

    async def one(idx: int) -> None:
        c = plain_client(cmd["url"], "floor")
        await stack.enter_async_context(c)
        set_nodelay(c)
        await c.subscribe(go, qos=1)
        task = asyncio.create_task(answer(c, idx))
        stack.callback(task.cancel)

    await gather_limited([partial(one, i) for i in cmd["indices"]], 32)
    return {"ok": True}


async def w_floor_close(st: WorkerState, cmd: dict[str, Any]) -> dict[str, Any]:
    if st.floor_stack is not None:
        await st.floor_stack.aclose()
    st.floor_stack = None
    return {"ok": True}


async def w_echo(st: WorkerState, cmd: dict[str, Any]) -> dict[str, Any]:
    """A bare MQTT v5 request/response responder."""
    st.echo_stack = stack = contextlib.AsyncExitStack()
    c = plain_client(cmd["url"], "echo")
    await stack.enter_async_context(c)
    set_nodelay(c)
    await c.subscribe(cmd["topic"], qos=1)

    async def serve() -> None:
        async for m in c.messages:
            ctype, reply, corr = message_props(m)
            if reply:
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.CorrelationData = corr or b""
                props.ContentType = ctype or JSON
                await c.publish(reply, payload_bytes(m), qos=1, properties=props)

    task = asyncio.create_task(serve())
    stack.callback(task.cancel)
    return {"ok": True}


async def w_echo_stop(st: WorkerState, cmd: dict[str, Any]) -> dict[str, Any]:
    if st.echo_stack is not None:
        await st.echo_stack.aclose()
    st.echo_stack = None
    return {"ok": True}


async def w_register_raw(st: WorkerState, cmd: dict[str, Any]) -> dict[str, Any]:
    """Register many participants with raw MQTT requests from one connection.

    The connection has no will and leaves with a clean DISCONNECT, so the
    daemon keeps every participant registered.
    """
    topics = Topics(cmd["host"])
    pending: dict[bytes, asyncio.Future[bool]] = {}
    c = plain_client(cmd["url"], "reg")
    errors = 0
    async with c:
        set_nodelay(c)
        await c.subscribe(topics.reply("+"), qos=1)

        async def replies() -> None:
            async for m in c.messages:
                _, _, corr = message_props(m)
                fut = pending.get(corr or b"")
                if fut is not None and not fut.done():
                    fut.set_result(reply_ok(payload_bytes(m)))

        reader = asyncio.create_task(replies())

        deadline = now() + float(cmd.get("budget", math.inf))

        async def one(name: str, inst: int) -> bool | None:
            if now() > deadline:
                return None  # out of time: not sent
            corr = uuid.uuid4().bytes
            fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            pending[corr] = fut
            body = encode(RegisterRequest(compatible="bench,rss-v1", instance=inst))
            await c.publish(
                topics.request(name, ParticipantOp.REGISTER),
                body,
                qos=1,
                properties=request_props(topics.reply(name), corr),
            )
            try:
                return await asyncio.wait_for(fut, float(cmd["timeout"]))
            except TimeoutError:
                return False
            finally:
                pending.pop(corr, None)

        results = await gather_limited(
            [partial(one, n, int(i)) for n, i in zip(cmd["names"], cmd["instances"], strict=True)],
            int(cmd.get("inflight", 32)),
        )
        errors = sum(1 for ok in results if ok is False)
        registered = sum(1 for ok in results if ok)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    return {"ok": errors == 0, "errors": errors, "registered": registered}


WORKER_OPS: dict[str, Callable[[WorkerState, dict[str, Any]], Awaitable[dict[str, Any]]]] = {
    "connect": w_connect,
    "register": w_register,
    "await_frozen": w_await_frozen,
    "await_submitted": w_await_submitted,
    "close": w_close,
    "floor_connect": w_floor_connect,
    "floor_close": w_floor_close,
    "echo": w_echo,
    "echo_stop": w_echo_stop,
    "register_raw": w_register_raw,
}


async def worker_main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    st = WorkerState()
    while line := await reader.readline():
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            break
        try:
            out = await WORKER_OPS[cmd["op"]](st, cmd)
        except Exception as exc:
            out = {"ok": False, "error": repr(exc)}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    for op in ("close", "floor_close", "echo_stop"):
        with contextlib.suppress(Exception):
            await WORKER_OPS[op](st, {})


class Worker:
    """A worker process, from the coordinator's side."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, log: Path) -> Worker:
        with log.open("ab") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--worker",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                cwd=ROOT,
                limit=1 << 24,
            )
        return cls(proc)

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}).encode() + b"\n")
        await self.proc.stdin.drain()
        line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.pid} exited during {op!r}")
        out: dict[str, Any] = json.loads(line)
        return out

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.write(b'{"op": "exit"}\n')
            await self.proc.stdin.drain()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def call_all(workers: Sequence[Worker], op: str, per: Sequence[dict[str, Any]]) -> None:
    outs = await asyncio.gather(*(w.call(op, **a) for w, a in zip(workers, per, strict=True)))
    bad = [o for o in outs if not o.get("ok")]
    if bad:
        raise RuntimeError(f"{op}: {bad[0]}")


def split(items: Sequence[int], k: int) -> list[list[int]]:
    """Round-robin ``items`` over ``k`` lists."""
    return [list(items[i::k]) for i in range(k)]


# -- the coordinator -------------------------------------------------------------


class RoundTimeout(Exception):
    """A handover that did not commit within ``--round-timeout``."""


@dataclass
class HostSeen:
    """What the monitor saw of one host (one daemon, one handover)."""

    online: asyncio.Event = field(default_factory=asyncio.Event)
    committed: asyncio.Event = field(default_factory=asyncio.Event)
    first: dict[str, float] = field(default_factory=dict)
    payload: dict[str, Any] | None = None
    ids: set[str] = field(default_factory=set)
    #: CPU seconds per role, read when each state was first seen
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)


#: Handover states after the freeze signal: the first one seen starts the
#: external blackout clock (normally ``freezing``).
AFTER_FREEZE = ("freezing", "frozen", "assembled", "committed")


class Monitor:
    """A plain client on the Unix socket that timestamps every daemon and handover status."""

    def __init__(self, url: str, meter: CpuMeter) -> None:
        self.url = url
        self.meter = meter
        self.hosts: dict[str, HostSeen] = {}
        self._stack = contextlib.AsyncExitStack()

    def host(self, host: str) -> HostSeen:
        return self.hosts.setdefault(host, HostSeen())

    async def start(self) -> None:
        c = plain_client(self.url, "monitor")
        await self._stack.enter_async_context(c)
        wild = Topics("+")
        await c.subscribe(wild.daemon, qos=1)
        await c.subscribe(wild.handover, qos=1)
        task = asyncio.create_task(self._read(c))
        self._stack.callback(task.cancel)

    async def close(self) -> None:
        await self._stack.aclose()

    async def _read(self, c: aiomqtt.Client) -> None:
        async for m in c.messages:
            t = now()
            levels = m.topic.value.split("/")
            if len(levels) < 2:
                continue
            kind, host = levels[-1], levels[-2]
            try:
                data = json.loads(payload_bytes(m))
            except ValueError:
                continue
            if not isinstance(data, dict):
                continue
            seen = self.host(host)
            state = data.get("state")
            if kind == "daemon" and state == "online":
                seen.online.set()
            elif kind == "handover" and isinstance(state, str):
                if isinstance(data.get("id"), str):
                    seen.ids.add(data["id"])
                if state not in seen.first:
                    seen.first[state] = t
                    seen.cpu[state] = self.meter.snapshot()
                if state == "committed":
                    p = data.get("payload")
                    seen.payload = p if isinstance(p, dict) else {}
                    seen.committed.set()


class Daemon:
    """A fresh ``khod run`` (own host id and state directory) per handover."""

    def __init__(self, url: str, host: str, workdir: Path) -> None:
        self.url, self.host = url, host
        self.state = workdir / f"state-{host}"
        self.log = workdir / f"daemon-{host}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, monitor: Monitor, timeout: float = 60) -> None:
        self.proc = self._spawn()
        try:
            await asyncio.wait_for(monitor.host(self.host).online.wait(), timeout)
        except TimeoutError:
            raise RuntimeError(
                f"khod run did not come online: {self.log.read_text(errors='replace')[-2000:]}"
            ) from None

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env.pop("KHOD_CONFIG", None)
        env.update(
            KHOD_BROKER=self.url,
            KHOD_HOST_ID=self.host,
            KHOD_STATE_DIR=str(self.state),
            KHOD_LOG_LEVEL="WARNING",
        )
        with self.log.open("ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "khod.cli", "run"],
                env=env,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
            )

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)


@contextlib.asynccontextmanager
async def running(conn: Connection) -> AsyncIterator[Connection]:
    task = asyncio.create_task(conn.run())
    await conn.wait_connected(30)
    try:
        yield conn
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def operator(url: str, host: str) -> Connection:
    """An operator connection through khod's own transport (as the CLI uses)."""
    conn = Connection(BrokerURL.parse(url), identifier=client_id("bench-op"))
    conn.reply_topic = Topics(host).control_reply(conn.identifier)
    return conn


async def control(op: Connection, host: str, which: ControlOp, body: bytes) -> None:
    m = await op.request(Topics(host).control(which), body, content_type=JSON, timeout=60)
    if not reply_ok(m.payload):
        raise RuntimeError(f"{which} refused: {m.payload[:500]!r}")


@dataclass
class Bench:
    args: argparse.Namespace
    broker: PrivateBroker
    workdir: Path
    monitor: Monitor
    workers: list[Worker]
    log: Callable[[str], None]

    @property
    def url(self) -> str:
        """Where the daemon and the participants (and the floor) connect."""
        return self.broker.tcp_url if self.args.transport == "tcp" else self.broker.unix_url

    def host_id(self, what: str) -> str:
        return f"b{what}-{uuid.uuid4().hex[:6]}"

    def layout(self, n: int) -> list[list[int]]:
        return [s for s in split(range(n), min(self.args.workers, n)) if s]

    # -- one handover of N SDK participants --------------------------------------

    async def khod_round(self, n: int, size: int) -> dict[str, Any]:
        host = self.host_id(f"{n}")
        shares = self.layout(n)
        ws = self.workers[: len(shares)]
        daemon = Daemon(self.url, host, self.workdir)
        timeout = float(self.args.round_timeout)
        phases: dict[str, float] = {}
        t0 = now()
        await daemon.start(self.monitor)
        phases["daemon_start_s"] = now() - t0
        meter = self.monitor.meter
        meter.roles["daemon"] = [daemon.proc.pid] if daemon.proc else []
        try:
            t0 = now()
            await call_all(
                ws,
                "connect",
                [
                    {
                        "url": self.url,
                        "host": host,
                        "names": [f"p{i:05d}" for i in s],
                        "instances": s,
                        "timeout": timeout,
                    }
                    for s in shares
                ],
            )
            t_reg = now()
            phases["connect_s"] = t_reg - t0
            await call_all(ws, "register", [{"size": size}] * len(ws))
            seen = self.monitor.host(host)
            async with running(operator(self.url, host)) as op:
                t_begin = now()
                auto = bool(self.args.auto_freeze)
                await control(
                    op,
                    host,
                    ControlOp.BEGIN,
                    encode(BeginRequest(deadline=3600, auto_freeze=auto)),
                )
                if not auto:
                    # The operator's freeze once every participant is
                    # serialized: the window holds the blackout alone, not
                    # the replies to N fragments sent at the same instant.
                    outs = await asyncio.gather(
                        *(w.call("await_submitted", timeout=timeout) for w in ws)
                    )
                    if not all(o.get("ok") for o in outs):
                        raise RoundTimeout(f"N={n}: not every participant serialized: {outs}")
                    await control(op, host, ControlOp.FREEZE, encode(FreezeRequest()))
                try:
                    await asyncio.wait_for(seen.committed.wait(), timeout)
                except TimeoutError:
                    states = ", ".join(
                        f"{k} at +{v - t_begin:.1f} s" for k, v in seen.first.items()
                    )
                    raise RoundTimeout(
                        f"N={n}: not committed {timeout:g} s after begin (seen: {states})"
                    ) from None
            # Every participant's frozen() has normally returned by now (the
            # daemon replies before it commits); a client that lags behind
            # its own message backlog is noted, not counted as a failure.
            t0 = now()
            outs = await asyncio.gather(*(w.call("await_frozen", timeout=FROZEN_GRACE) for w in ws))
            phases["frozen_returned_after_commit_s"] = now() - t0
            errors = [e for o in outs for e in o.get("errors", [])]
            if errors:
                raise RuntimeError(f"participants failed: {errors[:3]}")
            lagging = sum(int(o.get("pending", 0)) for o in outs)
            rss = proc_status(daemon.proc.pid) if daemon.proc else {}
        finally:
            t0 = now()
            with contextlib.suppress(Exception):
                await call_all(ws, "close", [{}] * len(ws))
            phases["close_s"] = now() - t0
            t0 = now()
            await daemon.stop()
            phases["daemon_stop_s"] = now() - t0
            meter.roles.pop("daemon", None)
        t_commit = seen.first["committed"]
        t_freeze = next((seen.first[s] for s in AFTER_FREEZE if s in seen.first), None)
        external = None
        if t_freeze is not None and t_freeze < t_commit:
            external = t_commit - t_freeze
        reported = (seen.payload or {}).get("blackout_s")
        start = next((s for s in AFTER_FREEZE if s in seen.cpu), None)
        cpu = CpuMeter.spent(seen.cpu[start], seen.cpu["committed"]) if start else None
        return {
            "host": host,
            "blackout_daemon_s": float(reported) if isinstance(reported, int | float) else None,
            "blackout_external_s": external,
            "begin_commit_s": t_commit - t_begin,
            "register_commit_s": t_commit - t_reg,
            "register_s": t_begin - t_reg,
            "daemon_vmhwm_kib": rss.get("VmHWM"),
            "frozen_not_returned": lagging,
            "cpu_s": cpu,
            "phases": phases,
        }

    # -- the floor -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def floor(
        self, n: int
    ) -> AsyncIterator[Callable[[int], Awaitable[tuple[float, dict[str, float]]]]]:
        tag = uuid.uuid4().hex[:6]
        go, ack = f"bench/floor/{tag}/go", f"bench/floor/{tag}/ack"
        shares = self.layout(n)
        ws = self.workers[: len(shares)]
        fsync_path = self.workdir / f"floor-{tag}.bin"
        coord = plain_client(self.url, "floor-coord")
        acks: dict[bytes, int] = {}
        complete: dict[bytes, asyncio.Event] = {}

        async def collect() -> None:
            async for m in coord.messages:
                token = payload_bytes(m).split(b":", 1)[0]
                acks[token] = acks.get(token, 0) + 1
                if acks[token] == n and token in complete:
                    complete[token].set()

        async def one_round(r: int) -> tuple[float, dict[str, float]]:
            token = f"{tag}.{r}".encode()
            complete[token] = asyncio.Event()
            cpu0 = self.monitor.meter.snapshot()
            t0 = now()
            await coord.publish(go, token, qos=1, retain=True)
            await asyncio.wait_for(complete[token].wait(), self.args.round_timeout)
            with fsync_path.open("wb") as f:
                f.write(token.ljust(64, b"."))
                f.flush()
                os.fsync(f.fileno())
            elapsed = now() - t0
            cpu = CpuMeter.spent(cpu0, self.monitor.meter.snapshot())
            await coord.publish(go, b"", qos=1, retain=True)  # clear the retained broadcast
            return elapsed, cpu

        async with coord:
            set_nodelay(coord)
            await coord.subscribe(ack, qos=1)
            reader = asyncio.create_task(collect())
            await call_all(
                ws,
                "floor_connect",
                [{"url": self.url, "go": go, "ack": ack, "indices": s} for s in shares],
            )
            try:
                yield one_round
            finally:
                reader.cancel()
                with contextlib.suppress(Exception):
                    await call_all(ws, "floor_close", [{}] * len(ws))
                fsync_path.unlink(missing_ok=True)

    # -- scenarios ---------------------------------------------------------------------

    async def blackout(self, n: int, sizes: Sequence[int]) -> dict[str, Any]:
        """Rounds of khod handovers (one per fragment size) and the floor, interleaved.

        After a round longer than ``--slow-round``, or one that times out,
        there are no more khod rounds at this N (noted as ``truncated``; the
        floor rounds still run), so that a quadratic daemon cannot make the
        run last an hour.
        """
        rounds: dict[int, list[dict[str, Any]]] = {s: [] for s in sizes}
        errors: dict[int, str] = {}
        truncated: set[int] = set()
        floor: list[float] = []
        floor_cpu: list[dict[str, float]] = []
        async with self.floor(n) as floor_round:
            for r in range(self.args.rounds):
                for s in sizes:
                    if s in errors or s in truncated:
                        continue
                    t0 = now()
                    try:
                        res = await self.khod_round(n, s)
                    except Exception as exc:
                        errors[s] = (
                            str(exc)[:500] if isinstance(exc, RoundTimeout) else repr(exc)[:500]
                        )
                        self.log(f"  N={n} frag={s} round {r}: FAILED {errors[s]}")
                        if isinstance(exc, RoundTimeout):
                            for other in sizes:
                                errors.setdefault(
                                    other, f"skipped: a round at N={n} timed out ({exc})"
                                )
                        continue
                    elapsed = now() - t0
                    res["round_wall_s"] = elapsed
                    rounds[s].append(res)
                    self.log(
                        f"  N={n} frag={s} round {r}: blackout daemon "
                        f"{ms(res['blackout_daemon_s'])} external {ms(res['blackout_external_s'])}"
                        f" begin->commit {ms(res['begin_commit_s'])} (round {elapsed:.1f} s)"
                    )
                    if elapsed > self.args.slow_round and r + 1 < self.args.rounds:
                        truncated.update(sizes)
                        self.log(
                            f"  N={n}: a round took {elapsed:.0f} s > --slow-round "
                            f"{self.args.slow_round:g} s: no more khod rounds at this N"
                        )
                f, f_cpu = await floor_round(r)
                floor.append(f)
                floor_cpu.append(f_cpu)
                self.log(f"  N={n} floor round {r}: {ms(f)}")
        out: dict[str, Any] = {
            "n": n,
            "workers": len(self.layout(n)),
            "floor_s": summary(floor),
            "floor_cpu_s": cpu_p50(floor_cpu),
            "fragments": {},
        }
        for s in sizes:
            rs = rounds[s]

            def col(key: str, rs: list[dict[str, Any]] = rs) -> list[float]:
                return [float(x[key]) for x in rs if x.get(key) is not None]

            blob = fragment(COMPATIBLE, 0, s)
            out["fragments"][str(s)] = {
                "fragment_bytes": len(blob),
                "rounds": rs,
                "error": errors.get(s),
                "truncated": s in truncated,
                "blackout_daemon_s": summary(col("blackout_daemon_s")),
                "blackout_external_s": summary(col("blackout_external_s")),
                "begin_commit_s": summary(col("begin_commit_s")),
                "register_commit_s": summary(col("register_commit_s")),
                "register_s": summary(col("register_s")),
                "daemon_vmhwm_kib": max(col("daemon_vmhwm_kib"), default=None),
                "cpu_s": cpu_p50([x["cpu_s"] for x in rs if x.get("cpu_s")]),
            }
        return out

    async def requests(self, transport: str) -> dict[str, Any]:
        """khod status / fragment against a bare echo, all over one transport."""
        url = self.broker.tcp_url if transport == "tcp" else self.broker.unix_url
        host = self.host_id(f"req{transport}")
        count = int(self.args.requests)
        daemon = Daemon(url, host, self.workdir)
        await daemon.start(self.monitor)
        echo_topic = f"bench/echo/{uuid.uuid4().hex[:6]}"
        topics = Topics(host)
        out: dict[str, Any] = {"transport": transport, "url": url}
        try:
            await call_all(self.workers[:1], "echo", [{"url": url, "topic": echo_topic}])
            out["echo_s"] = summary(await self.echo_samples(url, echo_topic, count))
            part = Connection(BrokerURL.parse(url), identifier=client_id("bench-reqp"))
            part.reply_topic = topics.reply("reqp")
            async with running(operator(url, host)) as op, running(part):
                status_body = b"{}"

                async def status() -> bytes:
                    m = await op.request(
                        topics.control(ControlOp.STATUS), status_body, content_type=JSON, timeout=60
                    )
                    return m.payload

                out["status_s"], out["status_errors"] = await timed(status, count)
                reg = await part.request(
                    topics.request("reqp", ParticipantOp.REGISTER),
                    encode(RegisterRequest(compatible=COMPATIBLE, instance=1)),
                    content_type=JSON,
                    timeout=60,
                )
                if not reply_ok(reg.payload):
                    raise RuntimeError(f"register refused: {reg.payload[:300]!r}")
                await control(
                    op,
                    host,
                    ControlOp.BEGIN,
                    encode(BeginRequest(deadline=3600, auto_freeze=False)),
                )
                blob = fragment(COMPATIBLE, 1, REQUEST_FRAGMENT)
                out["fragment_bytes"] = len(blob)

                async def submit() -> bytes:
                    m = await part.request(
                        topics.request("reqp", ParticipantOp.FRAGMENT),
                        blob,
                        content_type=DTB,
                        timeout=60,
                    )
                    return m.payload

                out["fragment_s"], out["fragment_errors"] = await timed(submit, count)
        finally:
            with contextlib.suppress(Exception):
                await call_all(self.workers[:1], "echo_stop", [{}])
            await daemon.stop()
        return out

    async def echo_samples(self, url: str, topic: str, count: int) -> list[float]:
        reply = f"{topic}/reply/{uuid.uuid4().hex[:6]}"
        c = plain_client(url, "echo-client")
        waiting: dict[bytes, asyncio.Future[None]] = {}

        async def read() -> None:
            async for m in c.messages:
                _, _, corr = message_props(m)
                fut = waiting.pop(corr or b"", None)
                if fut is not None and not fut.done():
                    fut.set_result(None)

        async with c:
            set_nodelay(c)
            await c.subscribe(reply, qos=1)
            reader = asyncio.create_task(read())

            async def one() -> bytes:
                corr = uuid.uuid4().bytes
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                waiting[corr] = fut
                await c.publish(topic, b"{}", qos=1, properties=request_props(reply, corr))
                await asyncio.wait_for(fut, 60)
                return b'{"ok": true}'

            samples, _ = await timed(one, count)
            reader.cancel()
        return samples["samples"]  # type: ignore[no-any-return]

    async def rss(self, count: int) -> dict[str, Any]:
        """Peak RSS of a daemon with ``count`` registered participants."""
        host = self.host_id("rss")
        url = self.broker.unix_url
        daemon = Daemon(url, host, self.workdir)
        await daemon.start(self.monitor)
        try:
            assert daemon.proc is not None
            before = proc_status(daemon.proc.pid)
            shares = [s for s in split(range(count), min(self.args.workers, count)) if s]
            t0 = now()
            outs = await asyncio.gather(
                *(
                    w.call(
                        "register_raw",
                        url=url,
                        host=host,
                        names=[f"r{i:05d}" for i in s],
                        instances=s,
                        timeout=float(self.args.round_timeout),
                        inflight=32,
                        budget=float(self.args.rss_budget),
                    )
                    for w, s in zip(self.workers, shares, strict=False)
                )
            )
            elapsed = now() - t0
            await asyncio.sleep(1.0)  # let the daemon settle (publishing states)
            after = proc_status(daemon.proc.pid)
            errors = sum(int(o.get("errors", 0)) + (0 if "errors" in o else 1) for o in outs)
            registered = sum(int(o.get("registered", 0)) for o in outs)
        finally:
            await daemon.stop()
        return {
            "participants": count,
            "registered": registered,
            "register_errors": errors,
            "register_s": elapsed,
            "vmhwm_kib_idle": before.get("VmHWM"),
            "vmhwm_kib": after.get("VmHWM"),
            "vmrss_kib": after.get("VmRSS"),
        }


async def timed(call: Callable[[], Awaitable[bytes]], count: int) -> tuple[dict[str, Any], int]:
    """Sequential round trips after a short warm-up; (summary, replies not ok)."""
    for _ in range(min(10, count)):
        await call()
    samples: list[float] = []
    errors = 0
    for _ in range(count):
        t0 = now()
        body = await call()
        samples.append(now() - t0)
        errors += not reply_ok(body)
    return summary(samples), errors


# -- the report ----------------------------------------------------------------------


def cpu_p50(samples: Sequence[dict[str, float]]) -> dict[str, float]:
    """Each role's median CPU seconds in the window."""
    roles = sorted({k for s in samples for k in s})
    return {k: round(percentile([s.get(k, 0.0) for s in samples], 50), 4) for k in roles}


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f} ms"


def p50(d: dict[str, Any] | None, key: str) -> float | None:
    if not d:
        return None
    v = d.get(key) or {}
    return v.get("p50") if isinstance(v, dict) else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def blackout_of(frag: dict[str, Any]) -> float | None:
    """The blackout p50 the targets use: the external one, else the daemon's."""
    return p50(frag, "blackout_external_s") or p50(frag, "blackout_daemon_s")


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, with the figures they compare."""
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, unit: str = "x") -> None:
        rows.append(
            {
                "target": name,
                "value": value,
                "limit": limit,
                "unit": unit,
                "pass": None if value is None else value <= limit,
            }
        )

    by_n = {b["n"]: b for b in res["blackout"]}
    small = str(SMALL)
    ns = sorted(by_n)
    big = ns[-1] if ns else None
    for n in [x for x in (100, 1000) if x in by_n] or ([big] if big else []):
        b = by_n[n]
        add(
            f"blackout / floor at N={n} (p50)",
            ratio(blackout_of(b["fragments"][small]), p50(b, "floor_s")),
            2.0,
        )
    if 100 in by_n and 1000 in by_n:
        add(
            "blackout(1000) / blackout(100) (p50)",
            ratio(
                blackout_of(by_n[1000]["fragments"][small]),
                blackout_of(by_n[100]["fragments"][small]),
            ),
            12.0,
        )
    if big is not None:
        add(
            f"begin -> commit, N={big} (p50)",
            p50(by_n[big]["fragments"][small], "begin_commit_s"),
            3.0,
            "s",
        )
        frags = by_n[big]["fragments"]
        if str(PAGE) in frags:
            add(
                f"blackout 4 KiB / 64 B fragments, N={big} (p50)",
                ratio(blackout_of(frags[str(PAGE)]), blackout_of(frags[small])),
                1.2,
            )
    req = res.get("requests", {})
    tcp, unix = req.get("tcp"), req.get("unix")
    add("status p50: TCP / Unix socket", ratio(p50(tcp, "status_s"), p50(unix, "status_s")), 1.5)
    add(
        "status p50 over TCP / bare echo over TCP",
        ratio(p50(tcp, "status_s"), p50(tcp, "echo_s")),
        2.0,
    )
    add(
        "fragment p50: TCP / Unix socket",
        ratio(p50(tcp, "fragment_s"), p50(unix, "fragment_s")),
        1.5,
    )
    rss = res.get("rss") or {}
    hwm = rss.get("vmhwm_kib")
    complete = rss.get("registered") == rss.get("participants")
    add(
        f"daemon VmHWM, {rss.get('registered', '?')} registered",
        hwm * 1024 / 1e6 if hwm and complete else None,
        150.0,
        "MB",
    )
    return rows


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "x":
        return f"{v:.2f}x"
    if unit == "s":
        return f"{v:.3f} s"
    return f"{v:.1f} {unit}"


def table(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        f"khod blackout benchmark, {res['date']}, transport {res['config']['transport']}",
        f"machine: {m['cpu']}, {m['cpus']} cpus, {m['kernel']}, Python {m['python']}, "
        f"{m['mosquitto']}",
        f"load: start {res['load']['start']} | end {res['load'].get('end', '?')}",
        "",
        "blackout (freeze signal -> payload durable), p50 / p99 over "
        f"{res['config']['rounds']} rounds",
        f"{'N':>6} {'frag':>6} {'wrk':>3} {'daemon p50':>11} {'p99':>9} {'external p50':>13} "
        f"{'p99':>9} {'floor p50':>10} {'p99':>9} {'ratio':>6} {'begin->commit':>14} "
        f"{'reg->commit':>12}",
    ]
    for b in res["blackout"]:
        for f in b["fragments"].values():
            d, e, fl = f["blackout_daemon_s"], f["blackout_external_s"], b["floor_s"]
            r = ratio(blackout_of(f), fl["p50"])
            lines.append(
                f"{b['n']:>6} {f['fragment_bytes']:>6} {b['workers']:>3} {ms(d['p50']):>11} "
                f"{ms(d['p99']):>9} {ms(e['p50']):>13} {ms(e['p99']):>9} {ms(fl['p50']):>10} "
                f"{ms(fl['p99']):>9} {fmt_value(r, 'x'):>6} "
                f"{ms(f['begin_commit_s']['p50']):>14} {ms(f['register_commit_s']['p50']):>12}"
                + (
                    f"  (rounds: {len(f['rounds'])}, stopped: too slow)"
                    if f.get("truncated")
                    else ""
                )
                + (f"  ERROR {f['error'][:100]}" if f["error"] else "")
            )
    lines += ["", "CPU inside the window, p50 ('bench': the floor's coordinator, the monitor)"]
    roles = ("daemon", "broker", "participants", "bench")
    lines.append(f"{'N':>6} {'frag':>6} {'run':>6} " + " ".join(f"{r:>13}" for r in roles))
    for b in res["blackout"]:
        runs = [("floor", b.get("floor_cpu_s") or {}, "")]
        runs += [
            ("khod", f.get("cpu_s") or {}, str(f["fragment_bytes"]))
            for f in b["fragments"].values()
        ]
        for run, cpu, frag in runs:
            cells = [ms(cpu[r]) if r in cpu else "-" for r in roles]
            lines.append(f"{b['n']:>6} {frag:>6} {run:>6} " + " ".join(f"{c:>13}" for c in cells))
    lines += ["", "request latency (sequential, p50 / p99)"]
    lines.append(f"{'':<10} {'echo':>19} {'khod status':>19} {'khod fragment':>19}")
    for t in ("unix", "tcp"):
        q = res["requests"].get(t)
        if not q:
            continue
        cells = [
            f"{ms(q[k]['p50'])} / {ms(q[k]['p99'])}" for k in ("echo_s", "status_s", "fragment_s")
        ]
        lines.append(f"{t:<10} " + " ".join(f"{c:>19}" for c in cells))
    rss = res.get("rss")
    if rss:
        lines += [
            "",
            f"daemon with {rss['registered']} of {rss['participants']} participants registered: "
            "VmHWM "
            f"{(rss['vmhwm_kib'] or 0) / 1024:.1f} MiB, VmRSS {(rss['vmrss_kib'] or 0) / 1024:.1f}"
            f" MiB (idle VmHWM {(rss['vmhwm_kib_idle'] or 0) / 1024:.1f} MiB), registered in "
            f"{rss['register_s']:.1f} s, {rss['register_errors']} errors",
        ]
    lines += ["", f"{'target':<48} {'measured':>10} {'limit':>8}  result"]
    for t in res["targets"]:
        verdict = "-" if t["pass"] is None else ("pass" if t["pass"] else "MISS")
        lines.append(
            f"{t['target']:<48} {fmt_value(t['value'], t['unit']):>10} "
            f"{fmt_value(t['limit'], t['unit']):>8}  {verdict}"
        )
    return "\n".join(lines)


def keep_logs(workdir: Path, keep: Path) -> None:
    keep.mkdir(parents=True, exist_ok=True)
    for p in workdir.glob("*.log"):
        (keep / p.name).write_bytes(p.read_bytes())


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    res: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "load": {"start": loadavg()},
        "config": {
            "sizes": args.sizes,
            "rounds": args.rounds,
            "workers": args.workers,
            "transport": args.transport,
            "requests": args.requests,
            "rss_participants": args.rss_participants,
            "auto_freeze": args.auto_freeze,
            "fragment_sizes": [SMALL, PAGE],
            "request_fragment": REQUEST_FRAGMENT,
        },
        "blackout": [],
        "requests": {},
        "rss": None,
    }
    m = res["machine"]
    log(
        f"{m['cpu']}, {m['cpus']} cpus, {m['kernel']}, Python {m['python']}, {m['mosquitto']}; "
        f"load {res['load']['start']}"
    )
    t_start = now()
    with tempfile.TemporaryDirectory(prefix="khod-bench-", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        with PrivateBroker(workdir / "broker", unix_and_tcp=True) as broker:
            meter = CpuMeter()
            monitor = Monitor(broker.unix_url, meter)
            await monitor.start()
            workers = [await Worker.start(workdir / f"worker{k}.log") for k in range(args.workers)]
            meter.roles["broker"] = [broker.proc.pid] if broker.proc else []
            meter.roles["participants"] = [w.proc.pid for w in workers]
            meter.roles["bench"] = [os.getpid()]
            bench = Bench(args, broker, workdir, monitor, workers, log)
            try:
                if args.requests:
                    for t in ("unix", "tcp"):
                        log(f"requests over {t} ...")
                        res["requests"][t] = await bench.requests(t)
                biggest = max(args.sizes)
                for n in sorted(args.sizes):
                    log(f"blackout, N={n} ...")
                    sizes = [SMALL, PAGE] if n == biggest else [SMALL]
                    res["blackout"].append(await bench.blackout(n, sizes))
                if args.rss_participants:
                    log(f"RSS with {args.rss_participants} registered participants ...")
                    res["rss"] = await bench.rss(args.rss_participants)
            finally:
                await asyncio.gather(*(w.stop() for w in workers))
                await monitor.close()
                if args.keep_logs:
                    keep_logs(workdir, Path(args.keep_logs))
    res["load"]["end"] = loadavg()
    res["elapsed_s"] = now() - t_start
    res["targets"] = targets(res)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=4, help="participant processes")
    ap.add_argument(
        "--transport",
        choices=("tcp", "unix"),
        default="tcp",
        help="how the daemon, the participants and the floor reach the broker (default tcp)",
    )
    ap.add_argument("--requests", type=int, default=200, help="samples per request kind")
    ap.add_argument("--rss-participants", type=int, default=10_000)
    ap.add_argument(
        "--rss-budget",
        type=float,
        default=300.0,
        help="seconds to spend registering them; VmHWM is read at whatever count is reached",
    )
    ap.add_argument(
        "--round-timeout",
        type=float,
        default=300.0,
        help="seconds from begin to commit before a round counts as failed (default 300)",
    )
    ap.add_argument(
        "--slow-round",
        type=float,
        default=60.0,
        help="after a round slower than this (s), no more rounds of that scenario (default 60)",
    )
    ap.add_argument(
        "--auto-freeze",
        action="store_true",
        help="freeze as the last fragment arrives (begin auto_freeze) instead of the "
        "operator's freeze once every participant is serialized",
    )
    ap.add_argument("--quick", action="store_true", help="tiny run: N=5, 2 rounds")
    ap.add_argument("--json", metavar="FILE", default="bench-blackout.json")
    ap.add_argument("--workdir", help="where state and fsyncs go (default: system temp dir)")
    ap.add_argument("--keep-logs", metavar="DIR", help="copy daemon and worker logs here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        asyncio.run(worker_main())
        return 0
    if args.quick:
        args.sizes, args.rounds, args.requests, args.rss_participants = [5], 2, 20, 200
        args.round_timeout = min(args.round_timeout, 60.0)
    res = asyncio.run(main_async(args))
    print(table(res))
    Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
