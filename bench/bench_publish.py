"""What one publish costs through khod's connection, beside a bare aiomqtt client.

Every request, reply, state and signal of khod is a QoS 1 publish through
``khod_wire.transport.Connection``; the daemon sends whole batches of them in
the blackout. This measures, on a private mosquitto over TCP and over the
Unix socket, in the same run:

* **sequential**: one publish, wait for its PUBACK, the next (a request's
  half of a round trip);
* **batch**: 500 publishes queued at once, then all their PUBACKs (what the
  daemon does with a batch of replies and states);

each for khod's ``Connection`` (with the content type and correlation data
a reply carries) and for a bare ``aiomqtt.Client`` with the same properties.

    .venv/bin/python bench/bench_publish.py [--count 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomqtt
from bench_blackout import machine, set_nodelay
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from khod.broker import PrivateBroker
from khod_wire._mqtt import MAX_INFLIGHT
from khod_wire.message import Publication
from khod_wire.transport import Connection, client_id
from khod_wire.urls import BrokerURL

BATCH = 500
TOPIC = "bench/publish"
BODY = b'{"protocol":2,"ok":true}'
CTYPE = "application/json"
CORRELATION = b"0123456789abcdef"


def bare_props() -> Properties:
    p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    p.ContentType = CTYPE
    p.CorrelationData = CORRELATION
    return p


async def per_message(run: Callable[[int], Awaitable[None]], count: int) -> float:
    """Microseconds per message of ``run(count)``."""
    t0 = time.perf_counter()
    await run(count)
    return (time.perf_counter() - t0) / count * 1e6


async def measure(url: str, count: int, rounds: int) -> dict[str, list[float]]:
    kinds = ("khod seq", "bare seq", "khod batch", "bare batch")
    out: dict[str, list[float]] = {k: [] for k in kinds}
    u = BrokerURL.parse(url)
    conn = Connection(u, identifier=client_id("bench-pub"))
    task = asyncio.create_task(conn.run())
    # The same in-flight window as khod's, so that a bare batch is not sent 20 at a time.
    bare = aiomqtt.Client(
        u.host,
        u.port,
        transport=u.transport,
        identifier=client_id("bench-bare"),
        protocol=aiomqtt.ProtocolVersion.V5,
        max_inflight_messages=MAX_INFLIGHT,
    )
    try:
        await conn.wait_connected(30)
        async with bare:
            set_nodelay(bare)

            async def khod_seq(n: int) -> None:
                for _ in range(n):
                    await conn.publish(TOPIC, BODY, content_type=CTYPE, correlation=CORRELATION)

            async def bare_seq(n: int) -> None:
                for _ in range(n):
                    await bare.publish(TOPIC, BODY, qos=1, properties=bare_props())

            async def khod_batch(n: int) -> None:
                one = Publication(TOPIC, BODY, content_type=CTYPE, correlation=CORRELATION)
                for _ in range(n // BATCH):
                    await conn.publish_many([one] * BATCH)

            async def bare_batch(n: int) -> None:
                for _ in range(n // BATCH):
                    sends = (
                        bare.publish(TOPIC, BODY, qos=1, properties=bare_props())
                        for _ in range(BATCH)
                    )
                    await asyncio.gather(*sends)

            runs = dict(zip(kinds, (khod_seq, bare_seq, khod_batch, bare_batch), strict=True))
            for _ in range(rounds):  # interleaved, so that load drift hits both alike
                for name, run in runs.items():
                    out[name].append(await per_message(run, count))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"machine": machine(), "count": args.count, "rounds": args.rounds}
    print(f"machine: {json.dumps(res['machine'])}")
    with tempfile.TemporaryDirectory(prefix="khod-bench-pub-") as tmp:
        broker = PrivateBroker(Path(tmp) / "mq", unix_and_tcp=True)
        broker.start()
        try:
            for transport, url in (("tcp", broker.tcp_url), ("unix", broker.unix_url)):
                figures = await measure(url, args.count, args.rounds)
                res[transport] = {k: statistics.median(v) for k, v in figures.items()}
        finally:
            broker.close()
    print(f"\nus per QoS 1 publish (median of {args.rounds} rounds of {args.count})")
    print(f"{'':6} {'khod seq':>10} {'bare seq':>10} {'ratio':>6}", end="")
    print(f"   {'khod batch':>10} {'bare batch':>10} {'ratio':>6}")
    for t in ("tcp", "unix"):
        r = res[t]
        seq, bat = r["khod seq"] / r["bare seq"], r["khod batch"] / r["bare batch"]
        print(f"{t:6} {r['khod seq']:10.1f} {r['bare seq']:10.1f} {seq:5.2f}x", end="")
        print(f"   {r['khod batch']:10.1f} {r['bare batch']:10.1f} {bat:5.2f}x")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=3000, help="publishes per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", metavar="FILE", help="write the figures here too")
    a = ap.parse_args()
    result = asyncio.run(main(a))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
