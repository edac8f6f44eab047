"""What the daemon sends during the blackout, in-process (a real store, a recording publisher).

The rule of issue 6: from the freeze signal to the commit, every participant
gets O(1) bytes: the compact broadcast, its reply, and its own state only when
that state is a signal to it (``may_freeze``); its own ``frozen`` is held until
the blackout is over. A burst of requests is made durable together.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from khod_wire.fragment import start_storage
from khod_wire.protocol import DTB, JSON, ControlOp, ParticipantOp, Topics
from tests.fakes import InProcessBus, settle

HOST = "bo"
T = Topics(HOST)


def fragment(name: str, i: int) -> bytes:
    b = start_storage(f"test,{name}-v1", i)
    b.property_u32("n", i)
    return b.finish_storage()


class Bus(InProcessBus):
    """Requests sent without waiting for the worker: a burst, as from the bus."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, HOST, handover_deadline=600)

    async def send(self, name: str | None, op: str, body: bytes | dict[str, Any] = b"") -> None:
        self.n += 1
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        if name is None:
            topic, reply_to = T.control(ControlOp(op)), T.control_reply("t")
        else:
            topic, reply_to = T.request(name, ParticipantOp(op)), T.reply(name)
        ctype = DTB if op == "fragment" else JSON
        await self.daemon.handle(topic, body, (ctype, reply_to, f"c{self.n}".encode()))

    def states(self, start: int) -> list[tuple[str, str]]:
        return [
            (t.split("/")[-2], json.loads(p)["state"])
            for t, p, kw in self.pub.sent[start:]
            if t.endswith("/state") and kw.get("retain") and p
        ]


def test_a_participants_own_frozen_waits_for_the_end_of_the_blackout(tmp_path: Path) -> None:
    async def run() -> None:
        bus = Bus(tmp_path)
        names = ["a", "b", "c"]
        for i, n in enumerate(names):
            await bus.send(n, "register", {"compatible": f"test,{n}-v1", "instance": i})
        await bus.send(None, "begin", {"deadline": 60})
        await settle(bus.daemon)
        for i, n in enumerate(names):
            await bus.send(n, "fragment", fragment(n, i))
        await settle(bus.daemon)
        assert bus.daemon.out.handover.state == "freezing"
        # Each link node was built as its fragment arrived: assembly only joins.
        assert len(bus.daemon.commit.links) == len(names)
        start = len(bus.pub.sent)
        await bus.send("a", "frozen")
        await bus.send("b", "frozen")
        await settle(bus.daemon)
        assert bus.states(start) == []  # held: no participant is told of another's freeze
        replies = [t for t, _, _ in bus.pub.sent[start:] if t.endswith("/reply")]
        assert replies == [T.reply("a"), T.reply("b")]
        start = len(bus.pub.sent)
        await bus.send("c", "frozen")
        await settle(bus.daemon)
        assert bus.daemon.out.handover.state == "committed"
        # Once committed, every held state is published, each once, and
        # after the outcome: the commit does not wait for N messages.
        assert sorted(bus.states(start)) == [("a", "frozen"), ("b", "frozen"), ("c", "frozen")]
        topics = [t for t, _, _ in bus.pub.sent[start:]]
        first_state = min(i for i, t in enumerate(topics) if t.endswith("/state"))
        assert topics.index(T.handover) < first_state
        bus.store.close()

    asyncio.run(run())


def test_the_broadcast_shows_what_participants_act_on_not_the_steps_between(
    tmp_path: Path,
) -> None:
    # frozen and assembled would each be one more message to every
    # participant inside the blackout; progress shows them instead.
    async def run() -> None:
        bus = Bus(tmp_path)
        names = ["a", "b"]
        for i, n in enumerate(names):
            await bus.send(n, "register", {"compatible": f"test,{n}-v1", "instance": i})
        start = len(bus.pub.sent)
        await bus.send(None, "begin", {"deadline": 60})
        await settle(bus.daemon)
        for i, n in enumerate(names):
            await bus.send(n, "fragment", fragment(n, i))
        await settle(bus.daemon)
        for n in names:
            await bus.send(n, "frozen")
        await settle(bus.daemon)
        assert bus.daemon.out.handover.state == "committed"
        signals = [json.loads(p) for t, p, _ in bus.pub.sent[start:] if t == T.handover]
        assert [s["state"] for s in signals] == ["preparing", "freezing", "committed"]
        assert [s["seq"] for s in signals] == sorted({s["seq"] for s in signals})
        bus.store.close()

    asyncio.run(run())


def test_a_dependent_is_told_at_once_when_it_may_freeze(tmp_path: Path) -> None:
    async def run() -> None:
        bus = Bus(tmp_path)
        await bus.send("a", "register", {"compatible": "test,a-v1", "instance": 0})
        await bus.send(
            "b", "register", {"compatible": "test,b-v1", "instance": 1, "freeze_after": ["a"]}
        )
        await bus.send(None, "begin", {"deadline": 60})
        await bus.send("a", "fragment", fragment("a", 0))
        await bus.send("b", "fragment", fragment("b", 1))
        await settle(bus.daemon)
        start = len(bus.pub.sent)
        await bus.send("a", "frozen")
        await settle(bus.daemon)
        sent = [json.loads(p) for t, p, _ in bus.pub.sent[start:] if t == T.state("b") and p]
        assert [(s["state"], s["may_freeze"]) for s in sent] == [("serialized", True)]
        bus.store.close()

    asyncio.run(run())


def test_a_burst_of_requests_is_one_transaction(tmp_path: Path) -> None:
    async def run() -> None:
        bus = Bus(tmp_path)
        commits = 0
        real = bus.store.transaction

        def counting():  # type: ignore[no-untyped-def]
            nonlocal commits
            if bus.store._depth == 0:
                commits += 1
            return real()

        bus.store.transaction = counting  # type: ignore[method-assign]
        for i in range(20):
            await bus.send(f"p{i}", "register", {"compatible": f"test,p{i}-v1", "instance": i})
        await settle(bus.daemon)
        assert len(bus.daemon.out.participants) == 20
        assert commits == 1, commits
        bus.store.close()

    asyncio.run(run())
