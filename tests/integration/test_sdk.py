"""khod_client against a real mosquitto and a real ``khod run``: no mocks.

Operator commands are raw MQTT v5 control requests (``tests.busclient.OperatorClient``), so
these tests depend on the wire contract and the SDK only, not on the CLI.
The example participant runs as a child process, as someone would run it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from khod.broker import PrivateBroker
from khod.payload import PayloadImage
from khod_client import (
    FragmentReceipt,
    HandoverCancelled,
    Participant,
    RemoteError,
    RequestTimeout,
)
from khod_wire.protocol import (
    AbortRequest,
    BeginRequest,
    ControlOp,
    FreezeRequest,
    HandoverStatus,
)
from tests.busclient import OperatorClient

if TYPE_CHECKING:
    from tests.daemonproc import DaemonFactory, DaemonProc

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "clients" / "examples" / "vmm_participant.py"
COMPATIBLE = "khod-test,vm-v1"
TIMEOUT = 20.0


@pytest.fixture
async def operator(broker: PrivateBroker, host_id: str) -> AsyncIterator[OperatorClient]:
    async with OperatorClient(broker.url, host_id) as op:
        yield op


def participant(
    broker: PrivateBroker, host: str, name: str, instance: int, **kw: Any
) -> Participant:
    return Participant(
        name,
        compatible=COMPATIBLE,
        instance=instance,
        broker=broker.url,
        host_id=host,
        request_timeout=TIMEOUT,
        **kw,
    )


def fragment(p: Participant, version: int) -> bytes:
    b = p.start_storage()
    b.property_u32("version", version)
    b.property_string("owner", p.name)
    with b.node("state"):
        b.property_u64("counter", 1_000_000 * version + len(p.name))
    return b.finish_storage()


def receipt(blob: bytes) -> FragmentReceipt:
    return FragmentReceipt(len(blob), hashlib.sha256(blob).hexdigest())


async def until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll what the SDK and the callbacks record (there is no event for each of those)."""
    async with asyncio.timeout(timeout):
        while not pred():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def committed(s: HandoverStatus) -> bool:
    return s.side == "outgoing" and s.state == "committed"


async def hand_over(p: Participant, blob: bytes) -> None:
    """One participant's whole outgoing side."""
    await p.wait_for_begin()
    assert await p.submit(blob) == receipt(blob)
    await p.wait_for_freeze()
    await p.frozen()


async def gather(*aws: Awaitable[Any], timeout: float = TIMEOUT) -> list[Any]:
    async with asyncio.timeout(timeout):
        return list(await asyncio.gather(*aws))


# -- outgoing ----------------------------------------------------------------------


async def test_five_participants_hand_over_and_the_daemon_commits(
    broker: PrivateBroker, host_id: str, daemon: DaemonProc, operator: OperatorClient
) -> None:
    names = [f"vm-{i}" for i in range(5)]
    # vm-0..vm-2 wait for the freeze and report frozen; vm-3 and vm-4 do it from
    # on_freeze, which may make requests itself (it runs outside the message loop).
    by_callback = {"vm-3", "vm-4"}
    froze: Counter[str] = Counter()
    by_name: dict[str, Participant] = {}

    async def on_freeze(name: str) -> None:
        froze.update([name])
        if name in by_callback:
            await by_name[name].frozen()

    async with contextlib.AsyncExitStack() as stack:
        for i, n in enumerate(names):
            by_name[n] = await stack.enter_async_context(
                participant(
                    broker,
                    host_id,
                    n,
                    i,
                    # vm-1 freezes after vm-0; the SDK only lets it go when vm-0 is frozen.
                    freeze_after=("vm-0",) if n == "vm-1" else (),
                    on_freeze=lambda n=n: on_freeze(n),
                )
            )
        ps = list(by_name.values())
        for p in ps:
            data = await p.register()
            assert data["participant"]["name"] == p.name
        began = await operator(ControlOp.BEGIN, BeginRequest(deadline=60))
        hid = began["handover"]["id"]
        blobs = [fragment(p, 1) for p in ps]

        async def one(p: Participant, blob: bytes) -> None:
            if p.name not in by_callback:
                await hand_over(p, blob)
                return
            assert (await p.wait_for_begin()).id == hid
            assert await p.submit(blob) == receipt(blob)

        await gather(*(one(p, b) for p, b in zip(ps, blobs, strict=True)))
        final = await asyncio.wait_for(ps[0].wait_for_handover(committed), TIMEOUT)
        assert all(p.handover_id == hid for p in ps)
        await until(lambda: froze == Counter(names))  # once per handover each

    assert final.id == hid and final.payload is not None
    path = daemon.state_dir / "payload.kho"
    assert final.payload["path"] == str(path)
    image = PayloadImage.from_file(path)
    assert image.handover_id == hid
    order = [e.name for e in image.entries]
    assert sorted(order) == names and order.index("vm-0") < order.index("vm-1")
    for n, blob in zip(names, blobs, strict=True):
        assert image.retrieve(n) == blob


async def test_resubmit_and_revise_replace_the_fragment_until_frozen(
    broker: PrivateBroker, host_id: str, daemon: DaemonProc, operator: OperatorClient
) -> None:
    async with (
        participant(broker, host_id, "vm-a", 1) as a,
        participant(broker, host_id, "vm-b", 2) as b,
    ):
        await a.register()
        await b.register()
        await operator(ControlOp.BEGIN, BeginRequest(auto_freeze=False))
        await gather(a.wait_for_begin(), b.wait_for_begin())

        a1, a2, a3 = (fragment(a, v) for v in (1, 2, 3))
        assert await a.submit(a1) == receipt(a1)
        assert await a.submit(a2) == receipt(a2)
        await until(lambda: a.status is not None and a.status.fragment_sha256 == receipt(a2).sha256)

        b1, b2 = fragment(b, 1), fragment(b, 2)
        await b.submit(b1)
        await b.revise()  # b's state changed: its fragment is stale until the next one
        await until(lambda: b.status is not None and b.status.state == "preparing")
        assert b.status is not None and b.status.fragment_sha256 is None
        with pytest.raises(RemoteError) as refused:
            await operator(ControlOp.FREEZE, FreezeRequest())
        assert "vm-b" in str(refused.value)
        await b.submit(b2)

        await operator(ControlOp.FREEZE, FreezeRequest())
        await gather(a.wait_for_freeze(), b.wait_for_freeze())
        await a.frozen()
        with pytest.raises(RemoteError) as late:
            await a.submit(a3)  # frozen: the fragment is final
        assert late.value.code == "illegal-transition"
        await b.frozen()
        await asyncio.wait_for(a.wait_for_handover(committed), TIMEOUT)

    image = PayloadImage.from_file(daemon.state_dir / "payload.kho")
    assert image.retrieve("vm-a") == a2
    assert image.retrieve("vm-b") == b2


async def test_abort_cancels_every_participant_with_the_reason(
    broker: PrivateBroker, host_id: str, daemon: DaemonProc, operator: OperatorClient
) -> None:
    names = ["c-0", "c-1", "c-2"]
    heard: dict[str, list[str]] = {n: [] for n in names}

    async def on_cancel(reason: str, name: str) -> None:
        heard[name].append(reason)

    async with contextlib.AsyncExitStack() as stack:
        ps = [
            await stack.enter_async_context(
                participant(broker, host_id, n, i, on_cancel=lambda r, n=n: on_cancel(r, n))
            )
            for i, n in enumerate(names)
        ]
        for p in ps:
            await p.register()
        await operator(ControlOp.BEGIN, BeginRequest())
        await gather(*(p.wait_for_begin() for p in ps))
        for p in ps[:2]:  # c-2 never serializes, so nobody may freeze
            await p.submit(fragment(p, 1))
        freezes = [asyncio.create_task(p.wait_for_freeze()) for p in ps]
        cancels = [asyncio.create_task(p.wait_for_cancel()) for p in ps]
        await asyncio.sleep(0.1)
        assert not any(t.done() for t in freezes + cancels)

        reason = "maintenance window closed"
        await operator(ControlOp.ABORT, AbortRequest(reason=reason))
        for t in freezes:
            with pytest.raises(HandoverCancelled) as info:
                await asyncio.wait_for(t, TIMEOUT)
            assert info.value.reason == reason
        assert await gather(*cancels) == [reason] * 3
        await until(lambda: all(heard[n] == [reason] for n in names))
        for p in ps:
            assert p.handover is not None and p.handover.state == "idle"
            assert p.handover.abort_reason == reason
            await until(lambda p=p: p.status is not None and p.status.state == "registered")

        # The cancelled handover stays cancelled; the next one is taken part in anew.
        again = await operator(ControlOp.BEGIN, BeginRequest())
        statuses = await gather(*(p.wait_for_begin() for p in ps))
        assert {s.id for s in statuses} == {again["handover"]["id"]}
        await asyncio.sleep(0.1)
        assert all(heard[n] == [reason] for n in names)


# -- failures ------------------------------------------------------------------------


async def spawn_example(broker: PrivateBroker, host: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        "--broker",
        broker.url,
        "--host-id",
        host,
        "--timeout",
        str(TIMEOUT),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )


async def next_event(proc: asyncio.subprocess.Process, want: str) -> dict[str, Any]:
    """The next JSON line of the example whose event is ``want``."""
    assert proc.stdout is not None and proc.stderr is not None
    async with asyncio.timeout(TIMEOUT):
        while True:
            line = await proc.stdout.readline()
            if not line:
                err = (await proc.stderr.read()).decode(errors="replace")
                raise AssertionError(f"example exited ({await proc.wait()}) before {want}: {err}")
            event: dict[str, Any] = json.loads(line)
            if event["event"] == want:
                return event


async def finish_example(proc: asyncio.subprocess.Process) -> tuple[int, list[dict[str, Any]]]:
    async with asyncio.timeout(TIMEOUT):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    assert proc.returncode == 0, err.decode(errors="replace")
    return proc.returncode, [json.loads(line) for line in out.splitlines()]


@contextlib.asynccontextmanager
async def reaping(*procs: asyncio.subprocess.Process) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_a_killed_participant_aborts_the_handover_through_its_will(
    broker: PrivateBroker, host_id: str, daemon: DaemonProc, operator: OperatorClient
) -> None:
    async with participant(broker, host_id, "survivor", 1) as other:
        await other.register()
        await operator(ControlOp.BEGIN, BeginRequest(expect=["survivor", "vm-killed"]))
        await other.wait_for_begin()
        proc = await spawn_example(broker, host_id, "--name", "vm-killed", "--instance", "5")
        async with reaping(proc):
            await next_event(proc, "resubmitted")  # its fragment is durable
            proc.kill()
            await proc.wait()
            reason = await asyncio.wait_for(other.wait_for_cancel(), TIMEOUT)
        assert "vm-killed" in reason and "vanished" in reason
        assert other.handover is not None and other.handover.abort_reason == reason
        with pytest.raises(HandoverCancelled):
            await other.wait_for_freeze()


async def test_a_clean_exit_sends_no_will(
    broker: PrivateBroker, host_id: str, daemon: DaemonProc, operator: OperatorClient
) -> None:
    async with participant(broker, host_id, "stays", 1) as stays:
        await stays.register()
        async with participant(broker, host_id, "leaves", 2) as leaves:
            await leaves.register()
            await operator(ControlOp.BEGIN, BeginRequest())
            await leaves.wait_for_begin()
        await stays.wait_for_begin()
        await asyncio.sleep(0.5)  # a will would have arrived by now
        status = await operator(ControlOp.STATUS)
        assert status["handover"]["state"] == "preparing"
        assert stays.handover is not None and stays.handover.abort_reason is None
        assert {p["name"]: p["state"] for p in status["participants"]} == {
            "leaves": "preparing",
            "stays": "preparing",
        }


async def test_a_restarted_participant_stays_registered(
    broker: PrivateBroker, host_id: str, daemon: DaemonProc, operator: OperatorClient
) -> None:
    old = await spawn_example(broker, host_id, "--name", "vm-r", "--instance", "1")
    async with reaping(old):
        await next_event(old, "registered")
        old.send_signal(signal.SIGSTOP)  # hung, its connection still open
        # Its replacement: same name, same (stable) client id. The broker takes
        # the session over and publishes the old connection's will.
        async with Participant(
            "vm-r",
            compatible="khod-example,vmm-v1",
            instance=1,
            broker=broker.url,
            host_id=host_id,
            request_timeout=TIMEOUT,
        ) as new:
            await new.register()
            await asyncio.sleep(2.0)  # past the daemon's gone_grace
            status = await operator(ControlOp.STATUS)
    assert [(p["name"], p["state"]) for p in status["participants"]] == [("vm-r", "registered")]


@pytest.mark.parametrize("graceful", [False, True], ids=["broker-crash", "broker-restart"])
async def test_a_broker_restart_mid_handover_loses_no_fragment(
    broker: PrivateBroker,
    host_id: str,
    daemon: DaemonProc,
    operator: OperatorClient,
    graceful: bool,
) -> None:
    names = ["r-0", "r-1", "r-2"]
    async with contextlib.AsyncExitStack() as stack:
        ps = [
            await stack.enter_async_context(participant(broker, host_id, n, i))
            for i, n in enumerate(names)
        ]
        for p in ps:
            await p.register()
        await operator(ControlOp.BEGIN, BeginRequest())
        await gather(*(p.wait_for_begin() for p in ps))
        blobs = [fragment(p, 7) for p in ps]

        assert await ps[0].submit(blobs[0]) == receipt(blobs[0])  # before
        during = asyncio.create_task(ps[1].submit(blobs[1]))  # as the broker goes away
        # broker.restart(), in two halves so that a request is made in between.
        await asyncio.to_thread(broker.stop, kill=not graceful)
        after = asyncio.create_task(ps[2].submit(blobs[2]))  # while it is away
        await asyncio.sleep(0.3)
        assert not after.done()
        await asyncio.to_thread(broker.start)
        assert await gather(during, after) == [receipt(blobs[1]), receipt(blobs[2])]

        await gather(*(p.wait_for_freeze() for p in ps))
        await gather(*(p.frozen() for p in ps))
        await asyncio.wait_for(ps[0].wait_for_handover(committed), TIMEOUT)

    image = PayloadImage.from_file(daemon.state_dir / "payload.kho")
    for n, blob in zip(names, blobs, strict=True):
        assert image.retrieve(n) == blob


# -- incoming ------------------------------------------------------------------------


async def test_restore_gives_back_every_fragment_then_releases(
    broker: PrivateBroker,
    host_id: str,
    daemon: DaemonProc,
    daemon_factory: DaemonFactory,
    operator: OperatorClient,
) -> None:
    names = ["s-0", "s-1", "s-2"]
    # s-2 restores after s-0: it may only retrieve once s-0 has finished.
    after = {"s-2": ("s-0",)}
    async with contextlib.AsyncExitStack() as stack:
        ps = [
            await stack.enter_async_context(
                participant(broker, host_id, n, i, restore_after=after.get(n, ()))
            )
            for i, n in enumerate(names)
        ]
        for p in ps:
            await p.register()
        await operator(ControlOp.BEGIN, BeginRequest())
        blobs = {p.name: fragment(p, 3) for p in ps}
        await gather(*(hand_over(p, blobs[p.name]) for p in ps))
        done = await asyncio.wait_for(ps[0].wait_for_handover(committed), TIMEOUT)

    # The kexec: the old daemon and participants are gone, a new boot restores.
    await asyncio.to_thread(daemon.stop)
    restorer = daemon_factory("restore")
    await asyncio.to_thread(restorer.start, restore=daemon.state_dir / "payload.kho")
    finished: list[str] = []

    async def restore(p: Participant) -> bytes:
        blob = await p.retrieve()
        if p.name == "s-2":
            assert "s-0" in finished
        await p.finish()
        finished.append(p.name)
        return blob

    async with contextlib.AsyncExitStack() as stack:
        ps = [
            await stack.enter_async_context(participant(broker, host_id, n, i))
            for i, n in enumerate(names)
        ]
        # One that is not in the payload is told so (after its claim could
        # have arrived), not left waiting.
        stranger = await stack.enter_async_context(participant(broker, host_id, "s-9", 9))
        with pytest.raises(RemoteError) as unknown:
            await asyncio.wait_for(stranger.retrieve(), TIMEOUT)
        assert unknown.value.code == "unknown-participant"
        got = await gather(*(restore(p) for p in ps))
        assert got == [blobs[n] for n in names]
        released = await asyncio.wait_for(
            ps[0].wait_for_handover(lambda s: s.side == "incoming" and s.state == "released"),
            TIMEOUT,
        )
    assert released.id == done.id
    assert finished.index("s-0") < finished.index("s-2")


async def test_the_example_participant_end_to_end(
    broker: PrivateBroker,
    host_id: str,
    daemon: DaemonProc,
    daemon_factory: DaemonFactory,
    operator: OperatorClient,
) -> None:
    instances = ["11", "12"]
    async with participant(broker, host_id, "observer", 99) as observer:  # never registers
        procs = [await spawn_example(broker, host_id, "--instance", i) for i in instances]
        async with reaping(*procs):
            for proc in procs:
                await next_event(proc, "registered")
            await operator(ControlOp.BEGIN, BeginRequest())
            results = [await finish_example(proc) for proc in procs]
        for _, events in results:
            assert [e["event"] for e in events] == ["begin", "submitted", "resubmitted", "frozen"]
        done = await asyncio.wait_for(observer.wait_for_handover(committed), TIMEOUT)

        await asyncio.to_thread(daemon.stop)
        restorer = daemon_factory("restore")
        await asyncio.to_thread(restorer.start, restore=daemon.state_dir / "payload.kho")
        procs = [
            await spawn_example(broker, host_id, "--instance", i, "--restore") for i in instances
        ]
        async with reaping(*procs):
            results = [await finish_example(proc) for proc in procs]
        for i, (_, events) in zip(instances, results, strict=True):
            restored = next(e for e in events if e["event"] == "restored")
            vm = restored["vm"]
            assert vm["name"] == f"guest-{i}" and vm["vcpus"] == 4
            assert len(vm["memory"]) == 2
            # The second serialization (with the hot-plugged disk) is what came back.
            assert [d["type"] for d in vm["devices"]] == ["virtio-net", "virtio-blk"]
            assert events[-1]["event"] == "finished"
        released = await asyncio.wait_for(
            observer.wait_for_handover(lambda s: s.side == "incoming" and s.state == "released"),
            TIMEOUT,
        )
        assert released.id == done.id


async def test_retrieve_gives_up_after_its_timeout_when_nothing_is_restored(
    broker: PrivateBroker, host_id: str, daemon: DaemonProc
) -> None:
    async with participant(broker, host_id, "nothing-to-get", 1) as p:
        with pytest.raises(RequestTimeout, match="no incoming payload"):
            await p.retrieve(timeout=0.5)
