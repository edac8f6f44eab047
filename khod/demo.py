"""``khod demo``: a whole live update on a private broker, end to end.

Starts a private mosquitto, a khod daemon (a real ``khod run`` process) and N
simulated participants (SDK ``Participant`` objects in this process) that
serialize at different paces with different contents, some re-serializing,
some ordered after others. Shows the progress live, commits the payload to
``DIR/payload.kho`` (manifest beside it), then plays the other side of the
kexec: a fresh daemon on that image, each participant retrieves its fragment
and checks it byte for byte, then finishes. Exit status 0 only if the round
trip verified. Every process it starts, it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from khod.broker import PrivateBroker
from khod.monitor import MonitorState
from khod.payload import PayloadImage
from khod_client import HandoverCancelled, Participant
from khod_wire.errors import ConfigError, KhodError
from khod_wire.message import Message
from khod_wire.protocol import JSON, BeginRequest, ControlOp, Topics, encode, reply_data
from khod_wire.transport import Connection, client_id
from khod_wire.urls import BrokerURL

KINDS = [
    ("iommufd", "iommufd,ioas-v1"),
    ("vm", "cloud-hypervisor,vm-v1"),
    ("vfio", "vfio-pci,device-v1"),
    ("trace", "linux,trace-buffer-v1"),
    ("blk", "spdk,vhost-blk-v1"),
]


@dataclass
class Sim:
    """One simulated component and what it handed over."""

    name: str
    compatible: str
    instance: int | str
    freeze_after: tuple[str, ...]
    restore_after: tuple[str, ...]
    pace: float
    revisions: int
    submitted: bytes = b""
    restored: bytes = b""


def make_sims(n: int, seed: int = 7) -> list[Sim]:
    rng = random.Random(seed)
    sims: list[Sim] = []
    for i in range(n):
        kind, compatible = KINDS[i % len(KINDS)]
        name = f"{kind}-{i:02d}"
        # VMs freeze after (and restore after) the iommufd instance before
        # them, the dependency a real VMM has on its IOMMU state.
        deps = (
            tuple(s.name for s in sims[-5:] if s.name.startswith("iommufd")) if kind == "vm" else ()
        )
        sims.append(
            Sim(
                name=name,
                compatible=compatible,
                instance=i if i % 3 else f"uuid-{uuid.UUID(int=rng.getrandbits(128))}",
                freeze_after=deps,
                restore_after=deps,
                pace=rng.uniform(0.05, 1.2),
                revisions=1 + (i % 4 == 1),
            )
        )
    return sims


def serialize(p: Participant, sim: Sim, revision: int) -> bytes:
    rng = random.Random(f"{sim.name}/{revision}")
    b = p.start_storage(size_hint=1024)
    b.property_u32("revision", revision)
    b.property_string("component", sim.compatible)
    if sim.name.startswith("vm"):
        b.property_u32("vcpus", rng.choice([2, 4, 8, 16]))
        with b.node("memory"):
            for r in range(rng.randint(1, 4)):
                with b.node(f"region@{r}"):
                    b.property_u64("base", 0x1_0000_0000 * (r + 1))
                    b.property_u64("size", rng.choice([1, 2, 4]) << 30)
                    b.property_u64_native("memfd-token", rng.getrandbits(64))
    elif sim.name.startswith("iommufd"):
        b.property_strings("ioas", [f"ioas{k}" for k in range(rng.randint(1, 3))])
        b.property_bytes("page-table-root", rng.randbytes(16))
    else:
        b.property_bytes("state", rng.randbytes(rng.randint(32, 1500)))
    return b.finish_storage()


async def outgoing_participant(sim: Sim, broker: str, host: str) -> None:
    async with Participant(
        sim.name,
        compatible=sim.compatible,
        instance=sim.instance,
        broker=broker,
        host_id=host,
        freeze_after=sim.freeze_after,
        restore_after=sim.restore_after,
    ) as p:
        await p.register()
        await p.wait_for_begin()
        for rev in range(1, sim.revisions + 1):
            await asyncio.sleep(sim.pace / sim.revisions)
            sim.submitted = serialize(p, sim, rev)
            await p.submit(sim.submitted)
        await p.wait_for_freeze()
        await p.frozen()
        # Stay connected until the payload is committed: a participant that
        # vanishes before commit aborts the handover (its will).
        await p.wait_for_handover(
            lambda h: h.state == "committed" or (h.state == "idle" and bool(h.abort_reason))
        )


async def incoming_participant(sim: Sim, broker: str, host: str) -> None:
    async with Participant(
        sim.name, compatible=sim.compatible, instance=sim.instance, broker=broker, host_id=host
    ) as p:
        await asyncio.sleep(sim.pace / 4)  # components come up at their own pace
        sim.restored = await p.retrieve()
        await p.finish()


class Operator:
    """The operator's side of the demo: control requests and a live view."""

    def __init__(self, url: str, host: str) -> None:
        self.topics = Topics(host)
        self.monitor = MonitorState(host)
        self.conn = Connection(
            BrokerURL.parse(url),
            identifier=client_id("khod-demo"),
            subscriptions=[
                self.topics.handover,
                self.topics.progress,
                self.topics.participant_states,
                self.topics.daemon,
            ],
            on_message=self._ingest,
        )
        self.conn.reply_topic = self.topics.control_reply(self.conn.identifier)

    async def _ingest(self, message: Message) -> None:
        self.monitor.ingest(message.topic, message.payload)

    async def control(self, op: ControlOp, body: bytes = b"{}") -> dict[str, Any]:
        m = await self.conn.request(self.topics.control(op), body, content_type=JSON, timeout=30)
        return reply_data(op, m.payload)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Operator]:
        task = asyncio.create_task(self.conn.run(), name="demo-operator")
        try:
            await self.conn.wait_connected(10)
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@contextlib.contextmanager
def daemon_process(
    url: str, host: str, state: Path, payload_dir: Path, restore: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    env = dict(os.environ)
    env.pop("KHOD_CONFIG", None)
    env.update(
        KHOD_BROKER=url,
        KHOD_HOST_ID=host,
        KHOD_STATE_DIR=str(state),
        KHOD_PAYLOAD_DIR=str(payload_dir),
        KHOD_HANDOVER_DEADLINE="120",
        KHOD_RESTORE_DEADLINE="120",
    )
    argv = [sys.executable, "-m", "khod.cli", "run"]
    if restore is not None:
        argv += ["--restore", str(restore)]
    log = (payload_dir / f"khod-{state.name}.log").open("ab")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def watch(op: Operator, live: Live | None, want: str, timeout: float) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if live is not None:
            live.update(op.monitor.render())
        done = op.monitor.done
        if done is not None and (done == want or done == "aborted"):
            return done
        await asyncio.sleep(0.1)
    raise KhodError(f"timed out after {timeout:g}s waiting for {want}")


async def run_demo(n: int, out: Path, console: Console, quiet: bool) -> int:
    sims = make_sims(n)
    host = "demo-" + uuid.uuid4().hex[:6]
    with PrivateBroker() as broker:
        console.print(f"[bold]khod demo[/]: {n} participants, broker {broker.url}, host {host}")
        # -- outgoing side ---------------------------------------------------
        with daemon_process(broker.url, host, out / "state-outgoing", out):
            async with Operator(broker.url, host).running() as op:
                await _wait_online(op)
                tasks = [
                    asyncio.create_task(outgoing_participant(s, broker.url, host), name=s.name)
                    for s in sims
                ]
                await _wait_registered(op, n)
                began = await op.control(ControlOp.BEGIN, encode(BeginRequest(deadline=120)))
                console.print(f"handover {began['handover']['id']} begun")
                with _live(console, quiet) as live:
                    result = await watch(op, live, "committed", 150)
                    if live is not None:
                        live.update(op.monitor.render())
                await _settle(tasks)
                handover = op.monitor.handover
        if result != "committed" or handover is None or handover.payload is None:
            reason = handover.abort_reason if handover else "no handover state"
            console.print(f"[red]handover aborted:[/] {reason}")
            return 1
        payload = handover.payload
        image_path = out / "payload.kho"
        image = PayloadImage.from_file(image_path)
        console.print(
            f"committed {image_path} ({payload['size']} bytes, {len(image.entries)} fragments); "
            f"freeze signal to commit: {payload['blackout_s'] * 1000:.1f} ms"
        )
        # -- incoming side: what the next kernel's khod does ------------------
        t0 = time.monotonic()
        with daemon_process(broker.url, host, out / "state-incoming", out, restore=image_path):
            async with Operator(broker.url, host).running() as op:
                await _wait_online(op, side="incoming")
                tasks = [
                    asyncio.create_task(incoming_participant(s, broker.url, host), name=s.name)
                    for s in sims
                ]
                with _live(console, quiet) as live:
                    result = await watch(op, live, "released", 150)
                    if live is not None:
                        live.update(op.monitor.render())
                await _settle(tasks)
        restore_s = time.monotonic() - t0
    bad = [s.name for s in sims if not s.submitted or s.restored != s.submitted]
    console.print(
        f"\n[bold]summary[/]: {n} participants, payload {payload['size']} bytes, "
        f"freeze→commit {payload['blackout_s'] * 1000:.1f} ms, restore {restore_s:.2f} s, "
        f"{n - len(bad)}/{n} fragments verified byte for byte"
    )
    console.print(f"payload: {image_path}  manifest: {image_path.with_suffix('.json')}")
    console.print(f"inspect it: {_khod_command()} inspect {image_path}")
    if bad or result != "released":
        console.print(f"[red]restore did not verify:[/] {', '.join(bad) or result}")
        return 1
    return 0


async def _wait_online(op: Operator, side: str = "outgoing", timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        d = op.monitor.daemon
        if d is not None and d.state == "online" and d.side == side:
            return
        await asyncio.sleep(0.05)
    raise KhodError("the khod daemon did not come online (see its log in the output directory)")


async def _wait_registered(op: Operator, n: int, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if len(op.monitor.participants) >= n:
            return
        await asyncio.sleep(0.05)
    raise KhodError(f"only {len(op.monitor.participants)}/{n} participants registered")


async def _settle(tasks: list[asyncio.Task[None]]) -> None:
    done, pending = await asyncio.wait(tasks, timeout=30)
    for t in pending:
        t.cancel()
    for t in done:
        exc = t.exception()
        if exc is not None and not isinstance(exc, HandoverCancelled):
            raise KhodError(f"participant {t.get_name()} failed: {exc!r}")


@contextlib.contextmanager
def _live(console: Console, quiet: bool) -> Iterator[Live | None]:
    if quiet:
        yield None
        return
    with Live(console=console, refresh_per_second=10, transient=False) as live:
        yield live


def main(n: int = 16, output: Path | None = None, *, quiet: bool = False) -> int:
    console = Console()
    if n < 1 or n > 1000:
        console.print("khod demo: --participants must be 1..1000")
        return 2
    out = output or Path(tempfile.mkdtemp(prefix="khod-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    if (out / "payload.kho").exists():
        console.print(f"khod demo: {out}/payload.kho exists; choose a fresh --output")
        return 2
    console.print(f"output directory: {out}")
    try:
        return asyncio.run(run_demo(n, out, console, quiet))
    except ConfigError as exc:
        console.print(f"[red]khod demo:[/] {exc}")
        return 2
    except KhodError as exc:
        console.print(f"[red]khod demo failed:[/] {exc}")
        _print_logs(console, out)
        return 1
    except KeyboardInterrupt:
        return 130


def _khod_command() -> str:
    """How the user can run khod again: the console script they used, if any."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "khod":
        return str(argv0) if argv0.parent != Path() else "khod"
    return f"{sys.executable} -m khod.cli"


def _print_logs(console: Console, out: Path) -> None:
    for log in sorted(out.glob("khod-*.log")):
        tail = log.read_text(errors="replace").splitlines()[-15:]
        console.print(f"--- {log} (last lines)")
        console.print("\n".join(tail), markup=False, highlight=False)


__all__ = ["main", "make_sims", "serialize"]
