"""Contract gaps an implementer from the docs alone tripped on (issue 8, item 15).

Requests go through ``Daemon.handle`` in-process, with a real store and a
publisher that records what the daemon would put on the bus.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from khod import inspect
from khod.monitor import participants_table
from khod.payload import PayloadImage
from khod_wire.errors import PayloadError
from khod_wire.fragment import start_storage
from khod_wire.protocol import (
    JSON,
    ParticipantStatus,
    Reply,
)
from tests.fakes import InProcessBus

HOST = "gaps"
COMPAT = "example,vm-v1"


def fragment(instance: int) -> bytes:
    b = start_storage(COMPAT, instance)
    b.property_u32("vcpus", 4)
    return b.finish_storage()


class Bus(InProcessBus):
    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir, HOST)

    def retained(self, start: int = 0) -> list[tuple[str, bytes]]:
        return [(t, p) for t, p, kw in self.pub.sent[start:] if kw.get("retain")]


async def committed(tmp: Path) -> Path:
    """A committed handover of vm-a (instance 1); the path of its payload image."""
    bus = Bus(tmp / "before")
    await bus.ok("vm-a", "register", {"compatible": COMPAT, "instance": 1})
    await bus.ok(None, "begin", {"deadline": 60})
    await bus.ok("vm-a", "fragment", fragment(1))
    await bus.ok("vm-a", "frozen")
    assert bus.daemon.handover_status().state == "committed"
    bus.store.close()
    return bus.settings.payload_path


# -- registering while the host restores ---------------------------------------------


def test_a_registration_during_a_restore_is_confirmed_at_once(tmp_path: Path) -> None:
    async def run() -> None:
        image = await committed(tmp_path)
        bus = Bus(tmp_path / "after")
        bus.daemon.load_incoming(image)
        assert bus.daemon.handover_status().side == "incoming"
        start = len(bus.pub.sent)
        data = await bus.ok(
            "vm-a", "register", {"compatible": COMPAT, "instance": 1, "freeze_after": []}
        )
        # The reply shows the restore, and the registration it just made.
        me = ParticipantStatus.model_validate(data["participant"])
        assert me.state == "available"
        assert me.registration is not None
        assert me.registration.state == "registered"
        assert (me.registration.compatible, me.registration.instance) == (COMPAT, 1)
        # So does the retained state...
        [(_, body)] = [(t, p) for t, p in bus.retained(start) if t == bus.t.state("vm-a")]
        retained = ParticipantStatus.model_validate_json(body)
        assert retained.registration == me.registration
        # ... and status.
        status = await bus.ok(None, "status")
        [listed] = status["participants"]
        assert listed["registration"]["state"] == "registered"
        # An operator sees it too.
        console = Console(width=200, record=True)
        console.print(participants_table([ParticipantStatus.model_validate(listed)]))
        assert "available (next: registered)" in console.export_text()
        # Restoring goes on as before, the registration shown throughout.
        assert bytes.fromhex((await bus.ok("vm-a", "retrieve"))["raw"]) == fragment(1)
        data = await bus.ok("vm-a", "finish")
        assert data["participant"]["state"] == "finished"
        assert data["participant"]["registration"]["state"] == "registered"
        bus.store.close()

    asyncio.run(run())


def test_without_a_registration_the_restore_record_has_none(tmp_path: Path) -> None:
    async def run() -> None:
        image = await committed(tmp_path)
        bus = Bus(tmp_path / "after")
        bus.daemon.load_incoming(image)
        status = await bus.ok(None, "status")
        [listed] = status["participants"]
        assert listed["state"] == "available" and listed["registration"] is None
        bus.store.close()

    asyncio.run(run())


# -- a no-op revise -------------------------------------------------------------------


def test_a_revise_with_nothing_to_revise_publishes_nothing(tmp_path: Path) -> None:
    async def run() -> None:
        bus = Bus(tmp_path)
        await bus.ok("vm-a", "register", {"compatible": COMPAT, "instance": 1})
        await bus.ok(None, "begin", {"deadline": 60, "auto_freeze": False})
        before = bus.daemon.participant_status("vm-a")
        assert before is not None and before.state == "preparing"
        transitions = len(bus.store.transitions())
        start = len(bus.pub.sent)
        data = await bus.ok("vm-a", "revise")
        assert data["participant"] == before.model_dump()  # same updated_at
        assert bus.retained(start) == []
        assert len(bus.store.transitions()) == transitions
        # A revise that withdraws a fragment still does change and publish.
        await bus.ok("vm-a", "fragment", fragment(1))
        start = len(bus.pub.sent)
        data = await bus.ok("vm-a", "revise")
        assert data["participant"]["state"] == "preparing"
        assert data["participant"]["fragment_sha256"] is None
        assert bus.t.state("vm-a") in [t for t, _ in bus.retained(start)]
        bus.store.close()

    asyncio.run(run())


def test_a_revise_outside_a_handover_is_still_refused(tmp_path: Path) -> None:
    async def run() -> None:
        bus = Bus(tmp_path)
        await bus.ok("vm-a", "register", {"compatible": COMPAT, "instance": 1})
        reply = await bus.call("vm-a", "revise")
        assert not reply.ok and reply.error is not None and reply.error.code == "busy"
        bus.store.close()

    asyncio.run(run())


# -- the image ends with its last fragment ----------------------------------------------


@pytest.mark.parametrize("extra", [b"\0", bytes(4096), b"\1"])
def test_bytes_after_the_last_fragment_are_refused(
    tmp_path: Path, extra: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    image = asyncio.run(committed(tmp_path))
    good = image.read_bytes()
    PayloadImage.parse(good)
    assert inspect.main(image) == 0
    bad = tmp_path / "trailing.kho"
    bad.write_bytes(good + extra)
    with pytest.raises(PayloadError, match=f"{len(extra)} bytes after participant 'vm-a'"):
        PayloadImage.parse(bad.read_bytes())
    capsys.readouterr()
    assert inspect.main(bad) == 1
    assert "bytes after participant 'vm-a'" in capsys.readouterr().err


# -- error precedence (protocol.md §7.1): where two refusals apply, the first one wins ----

BIG = b"\0" * 5000  # over the default max_fragment_size, and not an FDT either


@pytest.mark.parametrize(
    ("setup", "name", "op", "body", "code", "says"),
    [
        # an invalid name that also names itself: the name is checked first
        ([], "-x", "register", {**{"compatible": COMPAT, "instance": 9}, "freeze_after": ["-x"]},
         "bad-registration", "-x"),
        ([], "vm-b", "register", {"compatible": COMPAT, "instance": 1, "freeze_after": ["vm-b"]},
         "bad-ordering", "itself"),
        # too large and from an unknown participant: the size first
        ([], "nobody", "fragment", BIG, "fragment-too-large", "5000"),
        # unknown and outside any handover: unknown first
        ([], "nobody", "revise", b"", "unknown-participant", "nobody"),
        ([], "vm-a", "revise", b"", "busy", "not part of a running handover"),
        # the handover is preparing and vm-a is not serialized: busy before illegal-transition
        (["begin"], "vm-a", "frozen", b"", "busy", "not freezing"),
        (["begin"], "nobody", "fail", b"", "unknown-participant", "nobody"),
        # no incoming payload, and no such participant: busy first
        ([], "nobody", "retrieve", b"", "busy", "no incoming payload"),
        ([], "nobody", "finish", b"", "busy", "no incoming payload"),
        # a handover already running, and an invalid expect: the state first
        (["begin"], None, "begin", {"expect": ["-bad"]}, "illegal-transition", "begin"),
        ([], None, "begin", {"expect": ["-bad"]}, "bad-registration", "-bad"),
        ([], None, "begin", {"expect": []}, "no-participants", "expect"),
        # idle, and nothing serialized: the state first
        ([], None, "freeze", {"force": True}, "illegal-transition", "freeze"),
        (["begin"], None, "freeze", {}, "not-ready", "vm-a"),
        ([], None, "abort", {}, "illegal-transition", "abort"),
        # a body that is malformed in two ways: the body is refused as a whole
        ([], "vm-a", "fail", {"reason": 5, "extra": 1}, "bad-request", "reason"),
    ],
)  # fmt: skip
def test_the_first_applicable_refusal_wins(
    tmp_path: Path,
    setup: list[str],
    name: str | None,
    op: str,
    body: bytes | dict[str, Any],
    code: str,
    says: str,
) -> None:
    async def run() -> None:
        bus = Bus(tmp_path)
        await bus.ok("vm-a", "register", {"compatible": COMPAT, "instance": 1})
        if "begin" in setup:
            await bus.ok(None, "begin", {"deadline": 60, "auto_freeze": False})
        before = bus.daemon.handover_status().model_dump(exclude={"updated_at"})
        reply = await bus.call(name, op, body)
        assert not reply.ok and reply.error is not None
        assert reply.error.code == code, reply.error
        assert says in reply.error.message, reply.error
        assert bus.daemon.handover_status().model_dump(exclude={"updated_at"}) == before
        bus.store.close()

    asyncio.run(run())


def test_long_correlation_data_is_refused_before_the_op_is_looked_at(tmp_path: Path) -> None:
    async def run() -> None:
        bus = Bus(tmp_path)
        start = len(bus.pub.sent)
        reply_to = bus.t.control_reply("t")
        topic = f"{bus.t.prefix}/ctl/req/no-such-op"
        await bus.daemon.handle(topic, b"", (JSON, reply_to, b"c" * 200))
        [(_, payload, _)] = [s for s in bus.pub.sent[start:] if s[0] == reply_to]
        reply = Reply.model_validate_json(payload)
        assert reply.error is not None and reply.error.code == "bad-request"
        assert "correlation data" in reply.error.message
        bus.store.close()

    asyncio.run(run())
