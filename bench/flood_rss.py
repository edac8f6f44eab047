"""How much memory does a flood of large request bodies cost the daemon?

Starts a private mosquitto (Unix socket) and a real ``khod run``, measures the
daemon's VmRSS, floods its request topics with large bodies (and large
correlation data) from several connections at once, while an operator keeps
asking for ``status``, and prints the daemon's VmRSS/VmHWM growth and how
the legitimate requests fared. ``flood()`` is also what the test suite uses
(tests/integration/test_hostile.py).

Usage: python bench/flood_rss.py [--count N] [--size BYTES] [--correlation BYTES] [--senders S]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt

from khod.broker import PrivateBroker
from khod_wire._paho import properties
from khod_wire.protocol import JSON, ControlOp, ParticipantOp, Topics
from khod_wire.transport import Connection, client_id
from khod_wire.urls import BrokerURL

ROOT = Path(__file__).resolve().parent.parent


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


async def flood(
    url: str, host: str, *, count: int, size: int, correlation: int, senders: int = 4
) -> None:
    """``count`` requests of ``size``-byte bodies, spread over ops and ``senders`` connections.

    Every body is refused by the daemon (too large, or not what the op reads),
    so the flood changes no state; each carries ``correlation`` bytes of
    correlation data and a response topic the daemon accepts.
    """
    t = Topics(host)
    u = BrokerURL.parse(url)
    targets = [
        (t.request("flood", ParticipantOp.FRAGMENT), t.reply("flood")),
        (t.request("flood", ParticipantOp.REGISTER), t.reply("flood")),
        (t.request("flood", ParticipantOp.FAIL), t.reply("flood")),
        (t.control(ControlOp.BEGIN), t.control_reply("flood")),
    ]

    async def sender(k: int) -> None:
        async with aiomqtt.Client(
            u.host,
            u.port,
            transport=u.transport,
            protocol=aiomqtt.ProtocolVersion.V5,
            identifier=f"flood-{k}-{uuid.uuid4().hex[:6]}",
            max_inflight_messages=64,
        ) as c:
            window = asyncio.Semaphore(64)

            async def one(i: int) -> None:
                topic, reply_to = targets[i % len(targets)]
                body = (b"{" + os.urandom(size // 2).hex().encode())[:size]
                props = properties(
                    content_type=JSON,
                    response_topic=reply_to,
                    correlation=i.to_bytes(4, "big") * max(1, correlation // 4),
                )
                try:
                    await c.publish(topic, body, qos=1, properties=props)
                finally:
                    window.release()

            tasks = []
            for i in range(k, count, senders):
                await window.acquire()
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)

    await asyncio.gather(*(sender(k) for k in range(senders)))


@dataclass
class Served:
    """How the legitimate requests sent during a flood fared."""

    answered: int = 0
    failed: int = 0
    slowest: float = 0.0
    errors: list[str] = field(default_factory=list)
    first: asyncio.Event = field(default_factory=asyncio.Event)


async def keep_asking(
    url: str, host: str, flood_done: asyncio.Event, served: Served, *, after: int = 3
) -> None:
    """``status`` requests one after another, until ``after`` more once ``flood_done``."""
    t = Topics(host)
    conn = Connection(BrokerURL.parse(url), identifier=client_id("legit"))
    conn.reply_topic = t.control_reply(conn.identifier)
    task = asyncio.create_task(conn.run())
    try:
        await conn.wait_connected(10)
        while after > 0:
            after -= flood_done.is_set()
            start = time.monotonic()
            try:
                m = await conn.request(
                    t.control(ControlOp.STATUS), b"", content_type=JSON, timeout=120
                )
                assert b'"ok":true' in bytes(m.payload), bytes(m.payload)[:200]
                served.answered += 1
                served.first.set()
            except Exception as exc:  # reported, not raised: the flood goes on
                served.failed += 1
                served.errors.append(repr(exc))
            served.slowest = max(served.slowest, time.monotonic() - start)
            await asyncio.sleep(0.1)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def measure(
    url: str, host: str, pid: int, *, count: int, size: int, correlation: int, senders: int
) -> tuple[dict[str, int], dict[str, int], Served]:
    """Memory before and after a flood, and the legitimate requests during and after it."""
    served, flood_done = Served(), asyncio.Event()
    asker = asyncio.create_task(keep_asking(url, host, flood_done, served))
    # The baseline is a daemon that has served a request already.
    first = asyncio.ensure_future(served.first.wait())
    await asyncio.wait({asker, first}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    first.cancel()
    before = memory_kib(pid)
    try:
        await flood(url, host, count=count, size=size, correlation=correlation, senders=senders)
    finally:
        flood_done.set()
        await asker
    return before, memory_kib(pid), served


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--count", type=int, default=4200)
    ap.add_argument("--size", type=int, default=64 * 1024)
    ap.add_argument("--correlation", type=int, default=60 * 1024)
    ap.add_argument("--senders", type=int, default=4)
    args = ap.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="khod-flood-") as tmp,
        PrivateBroker(Path(tmp) / "broker") as broker,
    ):
        host = "flood-" + uuid.uuid4().hex[:6]
        env = dict(
            os.environ,
            KHOD_BROKER=broker.url,
            KHOD_HOST_ID=host,
            KHOD_STATE_DIR=str(Path(tmp) / "state"),
            KHOD_LOG_LEVEL="WARNING",
        )
        env.pop("KHOD_CONFIG", None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "khod.cli", "run"],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stderr=(Path(tmp) / "khod.log").open("wb"),
        )
        try:
            time.sleep(1.5)
            before, after, served = asyncio.run(
                measure(
                    broker.url,
                    host,
                    proc.pid,
                    count=args.count,
                    size=args.size,
                    correlation=args.correlation,
                    senders=args.senders,
                )
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    mib = 1024
    print(
        f"flood: {args.count} requests x {args.size} B body + {args.correlation} B correlation, "
        f"{args.senders} senders"
    )
    print(
        f"daemon VmRSS {before['VmRSS'] // mib} -> {after['VmRSS'] // mib} MiB, "
        f"VmHWM {before['VmHWM'] // mib} -> {after['VmHWM'] // mib} MiB "
        f"(growth of the high-water mark: {(after['VmHWM'] - before['VmRSS']) // mib} MiB)"
    )
    print(
        f"legitimate status requests during the flood: {served.answered} answered, "
        f"{served.failed} failed, slowest {served.slowest:.2f} s {served.errors[:3]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
