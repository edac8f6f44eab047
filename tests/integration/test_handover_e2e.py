"""End to end with the SDK: handovers and restores as operators and components see them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from khod.payload import PayloadImage
from khod.store import Store
from khod_client import HandoverCancelled, Participant
from khod_wire.errors import RemoteError
from khod_wire.protocol import ControlOp, HandoverStatus, ParticipantOp, ParticipantStatus, Topics
from tests.busclient import OperatorClient, RawClient, until, watcher
from tests.daemonproc import DaemonFactory, DaemonProc
from tests.storeview import stored_fragments

pytestmark = pytest.mark.integration


def fragment_for(p: Participant, revision: int) -> bytes:
    b = p.start_storage()
    b.property_u32("revision", revision)
    b.property_string("owner", p.name)
    b.property_bytes("state", p.name.encode() * (1 + revision))
    return b.finish_storage()


def participant(d: DaemonProc, name: str, instance: int, **kw: object) -> Participant:
    return Participant(
        name,
        compatible="test,e2e-v1",
        instance=instance,
        broker=d.broker.url,
        host_id=d.host_id,
        **kw,  # type: ignore[arg-type]
    )


async def control(d: DaemonProc, op: ControlOp, body: dict[str, Any] | None = None) -> Any:
    async with OperatorClient(d.broker.url, d.host_id) as operator:
        return await operator(op, body)


async def outgoing(p: Participant, revisions: int = 1) -> bytes:
    await p.register()
    await p.wait_for_begin()
    blob = b""
    for rev in range(1, revisions + 1):
        blob = fragment_for(p, rev)
        await p.submit(blob)
    await p.wait_for_freeze()
    await p.frozen()
    return blob


async def test_fifty_participants_handover_and_restore(
    daemon: DaemonProc, daemon_factory: DaemonFactory
) -> None:
    n = 50
    t = Topics(daemon.host_id)
    seen_handover_states: list[str] = []
    async with watcher(daemon.broker.url, f"{t.prefix}/#") as latest:
        parts = [participant(daemon, f"c{i:02d}", i) for i in range(n)]
        for p in parts:
            await p.__aenter__()
        try:
            tasks = [
                asyncio.create_task(outgoing(p, revisions=1 + i % 3)) for i, p in enumerate(parts)
            ]
            await until(lambda: sum(k.endswith("/state") for k in latest) == n, what="registered")
            await control(daemon, ControlOp.BEGIN, {"deadline": 120})

            def committed() -> bool:
                body = latest.get(t.handover)
                if body:
                    state = json.loads(body)["state"]
                    if not seen_handover_states or seen_handover_states[-1] != state:
                        seen_handover_states.append(state)
                    return bool(state == "committed")
                return False

            await until(committed, timeout=60, what="commit")
            submitted = dict(
                zip([p.name for p in parts], await asyncio.gather(*tasks), strict=True)
            )
        finally:
            for p in parts:
                await p.__aexit__(None, None, None)
        # What a plain MQTT monitor sees, from the retained topics alone.
        handover = HandoverStatus.model_validate_json(latest[t.handover])
        assert handover.state == "committed"
        # progress follows at the daemon's own pace (a few times a second):
        # a short handover can commit before it is first published.
        await until(
            lambda: (
                t.progress in latest
                and HandoverStatus.model_validate_json(latest[t.progress]).state == "committed"
            ),
            what="progress",
        )
        assert len(HandoverStatus.model_validate_json(latest[t.progress]).expected) == n
        assert handover.payload is not None and handover.payload["participants"] == n
        assert "preparing" in seen_handover_states or "freezing" in seen_handover_states
        for name, blob in submitted.items():
            st = ParticipantStatus.model_validate_json(latest[t.state(name)])
            assert st.state == "frozen"
            assert st.fragment_size == len(blob)
    image_path = daemon.state_dir / "payload.kho"
    image = PayloadImage.from_file(image_path)
    assert {e.name: image.retrieve(e.name) for e in image.entries} == submitted

    # The other side of the kexec: a fresh daemon, every fragment back byte for byte.
    daemon.stop()
    incoming = daemon_factory("incoming")
    await asyncio.to_thread(incoming.start, restore=image_path)
    restored: dict[str, bytes] = {}

    async def restore(name: str, i: int) -> None:
        async with participant(incoming, name, i) as p:
            restored[name] = await p.retrieve()
            await p.finish()

    async with watcher(incoming.broker.url, t.handover) as latest:
        await asyncio.gather(*(restore(f"c{i:02d}", i) for i in range(n)))
        await until(
            lambda: json.loads(latest.get(t.handover, b"{}") or b"{}").get("state") == "released",
            what="released",
        )
    assert restored == submitted


async def test_ordering_is_honoured_in_freeze_and_restore(
    daemon: DaemonProc, daemon_factory: DaemonFactory
) -> None:
    # chain: base <- mid <- top, plus an independent one
    spec = {"base": (), "mid": ("base",), "top": ("mid",), "solo": ()}
    parts = {
        n: participant(daemon, n, i, freeze_after=deps, restore_after=deps)
        for i, (n, deps) in enumerate(spec.items())
    }
    for p in parts.values():
        await p.__aenter__()
    try:
        # Start the dependants first: the daemon, not luck, must order them.
        tasks = [asyncio.create_task(outgoing(parts[n])) for n in ("top", "mid", "solo", "base")]
        await until(lambda: all(p.status is not None for p in parts.values()), what="registered")
        await control(daemon, ControlOp.BEGIN, {"deadline": 60})
        await asyncio.gather(*tasks)
    finally:
        for p in parts.values():
            await p.__aexit__(None, None, None)
    daemon.stop()
    with Store(daemon.state_dir) as store:
        frozen_at = {t.subject: t.seq for t in store.transitions() if t.event == "freeze"}
    assert frozen_at["base"] < frozen_at["mid"] < frozen_at["top"]

    incoming = daemon_factory("incoming")
    await asyncio.to_thread(incoming.start, restore=daemon.state_dir / "payload.kho")

    async def restore(name: str, i: int) -> None:
        async with participant(incoming, name, i) as p:
            await p.retrieve()
            await p.finish()

    await asyncio.gather(*(restore(n, i) for i, n in reversed(list(enumerate(spec)))))
    incoming.stop()
    with Store(incoming.state_dir) as store:
        events = [(t.subject, t.event) for t in store.transitions()]
    for before, after in (("base", "mid"), ("mid", "top")):
        assert events.index((before, "finish")) < events.index((after, "retrieve"))


async def test_operator_abort_midway_cancels_everyone(daemon: DaemonProc) -> None:
    parts = [participant(daemon, f"a{i}", i) for i in range(4)]
    reasons: list[str] = []
    for p in parts:
        await p.__aenter__()
    try:
        for p in parts:
            await p.register()
        await control(daemon, ControlOp.BEGIN, {"deadline": 60})
        # Half serialize; the other half never do, so nobody freezes.
        for p in parts[:2]:
            await p.wait_for_begin()
            await p.submit(fragment_for(p, 1))
        waits = [asyncio.create_task(p.wait_for_freeze()) for p in parts]
        cancels = [asyncio.create_task(p.wait_for_cancel()) for p in parts]
        await asyncio.sleep(0.2)
        await control(daemon, ControlOp.ABORT, {"reason": "maintenance window closed"})
        for w in waits:
            with pytest.raises(HandoverCancelled):
                await w
        reasons = await asyncio.gather(*cancels)
    finally:
        for p in parts:
            await p.__aexit__(None, None, None)
    assert reasons == ["maintenance window closed"] * 4
    status = await control(daemon, ControlOp.STATUS)
    assert status["handover"]["state"] == "idle"
    assert status["handover"]["abort_reason"] == "maintenance window closed"
    assert {p["state"] for p in status["participants"]} == {"registered"}
    daemon.stop()
    assert stored_fragments(daemon.state_dir) == {}
    with Store(daemon.state_dir) as store:
        assert store.load_handover()["state"] == "idle"  # type: ignore[index]


async def test_bad_fragment_is_refused_while_the_others_proceed(daemon: DaemonProc) -> None:
    good = [participant(daemon, f"g{i}", i) for i in range(3)]
    bad = participant(daemon, "bad", 99)
    for p in [*good, bad]:
        await p.__aenter__()
    try:
        for p in [*good, bad]:
            await p.register()
        await control(
            daemon, ControlOp.BEGIN, {"deadline": 60, "expect": [p.name for p in good] + ["bad"]}
        )
        await bad.wait_for_begin()
        wrong_instance = fragment_for(good[0], 1)  # instance 0, not 99
        cases: list[tuple[bytes, str]] = [
            (b"\xd0\x0d\xfe\xed" + b"\0" * 60, "bad-fragment"),
            (wrong_instance, "fragment-mismatch"),
            (b"x" * 5000, "fragment-too-large"),
        ]
        for blob, code in cases:
            with pytest.raises(RemoteError) as info:
                await bad.submit(blob)
            assert info.value.code == code, info.value
        assert bad.status is not None and bad.status.state == "preparing"
        tasks = [asyncio.create_task(outgoing_after_register(p)) for p in good]
        await bad.submit(fragment_for(bad, 1))  # it corrects itself; the handover goes on
        await bad.wait_for_freeze()
        await bad.frozen()
        await asyncio.gather(*tasks)
    finally:
        for p in [*good, bad]:
            await p.__aexit__(None, None, None)
    status = await control(daemon, ControlOp.STATUS)
    assert status["handover"]["state"] == "committed"


async def outgoing_after_register(p: Participant) -> None:
    await p.wait_for_begin()
    await p.submit(fragment_for(p, 1))
    await p.wait_for_freeze()
    await p.frozen()


async def test_illegal_requests_are_answered_and_change_nothing(daemon: DaemonProc) -> None:
    url, host = daemon.broker.url, daemon.host_id

    async def snapshot() -> dict:  # type: ignore[type-arg]
        s = await control(daemon, ControlOp.STATUS)
        s["handover"].pop("updated_at")
        return s  # type: ignore[no-any-return]

    async def refused(call: Callable[[], Awaitable[dict]], code: str) -> None:  # type: ignore[type-arg]
        before = await snapshot()
        reply = await call()
        assert not reply["ok"] and reply["error"]["code"] == code, reply
        assert await snapshot() == before

    async with (
        RawClient(url, host, "x") as x,
        RawClient(url, host, "y") as y,
        RawClient(url, host, "w") as w,
    ):
        # freeze before register, unknown participant
        await refused(lambda: x.op(ParticipantOp.FROZEN), "unknown-participant")
        await refused(lambda: x.op(ParticipantOp.FINISH), "busy")
        assert (await x.register("test,e2e-v1", 1))["ok"]
        assert (await w.register("test,e2e-v1", 3))["ok"]
        # duplicate name with another identity; same identity under another name
        await refused(lambda: x.register("test,other-v1", 1), "bad-registration")
        await refused(lambda: y.register("test,e2e-v1", 1), "bad-registration")
        async with participant(daemon, "x", 1) as px:
            blob_x = fragment_for(px, 1)
        async with participant(daemon, "w", 3) as pw:
            blob_w = fragment_for(pw, 1)
        # submit and freeze before the handover begins
        await refused(lambda: x.op(ParticipantOp.FRAGMENT, blob_x), "busy")
        await refused(lambda: x.op(ParticipantOp.FROZEN), "busy")
        await control(daemon, ControlOp.BEGIN, {"deadline": 60})
        # frozen while still preparing
        await refused(lambda: x.op(ParticipantOp.FROZEN), "busy")
        assert (await x.op(ParticipantOp.FRAGMENT, blob_x))["ok"]
        assert (await w.op(ParticipantOp.FRAGMENT, blob_w))["ok"]
        assert (await x.op(ParticipantOp.FROZEN))["ok"]
        # submit after freeze; registration while freezing
        await refused(lambda: x.op(ParticipantOp.FRAGMENT, blob_x), "illegal-transition")
        await refused(lambda: y.register("test,e2e-v1", 2), "busy")
        assert (await w.op(ParticipantOp.FROZEN))["ok"]
        # after commit: nothing changes any more
        await refused(lambda: w.op(ParticipantOp.FRAGMENT, blob_w), "busy")
        await refused(lambda: y.register("test,e2e-v1", 2), "busy")
        with pytest.raises(RemoteError) as info:
            await control(daemon, ControlOp.BEGIN)
        assert info.value.code == "illegal-transition"
        # (an abort now would withdraw the payload: tests/integration/test_retries.py)
