"""How fast is khod on the bus, against the broker's own round trip?

Runs everything on a private mosquitto (Unix socket) and a real ``khod run``:

* baseline: a raw MQTT v5 request/response through the broker to a trivial
  echo responder (the floor any request to khod pays);
* khod ``status`` (a read: parse, build the reply);
* khod ``fragment`` submission of a ~3.5 KiB fragment (validate, SQLite
  commit with fsync, publish state) — the per-participant cost;
* a whole handover of N participants (SDK): begin -> commit, and the
  blackout (freeze signal -> payload committed).

Prints the machine it ran on. Usage: python bench/bench_bus.py [--rounds R] [--participants N ...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from khod.broker import PrivateBroker
from khod_client import Participant
from khod_wire.fragment import start_storage
from khod_wire.message import Message
from khod_wire.protocol import (
    DTB,
    JSON,
    BeginRequest,
    ControlOp,
    HandoverStatus,
    ParticipantOp,
    RegisterRequest,
    Topics,
    encode,
)
from khod_wire.transport import Connection, client_id
from khod_wire.urls import BrokerURL


def machine() -> str:
    cpu = "unknown cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.split("\n")[0]
    return (
        f"{platform.node()}: {cpu}, {os.cpu_count()} cpus, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, {mosq}"
    )


@contextlib.asynccontextmanager
async def running(conn: Connection) -> AsyncIterator[Connection]:
    task = asyncio.create_task(conn.run())
    await conn.wait_connected(10)
    try:
        yield conn
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def timed(rounds: int, call: Callable[[], Awaitable[object]]) -> list[float]:
    for _ in range(min(20, rounds)):  # warm-up
        await call()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        await call()
        out.append(time.perf_counter() - t0)
    return out


def row(name: str, samples: list[float], base: float | None = None) -> str:
    med = statistics.median(samples) * 1e3
    p95 = sorted(samples)[int(len(samples) * 0.95) - 1] * 1e3
    ratio = f"{med / base:5.1f}x" if base else "  1.0x"
    return f"{name:<34} {med:8.3f} ms  p95 {p95:8.3f} ms  {ratio}"


async def echo_responder(url: str) -> None:
    """The baseline's other end: answers every request at once, in its own process."""
    conn: Connection

    async def echo(m: Message) -> None:
        if m.response_topic:
            await conn.publish(
                m.response_topic, m.payload, content_type=JSON, correlation=m.correlation
            )

    conn = Connection(
        BrokerURL.parse(url),
        identifier=client_id("echo"),
        subscriptions=["bench/echo"],
        on_message=echo,
    )
    await conn.run()


async def bus_rounds(url: str, host: str, rounds: int) -> list[str]:
    u = BrokerURL.parse(url)
    topics = Topics(host)

    client = Connection(u, identifier=client_id("bench"))
    client.reply_topic = f"bench/reply/{client.identifier}"
    op = Connection(u, identifier=client_id("op"))
    op.reply_topic = topics.control_reply(op.identifier)
    part = Connection(u, identifier=client_id("p"))
    part.reply_topic = topics.reply("bench-p")
    echo = await asyncio.create_subprocess_exec(sys.executable, __file__, "--echo", url)
    await asyncio.sleep(0.5)
    try:
        async with running(client), running(op), running(part):
            return await _rounds(client, op, part, topics, rounds)
    finally:
        echo.terminate()
        await echo.wait()


async def _rounds(
    client: Connection, op: Connection, part: Connection, topics: Topics, rounds: int
) -> list[str]:
    raw = await timed(
        rounds, lambda: client.request("bench/echo", b"{}", content_type=JSON, timeout=10)
    )
    status = await timed(
        rounds,
        lambda: op.request(topics.control(ControlOp.STATUS), b"{}", content_type=JSON, timeout=10),
    )

    await part.request(
        topics.request("bench-p", ParticipantOp.REGISTER),
        encode(RegisterRequest(compatible="bench,p-v1", instance=1)),
        content_type=JSON,
        timeout=10,
    )
    await op.request(
        topics.control(ControlOp.BEGIN),
        encode(BeginRequest(deadline=3600)),
        content_type=JSON,
        timeout=10,
    )

    b = start_storage("bench,p-v1", 1)
    b.property_bytes("state", os.urandom(3500))
    blob = b.finish_storage()
    frag = await timed(
        rounds,
        lambda: part.request(
            topics.request("bench-p", ParticipantOp.FRAGMENT),
            blob,
            content_type=DTB,
            timeout=10,
        ),
    )
    base = statistics.median(raw) * 1e3
    return [
        row("raw broker request/response", raw),
        row("khod status", status, base),
        row(f"khod fragment ({len(blob)} B, fsync)", frag, base),
    ]


async def participants(url: str, host: str, first: int, count: int) -> None:
    """``count`` SDK participants in this process: register, say so, hand over."""
    parts = [
        Participant(f"b{i:04d}", compatible="bench,p-v1", instance=i, broker=url, host_id=host)
        for i in range(first, first + count)
    ]

    async def one(p: Participant) -> None:
        await p.wait_for_begin()
        b = p.start_storage()
        b.property_bytes("state", os.urandom(2000))
        await p.submit(b.finish_storage())
        await p.wait_for_freeze()
        await p.frozen()
        await p.wait_for_handover(lambda h: h.state == "committed")

    async with contextlib.AsyncExitStack() as stack:
        for p in parts:
            await stack.enter_async_context(p)
        await asyncio.gather(*(p.register() for p in parts))
        print("ready", flush=True)
        await asyncio.gather(*(one(p) for p in parts))


async def handover(url: str, host: str, n: int, procs: int) -> tuple[float, float]:
    """begin -> commit, and the blackout, with the participants spread over processes."""
    share = [n // procs + (k < n % procs) for k in range(procs)]
    workers = []
    first = 0
    for count in share:
        if count:
            workers.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--participants-of",
                    url,
                    host,
                    str(first),
                    str(count),
                    stdout=asyncio.subprocess.PIPE,
                )
            )
        first += count
    try:
        for w in workers:
            assert w.stdout is not None
            assert (await w.stdout.readline()).strip() == b"ready"
        committed: asyncio.Future[HandoverStatus] = asyncio.get_running_loop().create_future()

        async def watch(m: Message) -> None:
            h = HandoverStatus.model_validate_json(m.payload)
            if h.state == "committed" and not committed.done():
                committed.set_result(h)

        topics = Topics(host)
        op = Connection(
            BrokerURL.parse(url),
            identifier=client_id("op"),
            subscriptions=[topics.handover],
            on_message=watch,
        )
        op.reply_topic = topics.control_reply(op.identifier)
        async with running(op):
            t0 = time.perf_counter()
            await op.request(
                topics.control(ControlOp.BEGIN),
                encode(BeginRequest(deadline=600)),
                content_type=JSON,
                timeout=30,
            )
            status = await asyncio.wait_for(committed, 600)
            total = time.perf_counter() - t0
        for w in workers:
            await w.wait()
    finally:
        for w in workers:
            if w.returncode is None:
                w.kill()
                await w.wait()
    assert status.payload is not None
    return total, float(status.payload["blackout_s"])


def start_daemon(url: str, host: str, state: Path) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        KHOD_BROKER=url,
        KHOD_HOST_ID=host,
        KHOD_STATE_DIR=str(state),
        KHOD_LOG_LEVEL="WARNING",
    )
    env.pop("KHOD_CONFIG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "khod.cli", "run"], env=env, stdin=subprocess.DEVNULL
    )
    time.sleep(1.0)
    return proc


async def main_async(rounds: int, sizes: list[int], procs: list[int]) -> None:
    print(machine())
    with tempfile.TemporaryDirectory() as tmp, PrivateBroker(Path(tmp) / "broker") as broker:
        host = "bench-" + uuid.uuid4().hex[:6]
        proc = start_daemon(broker.url, host, Path(tmp) / "s0")
        try:
            print(
                f"\nrequest round trips over {broker.url} ({rounds} rounds, median, vs raw broker)"
            )
            for line in await bus_rounds(broker.url, host, rounds):
                print("  " + line)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
        print("\nwhole handovers (SDK participants, ~2 KiB fragments each)")
        print(f"  {'participants':>12} {'processes':>9} {'begin->commit':>14} {'blackout':>12}")
        for n in sizes:
            for k in procs:
                host = f"bench-{n}-{k}-" + uuid.uuid4().hex[:4]
                proc = start_daemon(broker.url, host, Path(tmp) / f"s{n}-{k}")
                try:
                    total, blackout = await handover(broker.url, host, n, k)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait()
                print(f"  {n:>12} {k:>9} {total * 1e3:11.1f} ms {blackout * 1e3:9.1f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--participants", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument(
        "--procs", type=int, nargs="+", default=[1, 4], help="participant processes to try"
    )
    ap.add_argument("--echo", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--participants-of", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.echo:
        asyncio.run(echo_responder(args.echo))
        return 0
    if args.participants_of:
        url, host, first, count = args.participants_of
        asyncio.run(participants(url, host, int(first), int(count)))
        return 0
    asyncio.run(main_async(args.rounds, args.participants, args.procs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
