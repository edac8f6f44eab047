"""khod.restore: the incoming side, by story and against a model."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from khod.changes import Changes
from khod.lifecycle import HostRestoreState, RestoreState
from khod.restore import Claim, Incoming
from khod_wire.errors import (
    Busy,
    IllegalTransition,
    KhodError,
    OrderingError,
    UnknownParticipant,
)

R = RestoreState
RESTORING, RELEASED = HostRestoreState.RESTORING, HostRestoreState.RELEASED


def claim(name: str, *after: str, instance: int | str = 0) -> Claim:
    return Claim(
        name=name,
        compatible=f"test,{name}",
        instance=instance,
        size=4096,
        sha256=name.encode().hex().ljust(64, "0"),
        restore_after=tuple(after),
    )


def snapshot(inc: Incoming) -> Any:
    return copy.deepcopy(inc.to_record())


def refused(
    inc: Incoming, error: type[KhodError], call: Any, match: str | None = None
) -> KhodError:
    before = snapshot(inc)
    with pytest.raises(KhodError, match=match) as info:
        call()
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert snapshot(inc) == before
    return info.value


def states(inc: Incoming) -> dict[str, str]:
    return {n: str(c.state) for n, c in inc.claims.items()}


def three() -> Incoming:
    """db, vm (restores after db) and agent (after vm and a left-out 'gpu')."""
    return Incoming.start(
        "h1",
        [claim("vm", "db"), claim("agent", "vm", "gpu"), claim("db")],
        deadline=100.0,
        now=1.0,
    )


# -- stories ---------------------------------------------------------------------


def test_start() -> None:
    inc = three()
    assert inc.handover_id == "h1"
    assert inc.state is RESTORING
    assert inc.started_at == 1.0
    assert inc.released_at is None
    assert inc.unclaimed == ()
    assert inc.restore_order == ("db", "vm", "agent")
    assert set(states(inc).values()) == {"available"}
    assert inc.may_retrieve_now() == ["db"]
    assert inc.not_finished() == ["db", "vm", "agent"]
    assert inc.counts() == {"available": 3, "retrieved": 0, "finished": 0}


def test_start_refuses_a_cycle() -> None:
    with pytest.raises(OrderingError, match=r"^restore order has a cycle: a -> b -> a$"):
        Incoming.start("h", [claim("a", "b"), claim("b", "a")], deadline=9.0, now=0.0)


def test_happy_path_releases_when_everyone_finished() -> None:
    inc = three()
    c = inc.retrieve("db", now=2.0)
    assert [(t.subject, t.event, t.from_state, t.to_state) for t in c.transitions] == [
        ("db", "retrieve", "available", "retrieved")
    ]
    assert c.participants == {"db"} and not c.handover
    assert inc.claims["db"].updated_at == 2.0
    # A restarted participant retrieves again.
    assert inc.retrieve("db", now=2.5).transitions[0].from_state == "retrieved"
    inc.finish("db", now=3.0)
    assert inc.may_retrieve_now() == ["vm"]
    inc.retrieve("vm", now=4.0)
    inc.finish("vm", now=5.0)
    inc.retrieve("agent", now=6.0)
    assert inc.state is RESTORING
    c = inc.finish("agent", now=7.0)
    assert inc.state is RELEASED
    assert inc.released_at == 7.0
    assert inc.unclaimed == ()
    assert c.handover
    release = c.transitions[-1]
    assert (release.subject, release.event, release.from_state, release.to_state) == (
        "restore",
        "release",
        "restoring",
        "released",
    )
    assert release.detail == "every participant finished"
    assert inc.may_retrieve_now() == []
    # Nothing more happens after release, not even at the deadline.
    assert inc.check_deadline(now=1e9) == Changes()
    assert inc.released_at == 7.0


def test_restore_after_is_honoured_in_retrieve() -> None:
    inc = three()
    err = refused(inc, OrderingError, lambda: inc.retrieve("vm", now=2.0))
    assert "'vm' must restore after 'db', not finished yet" in str(err)
    inc.retrieve("db", now=2.0)
    refused(inc, OrderingError, lambda: inc.retrieve("vm", now=2.0), match="'db'")  # retrieved
    inc.finish("db", now=3.0)
    refused(inc, OrderingError, lambda: inc.retrieve("agent", now=3.0), match="'vm'")
    inc.retrieve("vm", now=4.0)
    inc.finish("vm", now=4.0)
    # The edge to gpu, which is not in the payload, does not bind.
    inc.retrieve("agent", now=5.0)


def test_illegal_requests() -> None:
    inc = three()
    refused(inc, UnknownParticipant, lambda: inc.retrieve("gpu", now=2.0), match="'gpu'.*h1")
    refused(inc, UnknownParticipant, lambda: inc.finish("gpu", now=2.0))
    err = refused(inc, IllegalTransition, lambda: inc.finish("db", now=2.0))
    assert isinstance(err, IllegalTransition)
    assert (err.machine, err.state, err.event) == ("restore", "available", "finish")
    inc.retrieve("db", now=2.0)
    inc.finish("db", now=2.0)
    refused(inc, IllegalTransition, lambda: inc.finish("db", now=2.0), match="'finished'")
    refused(inc, IllegalTransition, lambda: inc.retrieve("db", now=2.0), match="'retrieve'")


def test_deadline_releases_and_reports_the_unclaimed() -> None:
    inc = three()
    inc.retrieve("db", now=2.0)
    inc.finish("db", now=3.0)
    inc.retrieve("vm", now=4.0)
    assert not inc.check_deadline(now=99.99)
    assert inc.state is RESTORING
    c = inc.check_deadline(now=100.0)
    assert inc.state is RELEASED
    assert inc.released_at == 100.0
    assert inc.unclaimed == ("vm", "agent")
    assert c.handover
    assert c.transitions[-1].detail == "deadline passed; unclaimed: vm, agent"
    # Fragments are reported, never dropped: the claims are all still there.
    assert set(inc.claims) == {"db", "vm", "agent"}
    assert states(inc) == {"vm": "retrieved", "agent": "available", "db": "finished"}


@pytest.mark.parametrize(
    ("call", "name"),
    [
        ("retrieve", "vm"),
        ("retrieve", "agent"),
        ("retrieve", "db"),
        ("finish", "vm"),
        ("finish", "db"),
        ("finish", "agent"),
    ],
)
def test_requests_after_release_are_busy(call: str, name: str) -> None:
    inc = three()
    inc.retrieve("db", now=2.0)
    inc.finish("db", now=2.0)
    inc.retrieve("vm", now=2.0)
    inc.check_deadline(now=200.0)
    assert inc.state is RELEASED
    err = refused(inc, Busy, lambda: getattr(inc, call)(name, now=201.0))
    assert "released" in str(err)
    assert err.code == "busy"


def test_unknown_is_still_unknown_after_release() -> None:
    inc = three()
    inc.check_deadline(now=100.0)
    refused(inc, UnknownParticipant, lambda: inc.retrieve("nobody", now=101.0))


def test_deadline_with_nobody_claiming() -> None:
    inc = three()
    inc.check_deadline(now=100.0)
    assert inc.unclaimed == ("db", "vm", "agent")


def test_round_trip_at_every_step() -> None:
    inc = Incoming.start(
        "h1",
        [claim("db", instance="eth0:1"), claim("vm", "db", instance=7)],
        deadline=50.0,
        now=1.0,
    )
    steps = [
        lambda: inc.retrieve("db", now=2.0),
        lambda: inc.finish("db", now=3.0),
        lambda: inc.retrieve("vm", now=4.0),
        lambda: inc.check_deadline(now=60.0),
    ]
    for step in [lambda: None, *steps]:
        step()
        r = inc.to_record()
        back = Incoming.from_record(json.loads(json.dumps(r)))
        assert back == inc
        assert back.to_record() == r
        assert all(isinstance(c.state, RestoreState) for c in back.claims.values())
        assert isinstance(back.state, HostRestoreState)
    assert inc.unclaimed == ("vm",)


def test_claim_round_trip() -> None:
    c = claim("vm", "db", "x", instance="eth0")
    c.state, c.updated_at = R.RETRIEVED, 3.5
    back = Claim.from_record(json.loads(json.dumps(c.to_record())))
    assert back == c
    assert isinstance(back.restore_after, tuple)


# -- hypothesis: the incoming side against a model -------------------------------

POOL = ["a", "b", "c", "d", "e", "f"]


@st.composite
def payloads(draw: st.DrawFn) -> list[Claim]:
    names = draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=6, unique=True))
    claims = []
    for i, n in enumerate(names):
        # Edges to earlier names (acyclic) and sometimes to a name left out.
        after = draw(st.lists(st.sampled_from([*names[:i], "left-out"]), max_size=2))
        claims.append(claim(n, *after, instance=i))
    return claims


class IncomingMachine(RuleBasedStateMachine):
    """Random retrieve/finish/deadline requests, checked against a small model."""

    @initialize(claims=payloads(), span=st.floats(5.0, 40.0))
    def start(self, claims: list[Claim], span: float) -> None:
        self.now = 0.0
        self.inc = Incoming.start("h", claims, deadline=span, now=self.now)
        self.after = {c.name: [d for d in c.restore_after if d != "left-out"] for c in claims}
        self.model = {c.name: "available" for c in claims}
        self.released_by: str | None = None
        self.unclaimed_at_release: tuple[str, ...] = ()

    def expect(self, call: Any, error: type[KhodError] | None) -> Changes | None:
        before = snapshot(self.inc)
        try:
            changes = call()
        except KhodError as e:
            assert snapshot(self.inc) == before, f"refused request changed state: {e!r}"
            assert type(e) is error, f"{type(e).__name__} ({e}), expected {error}"
            return None
        assert error is None, f"expected {error.__name__}"
        assert isinstance(changes, Changes)
        return changes

    def finished(self, n: str) -> bool:
        return self.model[n] == "finished"

    @rule(name=st.sampled_from([*POOL, "nobody"]))
    def retrieve(self, name: str) -> None:
        if name not in self.model:
            error: type[KhodError] | None = UnknownParticipant
        elif self.released_by:
            error = Busy
        elif not all(self.finished(d) for d in self.after[name]):
            error = OrderingError
        elif self.finished(name):
            error = IllegalTransition
        else:
            error = None
        if self.expect(lambda: self.inc.retrieve(name, now=self.now), error):
            self.model[name] = "retrieved"

    @precondition(lambda self: not self.released_by)
    @rule(data=st.data())
    def retrieve_a_ready_one(self, data: st.DataObject) -> None:
        ready = self.inc.may_retrieve_now()
        assert ready == [
            n
            for n in self.inc.restore_order
            if self.model[n] == "available" and all(self.finished(d) for d in self.after[n])
        ]
        if ready:
            self.retrieve(data.draw(st.sampled_from(ready)))

    @rule(name=st.sampled_from([*POOL, "nobody"]))
    def finish(self, name: str) -> None:
        if name not in self.model:
            error: type[KhodError] | None = UnknownParticipant
        elif self.released_by:
            error = Busy
        elif self.model[name] != "retrieved":
            error = IllegalTransition
        else:
            error = None
        changes = self.expect(lambda: self.inc.finish(name, now=self.now), error)
        if changes is not None:
            self.model[name] = "finished"
            if all(s == "finished" for s in self.model.values()):
                assert self.inc.state is RELEASED
                assert changes.handover
                self.released_by = "finish"
            else:
                assert not changes.handover

    @precondition(lambda self: not self.released_by)
    @rule(data=st.data())
    def finish_a_retrieved_one(self, data: st.DataObject) -> None:
        retrieved = sorted(n for n, s in self.model.items() if s == "retrieved")
        if retrieved:
            self.finish(data.draw(st.sampled_from(retrieved)))

    @rule(dt=st.one_of(st.just(0.0), st.floats(0.0, 8.0)))
    def tick(self, dt: float) -> None:
        self.now += dt
        changes = self.expect(lambda: self.inc.check_deadline(now=self.now), None)
        assert changes is not None
        if not self.released_by and self.now >= self.inc.deadline:
            assert self.inc.state is RELEASED
            assert self.inc.released_at == self.now
            self.released_by = "deadline"
            self.unclaimed_at_release = tuple(
                n for n in self.inc.restore_order if not self.finished(n)
            )
            assert self.inc.unclaimed == self.unclaimed_at_release
            assert changes.handover
        else:
            assert not changes

    @rule()
    def restart_from_record(self) -> None:
        record = json.loads(json.dumps(self.inc.to_record()))
        back = Incoming.from_record(record)
        assert back == self.inc
        self.inc = back

    @invariant()
    def matches_the_model(self) -> None:
        assert states(self.inc) == self.model

    @invariant()
    def released_only_when_all_finished_or_deadline(self) -> None:
        if self.inc.state is RELEASED:
            assert self.released_by is not None
            if self.released_by == "finish":
                assert all(s == "finished" for s in self.model.values())
                assert self.inc.unclaimed == ()
            else:
                assert self.inc.released_at is not None
                assert self.inc.released_at >= self.inc.deadline
                assert self.inc.unclaimed == self.unclaimed_at_release
                assert set(self.inc.unclaimed) == {
                    n for n, s in self.model.items() if s != "finished"
                }
        else:
            assert self.released_by is None
            assert self.inc.released_at is None
            assert self.inc.unclaimed == ()
            assert not all(s == "finished" for s in self.model.values())

    @invariant()
    def nobody_restores_before_its_predecessors(self) -> None:
        for n, s in self.model.items():
            if s != "available":
                assert all(self.finished(d) for d in self.after[n]), n


IncomingMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None
)
TestIncomingMachine = IncomingMachine.TestCase


@settings(max_examples=200, deadline=None)
@given(payloads())
def test_restore_order_is_deterministic_and_honours_edges(claims: list[Claim]) -> None:
    inc = Incoming.start("h", claims, deadline=1.0, now=0.0)
    again = Incoming.start("h", list(reversed(claims)), deadline=1.0, now=0.0)
    assert inc.restore_order == again.restore_order
    pos = {n: i for i, n in enumerate(inc.restore_order)}
    assert set(pos) == {c.name for c in claims}
    for c in claims:
        for d in c.restore_after:
            if d in pos:
                assert pos[d] < pos[c.name]
