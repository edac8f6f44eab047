"""khod.handover: the outgoing side, by story and by random sequences of requests."""

from __future__ import annotations

import copy
import itertools
import json
import re
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from khod.changes import Changes, Transition
from khod.handover import Outgoing
from khod.lifecycle import HandoverState, ParticipantState
from khod.records import Handover, Participant
from khod_wire.errors import (
    Busy,
    IllegalTransition,
    KhodError,
    NothingToHandOver,
    NotReady,
    OrderingError,
    RegistrationError,
    UnknownParticipant,
)

H = HandoverState
P = ParticipantState

SHA = {n: f"{i:064x}" for i, n in enumerate(["a", "b", "c", "d", "e", "vm", "db", "agent"])}


# -- helpers ---------------------------------------------------------------------


def snapshot(out: Outgoing) -> Any:
    return copy.deepcopy(
        (out.handover.to_record(), {n: p.to_record() for n, p in out.participants.items()})
    )


def refused(
    out: Outgoing, error: type[KhodError], call: Callable[[], object], match: str = ""
) -> KhodError:
    """``call`` raises exactly ``error`` (matching ``match``) and changes nothing."""
    before = snapshot(out)
    with pytest.raises(KhodError) as info:
        call()
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    if match:
        assert re.search(match, str(info.value)), str(info.value)
    assert snapshot(out) == before
    return info.value


def reg(out: Outgoing, name: str, *, now: float = 0.0, **kw: Any) -> Changes:
    i = sorted(SHA).index(name) if name in SHA else 99
    return out.register(name, f"test,{name}", i, now=now, **kw)


def states(out: Outgoing) -> dict[str, str]:
    return {n: str(p.state) for n, p in out.participants.items()}


def submit(out: Outgoing, name: str, now: float = 2.0) -> Changes:
    return out.submit(name, 100 + len(name), SHA[name], now=now)


def events(changes: Changes, subject: str) -> list[tuple[str, str | None, str]]:
    return [
        (t.event, t.from_state, t.to_state) for t in changes.transitions if t.subject == subject
    ]


def three(auto_freeze: bool = True, expect: Iterable[str] | None = None) -> Outgoing:
    """db, vm and agent (which freezes after vm), in a running handover."""
    out = Outgoing()
    reg(out, "db")
    reg(out, "vm")
    reg(out, "agent", freeze_after=["vm"])
    out.begin("h1", deadline=100.0, expect=expect, auto_freeze=auto_freeze, now=1.0)
    return out


# -- the happy path ------------------------------------------------------------


def test_happy_path_with_auto_freeze() -> None:
    out = Outgoing()
    c = reg(out, "db", now=0.5)
    assert c.participants == {"db"}
    assert c.transitions == [Transition.step("db", "register", None, "registered")]
    reg(out, "vm")
    reg(out, "agent", freeze_after=["vm"])
    assert out.handover.state is H.IDLE

    c = out.begin("h1", deadline=100.0, now=1.0)
    h = out.handover
    assert (h.id, h.state, h.deadline, h.began_at) == ("h1", H.PREPARING, 100.0, 1.0)
    assert h.expected == ("agent", "db", "vm")
    assert h.explicit is False
    assert c.handover
    assert events(c, "handover") == [("begin", "idle", "preparing")]
    assert states(out) == {"db": "preparing", "vm": "preparing", "agent": "preparing"}
    assert out.missing() == ["agent", "db", "vm"]

    c = submit(out, "db")
    assert out.participants["db"].state is P.SERIALIZED
    assert out.participants["db"].fragment_sha256 == SHA["db"]
    assert out.participants["db"].fragment_size == 102
    assert out.participants["db"].updated_at == 2.0
    assert out.handover.state is H.PREPARING
    assert out.missing() == ["agent", "vm"]
    submit(out, "vm")
    assert out.handover.state is H.PREPARING
    assert out.may_freeze_now() == []  # not freezing yet

    c = submit(out, "agent", now=3.0)
    assert out.handover.state is H.FREEZING
    assert out.handover.freeze_at == 3.0
    assert events(c, "handover") == [("freeze", "preparing", "freezing")]
    assert c.handover and not c.assemble
    # agent freezes after vm, even though it sorts first.
    assert out.handover.freeze_order == ("db", "vm", "agent")
    assert out.may_freeze_now() == ["db", "vm"]

    refused(out, OrderingError, lambda: out.frozen("agent", now=4.0), match="'vm'")

    c = out.frozen("vm", now=4.0)
    assert events(c, "vm") == [("freeze", "serialized", "frozen")]
    assert not c.assemble
    assert out.may_freeze_now() == ["db", "agent"]
    out.frozen("agent", now=4.0)
    assert out.handover.state is H.FREEZING
    assert out.not_frozen() == ["db"]
    c = out.frozen("db", now=5.0)
    assert c.assemble
    assert out.handover.state is H.FROZEN
    assert events(c, "handover") == [("all-frozen", "freezing", "frozen")]
    assert [p.name for p in out.payload_order()] == ["db", "vm", "agent"]

    c = out.assembled()
    assert out.handover.state is H.ASSEMBLED
    assert events(c, "handover") == [("assemble", "frozen", "assembled")]
    c = out.committed({"path": "/var/lib/khod/h1.kho", "sha256": "00"}, now=6.0)
    assert out.handover.state is H.COMMITTED
    assert out.handover.committed_at == 6.0
    assert out.handover.payload == {"path": "/var/lib/khod/h1.kho", "sha256": "00"}
    assert events(c, "handover") == [("commit", "assembled", "committed")]

    # Committed is final for this boot.
    refused(out, IllegalTransition, lambda: out.begin("h2", deadline=1e9, now=7.0))
    refused(out, IllegalTransition, lambda: out.assembled())
    assert out.check_deadline(now=1e9) == Changes()
    assert out.handover.state is H.COMMITTED
    # Components going away after commit is expected: nothing changes.
    assert not out.gone("vm", now=8.0)
    assert "vm" in out.participants
    # Unless the operator withdraws the payload (the kexec will not happen):
    # everyone thaws, and the next handover may begin.
    c = out.abort("kexec postponed", now=9.0)
    assert events(c, "handover") == [
        ("withdraw", "committed", "idle"),
    ]
    assert out.handover.abort_reason == "payload withdrawn: kexec postponed"
    assert out.handover.payload is None
    assert states(out) == {"db": "registered", "vm": "registered", "agent": "registered"}
    assert c.drop_fragments == {"db", "vm", "agent"}
    out.begin("h2", deadline=1e9, now=10.0)


def test_manual_freeze_when_everyone_is_serialized() -> None:
    out = three(auto_freeze=False)
    for n in ("db", "vm", "agent"):
        submit(out, n)
    assert out.handover.state is H.PREPARING  # no auto-freeze
    c = out.freeze(now=3.0)
    assert out.handover.state is H.FREEZING
    assert out.handover.left_out == ()
    assert events(c, "handover") == [("freeze", "preparing", "freezing")]
    assert out.handover.freeze_order == ("db", "vm", "agent")


def test_resubmit_replaces_the_fragment_and_revise_drops_it() -> None:
    out = three(auto_freeze=False)
    submit(out, "db")
    out.submit("db", 7, "ff" * 32, now=3.0)
    p = out.participants["db"]
    assert (p.state, p.fragment_size, p.fragment_sha256) == (P.SERIALIZED, 7, "ff" * 32)
    c = out.revise("db", now=4.0)
    assert (p.state, p.fragment_size, p.fragment_sha256) == (P.PREPARING, None, None)
    assert c.drop_fragments == {"db"}
    assert events(c, "db") == [("revise", "serialized", "preparing")]
    # A replayed revise is harmless (design: preparing -> preparing).
    c = out.revise("db", now=5.0)
    assert p.state is P.PREPARING


def test_revise_while_freezing_holds_back_the_freeze() -> None:
    out = three()
    for n in ("db", "vm", "agent"):
        submit(out, n)
    assert out.handover.state is H.FREEZING
    out.revise("vm", now=3.0)
    assert out.may_freeze_now() == ["db"]
    refused(out, OrderingError, lambda: out.frozen("agent", now=3.0), match="'vm'")
    refused(out, IllegalTransition, lambda: out.frozen("vm", now=3.0))
    submit(out, "vm", now=4.0)
    for n in ("db", "vm", "agent"):
        c = out.frozen(n, now=5.0)
    assert c.assemble
    assert all(p.fragment_sha256 == SHA[n] for n, p in out.participants.items())


# -- begin(expect=...) and late registration ---------------------------------


def test_begin_expect_waits_for_a_late_participant() -> None:
    out = Outgoing()
    reg(out, "a")
    reg(out, "b")  # registered, but the operator does not expect it
    out.begin("h1", deadline=100.0, expect=["a", "e", "a"], now=1.0)
    assert out.handover.expected == ("a", "e")  # order kept, duplicates dropped
    assert out.handover.explicit is True
    assert states(out) == {"a": "preparing", "b": "registered"}
    submit(out, "a")
    assert out.handover.state is H.PREPARING
    assert out.missing() == ["e"]

    # b is not expected: its registration replays, it does not join.
    assert not reg(out, "b")
    refused(out, Busy, lambda: submit(out, "b"))

    c = reg(out, "e", now=3.0)
    assert events(c, "e") == [
        ("register", None, "registered"),
        ("begin", "registered", "preparing"),
    ]
    assert c.participants == {"e"}
    assert not c.handover  # e was already expected
    assert out.handover.expected == ("a", "e")
    submit(out, "e")
    assert out.handover.state is H.FREEZING
    assert out.handover.freeze_order == ("a", "e")
    assert out.participants["b"].state is P.REGISTERED


def test_without_expect_a_late_registrant_joins() -> None:
    out = Outgoing()
    reg(out, "b")
    out.begin("h1", deadline=100.0, now=1.0)
    c = reg(out, "a", now=2.0)
    assert out.handover.expected == ("b", "a")
    assert c.handover
    assert out.participants["a"].state is P.PREPARING
    submit(out, "b")
    assert out.handover.state is H.PREPARING  # waits for the newcomer
    submit(out, "a")
    assert out.handover.state is H.FREEZING


def test_late_registrant_with_an_unknown_predecessor_is_refused() -> None:
    out = Outgoing()
    reg(out, "a")
    out.begin("h1", deadline=100.0, expect=["a", "b"], now=1.0)
    refused(
        out,
        OrderingError,
        lambda: reg(out, "b", freeze_after=["c"]),
        match=r"'b' must freeze after 'c', which is not part of the handover",
    )


def test_begin_refuses_a_predecessor_outside_the_handover() -> None:
    out = Outgoing()
    reg(out, "a", freeze_after=["ghost"])
    refused(out, OrderingError, lambda: out.begin("h", deadline=9.0, now=1.0), match="'ghost'")
    reg(out, "b")
    refused(
        out,
        OrderingError,
        lambda: out.begin("h", deadline=9.0, expect=["a", "b"], now=1.0),
        match="'ghost'",
    )
    out.begin("h", deadline=9.0, expect=["b"], now=1.0)  # a's edge does not matter


# -- forced freeze ---------------------------------------------------------------


def test_force_freeze_leaves_out_the_missing() -> None:
    out = Outgoing()
    reg(out, "a")
    reg(out, "b")
    reg(out, "c", freeze_after=["b"])
    reg(out, "d")
    out.begin("h1", deadline=100.0, expect=["a", "b", "c", "d", "ghost"], auto_freeze=False, now=1)
    submit(out, "a")
    submit(out, "c")
    submit(out, "d")
    out.revise("d", now=2.5)  # serialized once, preparing again: missing

    err = refused(out, NotReady, lambda: out.freeze(now=3.0))
    assert "b, d, ghost" in str(err)
    assert "--force" in str(err)

    c = out.freeze(force=True, now=3.0)
    h = out.handover
    assert h.state is H.FREEZING
    assert h.left_out == ("b", "d", "ghost")
    assert h.expected == ("a", "c")
    assert h.freeze_order == ("a", "c")
    assert states(out) == {
        "a": "serialized",
        "b": "registered",
        "c": "serialized",
        "d": "registered",
    }
    assert c.drop_fragments == {"b", "d"}
    assert ("cancel", "preparing", "registered") in events(c, "b")
    assert all(t.detail == "left out" for t in c.transitions if t.subject in ("b", "d"))
    # c's edge to the left-out b no longer binds.
    assert out.may_freeze_now() == ["a", "c"]
    out.frozen("c", now=4.0)
    # The left-out are no longer members.
    refused(out, Busy, lambda: submit(out, "b"))
    refused(out, Busy, lambda: out.frozen("b", now=4.0))
    assert out.frozen("a", now=5.0).assemble
    assert [p.name for p in out.payload_order()] == ["a", "c"]


def test_force_freeze_with_nobody_serialized_is_refused() -> None:
    out = three(auto_freeze=False)
    refused(
        out,
        NotReady,
        lambda: out.freeze(force=True, now=2.0),
        match="no participant is serialized",
    )


def test_force_freeze_with_nobody_missing_leaves_nobody_out() -> None:
    out = three(auto_freeze=False)
    for n in ("db", "vm", "agent"):
        submit(out, n)
    out.freeze(force=True, now=3.0)
    assert out.handover.left_out == ()
    assert out.handover.expected == ("agent", "db", "vm")


# -- illegal requests ------------------------------------------------------------


def test_submittable_checks_without_changing_anything() -> None:
    out = three()
    assert out.submittable("db") is out.participants["db"]
    submit(out, "db")
    assert out.submittable("db") is out.participants["db"]  # a replacement is fine
    refused(out, UnknownParticipant, lambda: out.submittable("nobody"))
    for n in ("vm", "agent"):
        submit(out, n)
    out.frozen("db", now=3.0)
    refused(out, IllegalTransition, lambda: out.submittable("db"))
    assert out.submittable("vm") is out.participants["vm"]
    out.frozen("vm", now=3.0)
    out.frozen("agent", now=3.0)
    refused(out, Busy, lambda: out.submittable("vm"))
    idle = Outgoing()
    reg(idle, "a")
    refused(idle, Busy, lambda: idle.submittable("a"))


def test_submit_before_begin_is_busy() -> None:
    out = Outgoing()
    reg(out, "a")
    refused(out, Busy, lambda: submit(out, "a"), match=r"'a' cannot submit a fragment")
    refused(out, Busy, lambda: out.revise("a", now=1.0))
    refused(out, Busy, lambda: out.frozen("a", now=1.0))


def test_submit_after_frozen() -> None:
    out = three()
    for n in ("db", "vm", "agent"):
        submit(out, n)
    out.frozen("db", now=3.0)
    # The participant is frozen, the handover still freezing: its table says no.
    err = refused(out, IllegalTransition, lambda: out.submit("db", 1, "ee" * 32, now=9.0))
    assert isinstance(err, IllegalTransition)
    assert (err.machine, err.state, err.event) == ("participant", "frozen", "submit")
    refused(out, IllegalTransition, lambda: out.revise("db", now=3.0))
    refused(out, IllegalTransition, lambda: out.frozen("db", now=3.0))
    out.frozen("vm", now=3.0)
    out.frozen("agent", now=3.0)
    assert out.handover.state is H.FROZEN
    # Once the handover is frozen, nobody submits any more.
    refused(out, Busy, lambda: submit(out, "db"), match="frozen")
    refused(out, Busy, lambda: submit(out, "vm"))


def test_frozen_before_freeze_is_busy() -> None:
    out = three()
    submit(out, "db")
    refused(out, Busy, lambda: out.frozen("db", now=3.0), match="not freezing")


def test_unknown_participant() -> None:
    out = three()
    for call in (
        lambda: submit(out, "a"),
        lambda: out.revise("a", now=1.0),
        lambda: out.frozen("a", now=1.0),
        lambda: out.fail("a", "x", now=1.0),
        lambda: out.gone("a", now=1.0),
    ):
        err = refused(out, UnknownParticipant, call, match="'a'")
        assert err.code == "unknown-participant"


def test_duplicate_name_with_another_identity() -> None:
    out = Outgoing()
    out.register("vm", "ch,vm-v1", 1, freeze_after=["db"], now=0.0)
    for call in (
        lambda: out.register("vm", "ch,vm-v2", 1, freeze_after=["db"], now=1.0),
        lambda: out.register("vm", "ch,vm-v1", 2, freeze_after=["db"], now=1.0),
        lambda: out.register("vm", "ch,vm-v1", "1", freeze_after=["db"], now=1.0),
        lambda: out.register("vm", "ch,vm-v1", 1, now=1.0),
        lambda: out.register("vm", "ch,vm-v1", 1, freeze_after=["db"], restore_after=["x"], now=1),
    ):
        refused(out, RegistrationError, call, match=r"duplicate name 'vm'.*ch,vm-v1")


def test_same_compatible_and_instance_under_another_name() -> None:
    out = Outgoing()
    out.register("vm", "ch,vm-v1", 1, now=0.0)
    refused(
        out,
        RegistrationError,
        lambda: out.register("vm-again", "ch,vm-v1", 1, now=1.0),
        match=r"already registered as 'vm'",
    )
    out.register("vm2", "ch,vm-v1", 2, now=1.0)  # another instance is fine
    out.register("vm3", "ch,vm-v1", "1", now=1.0)  # "1" is not 1
    # Once its holder is gone, the identity is free again (and only then).
    out.gone("vm", now=2.0)
    out.register("vm-again", "ch,vm-v1", 1, now=3.0)
    refused(
        out,
        RegistrationError,
        lambda: out.register("vm", "ch,vm-v1", 1, now=4.0),
        match=r"already registered as 'vm-again'",
    )
    # A daemon that starts again knows who holds what.
    again = Outgoing(out.handover, out.participants.values())
    refused(
        again,
        RegistrationError,
        lambda: again.register("vm", "ch,vm-v1", 2, now=5.0),
        match=r"already registered as 'vm2'",
    )


def test_registration_during_freezing_is_busy() -> None:
    out = three()
    for n in ("db", "vm", "agent"):
        submit(out, n)
    refused(out, Busy, lambda: reg(out, "a"), match="registration is closed")
    # ... but a reconnect of a member with its same identity is a harmless replay.
    before = snapshot(out)
    assert not reg(out, "vm")
    assert snapshot(out) == before


def test_registration_is_validated() -> None:
    out = Outgoing()
    refused(out, RegistrationError, lambda: out.register("a/b", "x,y", 0, now=0))
    refused(out, RegistrationError, lambda: out.register("a", "", 0, now=0))
    refused(out, RegistrationError, lambda: out.register("a", "x,y", True, now=0))
    refused(out, RegistrationError, lambda: out.register("a", "x,y", 0, freeze_after=["#"], now=0))
    refused(out, OrderingError, lambda: reg(out, "a", freeze_after=["a"]), match="itself")
    refused(out, OrderingError, lambda: reg(out, "a", restore_after=["a"]), match="itself")


def test_registration_closing_a_cycle_is_refused() -> None:
    out = Outgoing()
    reg(out, "a", freeze_after=["c"])
    reg(out, "b", freeze_after=["a"])
    refused(
        out,
        OrderingError,
        lambda: reg(out, "c", freeze_after=["b"]),
        match=r"^freeze order would have a cycle: a -> c -> b -> a$",
    )
    reg(out, "d", restore_after=["e"])
    refused(out, OrderingError, lambda: reg(out, "e", restore_after=["d"]), match="^restore order")
    reg(out, "c", restore_after=["b"])  # the same edge for restore is no cycle
    assert set(out.participants) == {"a", "b", "c", "d"}


def test_begin_is_validated() -> None:
    out = Outgoing()
    refused(out, NothingToHandOver, lambda: out.begin("h", deadline=9.0, now=1.0), match="no part")
    reg(out, "a")
    refused(out, NothingToHandOver, lambda: out.begin("h", deadline=9.0, expect=[], now=1.0))
    refused(out, RegistrationError, lambda: out.begin("h", deadline=9, expect=["a b"], now=1))
    out.begin("h", deadline=9.0, now=1.0)
    refused(out, IllegalTransition, lambda: out.begin("h2", deadline=9.0, now=1.0))


def test_operator_requests_out_of_turn() -> None:
    out = Outgoing()
    reg(out, "a")
    refused(out, IllegalTransition, lambda: out.freeze(now=1.0))
    refused(out, IllegalTransition, lambda: out.freeze(force=True, now=1.0))
    refused(out, IllegalTransition, lambda: out.abort("why", now=1.0))
    refused(out, IllegalTransition, lambda: out.assembled())
    refused(out, IllegalTransition, lambda: out.committed({}, now=1.0))
    out.begin("h", deadline=9.0, now=1.0)
    refused(out, IllegalTransition, lambda: out.assembled())
    refused(out, IllegalTransition, lambda: out.committed({}, now=1.0))
    submit(out, "a")
    refused(out, IllegalTransition, lambda: out.freeze(now=1.0))  # already freezing
    out.frozen("a", now=2.0)
    refused(out, IllegalTransition, lambda: out.committed({}, now=1.0))


# -- replays ---------------------------------------------------------------------


def test_reregistering_with_identical_identity_is_a_harmless_replay() -> None:
    out = Outgoing()
    reg(out, "a", freeze_after=["b", "b"], restore_after=["c"])
    for phase in ("idle", "preparing"):
        before = snapshot(out)
        c = reg(out, "a", freeze_after=["b"], restore_after=["c"], now=50.0)
        assert not c
        assert c == Changes()
        assert snapshot(out) == before
        if phase == "idle":
            reg(out, "b")
            reg(out, "c")
            out.begin("h", deadline=99.0, now=1.0)
    assert out.participants["a"].updated_at == 1.0


def test_a_failed_participant_registers_again() -> None:
    out = Outgoing()
    reg(out, "a")
    out.fail("a", "crashed", now=1.0)
    assert out.participants["a"].state is P.FAILED
    assert out.participants["a"].error == "crashed"
    assert out.handover.state is H.IDLE  # nothing to abort
    refused(out, IllegalTransition, lambda: out.fail("a", "again", now=2.0))
    c = reg(out, "a", now=3.0)
    assert events(c, "a") == [("register", "failed", "registered")]
    assert out.participants["a"].error is None


def test_begin_gives_a_failed_participant_another_chance() -> None:
    out = Outgoing()
    reg(out, "a")
    out.fail("a", "crashed", now=1.0)
    c = out.begin("h", deadline=9.0, now=2.0)
    assert events(c, "a") == [
        ("cancel", "failed", "registered"),
        ("begin", "registered", "preparing"),
    ]


# -- failures, departures, deadlines --------------------------------------------


def test_fail_aborts_the_handover() -> None:
    out = three()
    submit(out, "db")
    submit(out, "vm")
    c = out.fail("vm", "out of memory", now=5.0)
    h = out.handover
    assert h.state is H.IDLE
    assert h.abort_reason == "vm failed: out of memory"
    assert h.last_id is None and h.id == "h1"
    assert h.payload is None
    assert set(states(out).values()) == {"registered"}
    assert all(
        p.fragment_sha256 is None and p.fragment_size is None for p in out.participants.values()
    )
    assert all(p.error is None for p in out.participants.values())
    assert c.drop_fragments == {"db", "vm", "agent"}
    assert events(c, "handover") == [
        ("abort", "preparing", "idle"),
    ]
    assert events(c, "vm")[0] == ("fail", "serialized", "failed")
    assert events(c, "vm")[1] == ("cancel", "failed", "registered")
    # A new handover can begin; it remembers the last one.
    out.begin("h2", deadline=200.0, now=6.0)
    assert out.handover.last_id == "h1"
    assert out.handover.abort_reason is None


@pytest.mark.parametrize("stage", ["freezing", "frozen", "assembled"])
def test_fail_aborts_at_every_stage_before_commit(stage: str) -> None:
    out = three()
    for n in ("db", "vm", "agent"):
        submit(out, n)
    if stage != "freezing":
        for n in ("db", "vm", "agent"):
            out.frozen(n, now=3.0)
    if stage == "assembled":
        out.assembled()
    assert str(out.handover.state) == stage
    out.fail("db", "disk", now=4.0)
    assert out.handover.state is H.IDLE
    assert out.handover.abort_reason == "db failed: disk"
    assert set(states(out).values()) == {"registered"}
    assert all(p.fragment_sha256 is None for p in out.participants.values())


def test_gone_while_idle_removes_the_participant() -> None:
    out = Outgoing()
    reg(out, "a")
    reg(out, "b")
    c = out.gone("a", now=1.0)
    assert c.removed == {"a"}
    assert c.drop_fragments == {"a"}
    assert events(c, "a") == [("gone", "registered", "removed")]
    assert set(out.participants) == {"b"}
    refused(out, UnknownParticipant, lambda: out.gone("a", now=2.0))
    reg(out, "a")  # it may come back


def test_gone_of_a_member_aborts_and_of_a_bystander_removes() -> None:
    out = Outgoing()
    reg(out, "a")
    reg(out, "b")
    out.begin("h", deadline=9.0, expect=["a"], now=1.0)
    c = out.gone("b", now=2.0)
    assert c.removed == {"b"}
    assert out.handover.state is H.PREPARING
    c = out.gone("a", now=3.0)
    assert out.handover.state is H.IDLE
    assert out.handover.abort_reason == "a failed: vanished (connection lost)"
    assert states(out) == {}
    assert c.removed == {"a"} and "a" not in c.participants


def test_deadline_abort_names_who_it_was_waiting_for() -> None:
    out = three()
    submit(out, "vm")
    assert not out.check_deadline(now=99.9)
    assert out.handover.state is H.PREPARING
    c = out.check_deadline(now=100.0)
    assert out.handover.state is H.IDLE
    assert out.handover.abort_reason == "deadline passed in preparing; waiting for agent, db"
    assert events(c, "handover")[0] == (
        "abort",
        "preparing",
        "idle",
    )
    assert set(states(out).values()) == {"registered"}


def test_deadline_while_freezing_names_the_not_frozen() -> None:
    out = three()
    for n in ("db", "vm", "agent"):
        submit(out, n)
    out.frozen("vm", now=3.0)
    out.check_deadline(now=150.0)
    assert out.handover.abort_reason == "deadline passed in freezing; waiting for agent, db"


def test_deadline_after_assembly_still_aborts_before_commit() -> None:
    out = three()
    for n in ("db", "vm", "agent"):
        submit(out, n)
    for n in ("db", "vm", "agent"):
        out.frozen(n, now=3.0)
    out.assembled()
    c = out.check_deadline(now=100.0)
    assert out.handover.abort_reason == "deadline passed in assembled"
    assert out.handover.state is H.IDLE
    assert c.drop_fragments == {"db", "vm", "agent"}
    refused(out, IllegalTransition, lambda: out.committed({"path": "/x"}, now=101.0))


def test_deadline_when_idle_does_nothing() -> None:
    out = Outgoing()
    reg(out, "a")
    before = snapshot(out)
    assert out.check_deadline(now=1e12) == Changes()
    assert snapshot(out) == before


def test_operator_abort() -> None:
    out = three()
    submit(out, "db")
    c = out.abort("operator changed their mind", now=5.0)
    assert out.handover.state is H.IDLE
    assert out.handover.abort_reason == "operator changed their mind"
    assert all(t.detail == "abort" for t in c.transitions if t.subject != "handover")
    assert set(states(out).values()) == {"registered"}


# -- queries -----------------------------------------------------------------------


def test_counts() -> None:
    out = three()
    submit(out, "db")
    assert out.counts() == {
        "registered": 0,
        "preparing": 2,
        "serialized": 1,
        "frozen": 0,
        "failed": 0,
    }


def test_changes_truthiness() -> None:
    assert not Changes()
    assert Changes(handover=True)
    assert Changes(participants={"a"})
    assert Changes(removed={"a"})
    assert Changes(transitions=[Transition.step("a", "x", None, "y")])


# -- persistence -------------------------------------------------------------------


def roundtrip(record: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(record))


def test_participant_round_trip() -> None:
    for p in (
        Participant("vm", "ch,vm-v1", 7),
        Participant(
            "vm",
            "ch,vm-v1",
            "eth0:1",
            freeze_after=("a", "b"),
            restore_after=("c",),
            state=P.SERIALIZED,
            fragment_size=4096,
            fragment_sha256="ab" * 32,
            error="x",
            updated_at=12.5,
        ),
    ):
        r = roundtrip(p.to_record())
        back = Participant.from_record(r)
        assert back == p
        assert isinstance(back.state, ParticipantState)
        assert back.to_record() == p.to_record()


def test_handover_round_trip_through_a_whole_handover() -> None:
    out = three()
    records = []
    for n in ("db", "vm", "agent"):
        submit(out, n)
    records.append(out.handover.to_record())
    for n in ("db", "vm", "agent"):
        out.frozen(n, now=3.0)
    out.assembled()
    out.committed({"path": "/x", "parts": [1, 2]}, now=9.0)
    records.append(out.handover.to_record())
    records.append(Handover().to_record())
    for r in records:
        back = Handover.from_record(roundtrip(r))
        assert back.to_record() == r
        assert isinstance(back.state, HandoverState)
        assert isinstance(back.expected, tuple) and isinstance(back.freeze_order, tuple)
    assert Handover.from_record(roundtrip(out.handover.to_record())) == out.handover


def test_resume_from_records_mid_freeze() -> None:
    out = three()
    for n in ("db", "vm", "agent"):
        submit(out, n)
    out.frozen("vm", now=3.0)
    resumed = Outgoing(
        Handover.from_record(roundtrip(out.handover.to_record())),
        [Participant.from_record(roundtrip(p.to_record())) for p in out.participants.values()],
    )
    assert snapshot(resumed) == snapshot(out)
    assert resumed.may_freeze_now() == ["db", "agent"]
    resumed.frozen("db", now=4.0)
    assert resumed.frozen("agent", now=4.0).assemble
    assert [p.name for p in resumed.payload_order()] == ["db", "vm", "agent"]


# -- hypothesis: registration refuses exactly the cycles ------------------------


def closes_cycle(graph: dict[str, tuple[str, ...]]) -> bool:
    """Does the graph (edges to known names only) have a cycle? Plain DFS."""
    seen: set[str] = set()

    def reach(start: str, n: str, path: set[str]) -> bool:
        for m in graph.get(n, ()):
            if m not in graph:
                continue
            if m == start:
                return True
            if m not in path:
                path.add(m)
                if reach(start, m, path):
                    return True
        return False

    return any(reach(n, n, seen.copy()) for n in graph)


POOL = ["a", "b", "c", "d", "e"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(POOL),
            st.lists(st.sampled_from(POOL), max_size=3),
            st.sampled_from(["freeze_after", "restore_after"]),
        ),
        max_size=12,
    )
)
def test_register_refuses_exactly_what_would_close_a_cycle(
    regs: list[tuple[str, list[str], str]],
) -> None:
    out = Outgoing()
    for name, deps, kind in regs:
        if name in out.participants:
            out.gone(name, now=0.0)
        graph = {n: getattr(p, kind) for n, p in out.participants.items()}
        graph[name] = tuple(deps)
        before = snapshot(out)
        if name in deps:
            with pytest.raises(OrderingError, match="itself"):
                reg(out, name, **{kind: deps})
            assert snapshot(out) == before
        elif closes_cycle(graph):
            with pytest.raises(OrderingError) as info:
                reg(out, name, **{kind: deps})
            assert snapshot(out) == before
            m = re.fullmatch(r"(freeze|restore) order would have a cycle: (.+)", str(info.value))
            assert m and f"{m.group(1)}_after" == kind
            path = m.group(2).split(" -> ")
            assert path[0] == path[-1] and len(path) >= 3
            for x, y in itertools.pairwise(path):
                assert y in graph[x]
        else:
            reg(out, name, **{kind: deps})
            assert getattr(out.participants[name], kind) == tuple(sorted(set(deps)))


# -- hypothesis: random sequences of requests -----------------------------------

NAME_POOL = ["a", "b", "c", "d", "e"]
BAD_NAMES = ["", "x/y", "bad name", "#", "+"]
FINISH = st.sampled_from(["commit", "commit", "stop-at-frozen", "stop-at-assembled"])
DEPS = st.sampled_from([[], [], [], ["a"], ["b"], ["c"], ["e"], ["a", "b"], ["d", "c"]])


class OutgoingMachine(RuleBasedStateMachine):
    """Random requests against one Outgoing; a refused request must change nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.out = Outgoing()
        self.now = 0.0
        self.ids = itertools.count(1)
        self.commits = 0

    # -- plumbing ------------------------------------------------------------

    def apply(self, call: Callable[[], Changes]) -> Changes | None:
        before = snapshot(self.out)
        try:
            changes = call()
        except KhodError as e:
            assert snapshot(self.out) == before, f"refused request changed state: {e!r}"
            assert str(e)  # every refusal explains itself
            return None
        assert isinstance(changes, Changes)
        self.check_reported(before, changes)
        self.check_after_abort(changes)
        return changes

    def check_reported(self, before: Any, changes: Changes) -> None:
        """Everything that changed is in ``changes`` (the service persists only that)."""
        h_before, p_before = before
        h_after, p_after = snapshot(self.out)
        if not changes:
            assert (h_after, p_after) == (h_before, p_before)
        if h_after != h_before:
            assert changes.handover
        for n in set(p_before) | set(p_after):
            if n not in p_after:
                assert n in changes.removed
            elif p_before.get(n) != p_after[n]:
                assert n in changes.participants, n
        assert changes.removed.isdisjoint(p_after)

    def check_after_abort(self, changes: Changes) -> None:
        if any(t.subject == "handover" and t.event == "abort" for t in changes.transitions):
            assert self.out.handover.state is H.IDLE
            assert self.out.handover.abort_reason
            members = set(self.out.handover.expected)
            for p in self.out.participants.values():
                if p.name in members or p.state is not P.FAILED:
                    assert p.state is P.REGISTERED, (p.name, p.state)
                else:  # a bystander that failed on its own stays failed
                    assert p.error, p.name
                assert p.fragment_sha256 is None and p.fragment_size is None

    def after_all_frozen(self, changes: Changes | None, finish: str) -> None:
        if changes is None or not changes.assemble:
            return
        assert self.out.handover.state is H.FROZEN
        if finish == "stop-at-frozen":
            return
        self.apply(self.out.assembled)
        assert self.out.handover.state is H.ASSEMBLED
        if finish == "stop-at-assembled":
            return
        self.commit()

    def commit(self) -> None:
        payload = {"parts": list(self.out.handover.freeze_order)}
        if self.out.handover.state is H.ASSEMBLED:
            assert [p.name for p in self.out.payload_order()] == payload["parts"]
        c = self.apply(lambda: self.out.committed(payload, now=self.now))
        if c is not None:
            assert self.out.handover.state is H.COMMITTED
            assert self.out.handover.payload == payload
            self.commits += 1

    # -- participant requests ------------------------------------------------

    @rule(
        name=st.sampled_from(NAME_POOL + BAD_NAMES[:2]),
        variant=st.sampled_from(["same", "same", "fresh", "other-compatible", "steal", "str"]),
        deps=DEPS,
        rdeps=DEPS,
    )
    def register(self, name: str, variant: str, deps: list[str], rdeps: list[str]) -> None:
        old = self.out.participants.get(name)
        idx = NAME_POOL.index(name) if name in NAME_POOL else 9
        compatible, instance = f"t,{name or 'x'}", idx
        if variant == "same" and old is not None:
            compatible, instance = old.compatible, old.instance
            deps, rdeps = list(old.freeze_after), list(old.restore_after)
        elif variant == "other-compatible":
            compatible = "other,thing"
        elif variant == "steal":
            victim = NAME_POOL[(idx + 1) % len(NAME_POOL)]
            compatible, instance = f"t,{victim}", NAME_POOL.index(victim)
        elif variant == "str":
            instance = str(idx)
        self.apply(
            lambda: self.out.register(
                name, compatible, instance, freeze_after=deps, restore_after=rdeps, now=self.now
            )
        )

    @rule(
        name=st.sampled_from(NAME_POOL),
        size=st.integers(1, 4096),
        finish=FINISH,
    )
    def submit(self, name: str, size: int, finish: str) -> None:
        sha = f"{size:064x}"
        before = snapshot(self.out)
        try:
            self.out.submittable(name)
            expected: type[KhodError] | None = None
        except KhodError as e:
            expected = type(e)
        assert snapshot(self.out) == before, "submittable() changed state"
        changes = self.apply(lambda: self.out.submit(name, size, sha, now=self.now))
        if changes is None:
            assert expected is not None, "submittable() said yes, submit() said no"
        else:
            assert expected is None, f"submittable() said {expected}, submit() said yes"
            p = self.out.participants[name]
            assert (p.state, p.fragment_size, p.fragment_sha256) == (P.SERIALIZED, size, sha)
        self.after_all_frozen(changes, finish)

    # The random rules above and below are mostly refused; these two make the
    # next sensible step so that random runs also reach frozen and committed.

    @rule(data=st.data(), finish=FINISH)
    def advance(self, data: st.DataObject, finish: str) -> None:
        out, h = self.out, self.out.handover
        if h.state in (H.IDLE, H.COMMITTED):
            unregistered = [n for n in NAME_POOL if n not in out.participants]
            if h.state is H.IDLE and out.participants and data.draw(st.booleans()):
                self.begin(None, data.draw(st.booleans()), 100.0)
            elif unregistered:
                self.register(data.draw(st.sampled_from(unregistered)), "fresh", [], [])
        elif h.state is H.PREPARING:
            preparing = [n for n in out.missing() if n in out.participants]
            if preparing:
                self.submit(data.draw(st.sampled_from(preparing)), 64, finish)
            else:
                self.freeze(force=bool(out.missing()))
        elif h.state is H.FREEZING:
            ready = out.may_freeze_now()
            if ready:
                name = data.draw(st.sampled_from(ready))
                changes = self.apply(lambda: out.frozen(name, now=self.now))
                assert changes is not None, f"{name} was ready to freeze but was refused"
                self.after_all_frozen(changes, finish)
            else:
                preparing = [n for n in h.expected if out.participants[n].state is P.PREPARING]
                assert preparing, "freezing, nobody ready and nobody preparing: stuck"
                self.submit(data.draw(st.sampled_from(preparing)), 64, finish)
        elif h.state is H.FROZEN:
            self.apply(out.assembled)
        elif h.state is H.ASSEMBLED:
            self.commit()

    @rule(data=st.data(), finish=FINISH)
    def advance_again(self, data: st.DataObject, finish: str) -> None:
        self.advance(data, finish)

    @rule(data=st.data(), finish=FINISH)
    def advance_once_more(self, data: st.DataObject, finish: str) -> None:
        self.advance(data, finish)

    @rule(name=st.sampled_from(NAME_POOL))
    def revise(self, name: str) -> None:
        changes = self.apply(lambda: self.out.revise(name, now=self.now))
        if changes is not None:
            assert self.out.participants[name].state is P.PREPARING
            assert self.out.participants[name].fragment_sha256 is None

    @rule(
        name=st.sampled_from(NAME_POOL),
        finish=FINISH,
    )
    def frozen(self, name: str, finish: str) -> None:
        ps = self.out.participants
        waiting = [
            m
            for m in (ps[name].freeze_after if name in ps else ())
            if m in self.out.handover.expected and (m not in ps or ps[m].state is not P.FROZEN)
        ]
        changes = self.apply(lambda: self.out.frozen(name, now=self.now))
        if changes is not None:
            assert not waiting
            assert self.out.participants[name].state is P.FROZEN
        self.after_all_frozen(changes, finish)

    @rule(name=st.sampled_from(NAME_POOL), reason=st.sampled_from(["oom", "crash"]))
    def fail(self, name: str, reason: str) -> None:
        member = self.out.in_handover(name)
        changes = self.apply(lambda: self.out.fail(name, reason, now=self.now))
        if changes is not None and member:
            assert self.out.handover.state is H.IDLE
            assert self.out.handover.abort_reason == f"{name} failed: {reason}"

    @precondition(lambda self: bool(self.out.participants))
    @rule(data=st.data())
    def reconnect(self, data: st.DataObject) -> None:
        """A known participant registers again with its identity: a replay or a restart."""
        name = data.draw(st.sampled_from(sorted(self.out.participants)))
        old = copy.deepcopy(self.out.participants[name])
        changes = self.apply(
            lambda: self.out.register(
                name,
                old.compatible,
                old.instance,
                freeze_after=old.freeze_after,
                restore_after=old.restore_after,
                now=self.now,
            )
        )
        if old.state is not P.FAILED:
            assert changes is not None and not changes, "a replay must be harmless"
        elif changes is not None:
            assert self.out.participants[name].state in (P.REGISTERED, P.PREPARING)

    @precondition(
        lambda self: (
            bool(self.out.participants) and self.out.handover.state in (H.IDLE, H.COMMITTED)
        )
    )
    @rule(data=st.data())
    def fail_a_known_one(self, data: st.DataObject) -> None:
        self.fail(data.draw(st.sampled_from(sorted(self.out.participants))), "crash")

    @rule(name=st.sampled_from(NAME_POOL))
    def gone(self, name: str) -> None:
        member = self.out.in_handover(name)
        state = self.out.handover.state
        changes = self.apply(lambda: self.out.gone(name, now=self.now))
        if changes is None:
            return
        if member:
            # The handover aborts, and the vanished participant is forgotten.
            assert self.out.handover.state is H.IDLE
            assert name not in self.out.participants
            assert name in changes.removed
        elif state is H.COMMITTED:
            assert not changes
        else:
            assert name not in self.out.participants
            assert changes.removed == {name}

    # -- operator requests ----------------------------------------------------

    @rule(
        expect=st.one_of(
            st.none(), st.lists(st.sampled_from([*NAME_POOL, "ghost", "x/y"]), max_size=4)
        ),
        auto_freeze=st.booleans(),
        span=st.floats(1.0, 200.0),
    )
    def begin(self, expect: list[str] | None, auto_freeze: bool, span: float) -> None:
        hid = f"h{next(self.ids)}"
        changes = self.apply(
            lambda: self.out.begin(
                hid, deadline=self.now + span, expect=expect, auto_freeze=auto_freeze, now=self.now
            )
        )
        if changes is not None:
            h = self.out.handover
            assert (h.id, h.state, h.auto_freeze) == (hid, H.PREPARING, auto_freeze)
            if expect is not None:
                assert h.expected == tuple(dict.fromkeys(expect))
            for n in h.expected:
                if n in self.out.participants:
                    assert self.out.participants[n].state is P.PREPARING

    @rule(force=st.booleans())
    def freeze(self, force: bool) -> None:
        missing = self.out.missing() if self.out.handover.state is H.PREPARING else []
        expected = self.out.handover.expected
        changes = self.apply(lambda: self.out.freeze(force=force, now=self.now))
        if changes is None:
            return
        assert force or not missing
        h = self.out.handover
        assert h.state is H.FREEZING
        assert h.left_out == tuple(missing)
        assert h.expected == tuple(n for n in expected if n not in missing)
        for n in missing:
            if n in self.out.participants:
                assert self.out.participants[n].state is P.REGISTERED

    @rule(reason=st.sampled_from(["operator", "maintenance window closed"]))
    def abort(self, reason: str) -> None:
        was = self.out.handover.state
        changes = self.apply(lambda: self.out.abort(reason, now=self.now))
        if changes is not None:
            # Once committed, an abort withdraws the payload and says so.
            said = f"payload withdrawn: {reason}" if was is H.COMMITTED else reason
            assert self.out.handover.abort_reason == said
            assert self.out.handover.state is H.IDLE and self.out.handover.payload is None

    @rule(dt=st.one_of(st.sampled_from([0.0, 1.0, 5.0]), st.floats(0.0, 100.0)))
    def tick(self, dt: float) -> None:
        self.now += dt
        deadline = self.out.handover.deadline
        abortable = self.out.handover.state in (H.PREPARING, H.FREEZING, H.FROZEN, H.ASSEMBLED)
        changes = self.apply(lambda: self.out.check_deadline(now=self.now))
        assert changes is not None
        if abortable and deadline is not None and self.now >= deadline:
            assert self.out.handover.state is H.IDLE
            assert (self.out.handover.abort_reason or "").startswith("deadline passed in ")
        else:
            assert not changes

    @rule()
    def assemble(self) -> None:
        self.apply(self.out.assembled)

    @rule()
    def commit_now(self) -> None:
        self.commit()

    @rule()
    def restart_from_records(self) -> None:
        """The daemon is killed and resumes from what it persisted."""
        before = snapshot(self.out)
        h, ps = json.loads(json.dumps(before))
        self.out = Outgoing(
            Handover.from_record(h), [Participant.from_record(p) for p in ps.values()]
        )
        assert snapshot(self.out) == before

    @precondition(lambda self: self.out.handover.state is H.COMMITTED)
    @rule()
    def next_boot(self) -> None:
        self.out = Outgoing()

    # -- invariants ------------------------------------------------------------

    @invariant()
    def states_are_known(self) -> None:
        assert isinstance(self.out.handover.state, HandoverState)
        for n, p in self.out.participants.items():
            assert p.name == n
            assert isinstance(p.state, ParticipantState)

    @invariant()
    def expected_are_unique(self) -> None:
        h = self.out.handover
        assert len(set(h.expected)) == len(h.expected)
        assert set(h.left_out).isdisjoint(h.expected)

    @invariant()
    def nothing_committed_unless_all_frozen(self) -> None:
        h = self.out.handover
        if h.state in (H.FROZEN, H.ASSEMBLED, H.COMMITTED):
            assert h.expected
            for n in h.expected:
                p = self.out.participants.get(n)
                assert p is not None, n  # gone after commit keeps them
                if h.state is not H.COMMITTED:
                    assert p.state is P.FROZEN, (n, p.state)
                assert p.fragment_sha256 is not None, n
            assert sorted(h.freeze_order) == sorted(h.expected)
        if h.state is H.COMMITTED:
            assert h.payload is not None and h.committed_at is not None

    @invariant()
    def freeze_order_is_honoured(self) -> None:
        h = self.out.handover
        if h.state in (H.FREEZING, H.FROZEN, H.ASSEMBLED, H.COMMITTED):
            assert sorted(h.freeze_order) == sorted(h.expected)
            pos = {n: i for i, n in enumerate(h.freeze_order)}
            for n in h.expected:
                for m in self.out.participants[n].freeze_after:
                    if m in pos:
                        assert pos[m] < pos[n]
        if h.state is H.FREEZING:
            for n in h.expected:
                p = self.out.participants[n]
                if p.state is P.FROZEN:
                    for m in p.freeze_after:
                        if m in h.expected:
                            assert self.out.participants[m].state is P.FROZEN, (n, m)
            assert set(self.out.may_freeze_now()) <= set(h.expected)
        else:
            assert self.out.may_freeze_now() == []

    @invariant()
    def participant_states_fit_the_handover(self) -> None:
        h = self.out.handover
        active = h.state in (H.PREPARING, H.FREEZING, H.FROZEN, H.ASSEMBLED)
        for n, p in self.out.participants.items():
            if active and n in h.expected:
                allowed = {
                    H.PREPARING: {P.PREPARING, P.SERIALIZED},
                    H.FREEZING: {P.PREPARING, P.SERIALIZED, P.FROZEN},
                }.get(h.state, {P.FROZEN})
                assert p.state in allowed, (n, p.state, h.state)
            elif h.state is H.COMMITTED and n in h.expected:
                # After commit a member may fail and even register again (it
                # restarted before the kexec); its record keeps the fragment
                # that is in the committed payload.
                assert p.state in (P.FROZEN, P.FAILED, P.REGISTERED), (n, p.state)
                assert p.fragment_sha256 is not None
                continue
            else:
                assert p.state in (P.REGISTERED, P.FAILED), (n, p.state, h.state)
            if p.state in (P.SERIALIZED, P.FROZEN):
                assert p.fragment_sha256 is not None and p.fragment_size is not None
            if p.state in (P.REGISTERED, P.PREPARING):
                assert p.fragment_sha256 is None and p.fragment_size is None

    @invariant()
    def identities_are_unique(self) -> None:
        ids = [(p.compatible, p.instance) for p in self.out.participants.values()]
        assert len(set(ids)) == len(ids)


OutgoingMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestOutgoingMachine = OutgoingMachine.TestCase


# -- a scripted run of the machine, so the stateful plumbing itself is tested ----


def test_machine_plumbing_catches_a_state_change_on_refusal() -> None:
    m = OutgoingMachine()

    def sneaky() -> Changes:
        m.out.handover.deadline = 1.0
        raise Busy("no")

    with pytest.raises(AssertionError, match="refused request changed state"):
        m.apply(sneaky)


def test_machine_plumbing_lets_non_khod_errors_through() -> None:
    m = OutgoingMachine()

    def broken() -> Changes:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        m.apply(broken)


def test_machine_plumbing_catches_an_unreported_change() -> None:
    m = OutgoingMachine()
    reg(m.out, "a")

    def silent() -> Changes:
        m.out.participants["a"].error = "x"
        return Changes()

    with pytest.raises(AssertionError):
        m.apply(silent)


def test_scripted_machine_run() -> None:
    m = OutgoingMachine()
    m.register("a", "fresh", [], [])
    m.register("b", "fresh", ["a"], [])
    m.register("b", "same", [], [])
    m.register("e", "steal", [], [])  # e would take a's identity: refused
    m.register("a", "other-compatible", [], [])  # a again as someone else: refused
    assert set(m.out.participants) == {"a", "b"}
    m.begin(None, True, 10.0)
    m.submit("a", 10, "commit")
    m.submit("b", 10, "commit")
    assert m.out.handover.state is H.FREEZING
    m.frozen("b", "commit")  # refused: waits for a
    assert m.out.participants["b"].state is P.SERIALIZED
    m.frozen("a", "commit")
    m.frozen("b", "commit")
    assert m.out.handover.state is H.COMMITTED
    assert m.commits == 1
    m.states_are_known()
    m.nothing_committed_unless_all_frozen()
    m.freeze_order_is_honoured()
    m.participant_states_fit_the_handover()


def test_an_abort_leaves_a_failed_bystander_failed() -> None:
    out = Outgoing()
    reg(out, "db")
    reg(out, "vm")
    out.begin("h", deadline=9.0, expect=["db"], now=1.0)
    out.fail("vm", "disk full", now=2.0)  # not part of the handover: nothing aborts
    assert out.handover.state is H.PREPARING
    out.abort("operator", now=3.0)
    assert states(out) == {"db": "registered", "vm": "failed"}
    assert out.participants["vm"].error == "disk full"
