"""khod.lifecycle: every (state, event) pair of every table, and ``order()``.

The expected tables below are written from the diagrams of the design
contract (``design/khod.md``, "Lifecycles"), as plain strings, not read from
the module under test: a transition added to or dropped from a table makes
one of these cases fail.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from khod.lifecycle import (
    ABORTABLE,
    HANDOVER_TABLE,
    HOST_RESTORE_TABLE,
    PARTICIPANT_TABLE,
    RESTORE_TABLE,
    RUNNING_STATES,
    TABLES,
    HandoverEvent,
    HandoverState,
    HostRestoreEvent,
    HostRestoreState,
    ParticipantEvent,
    ParticipantState,
    RestoreEvent,
    RestoreState,
    find_cycle,
    handover_next,
    host_restore_next,
    next_state,
    order,
    participant_next,
    restore_next,
)
from khod_wire.errors import IllegalTransition, LifecycleError, OrderingError

# -- the expected tables, from the design's diagrams -------------------------

# idle -> preparing -> freezing -> frozen -> assembled -> committed
# any state before committed -> idle (abort)
EXPECTED_HANDOVER = {
    ("idle", "begin"): "preparing",
    ("preparing", "freeze"): "freezing",
    ("preparing", "abort"): "idle",
    ("freezing", "all-frozen"): "frozen",
    ("freezing", "abort"): "idle",
    ("frozen", "assemble"): "assembled",
    ("frozen", "abort"): "idle",
    ("assembled", "commit"): "committed",
    ("assembled", "abort"): "idle",
    # committed is final for this boot (KHO's -EBUSY after finalization),
    # unless the operator withdraws the payload: the kexec will not happen
    ("committed", "withdraw"): "idle",
}

# registered -> preparing -> serialized -> frozen
# preparing/serialized -> preparing   (re-serialize, until freeze)
# serialized -> serialized            (a new fragment replaces the old)
# any -> failed
# on abort, every participant is told to cancel and returns to registered
# registering again: a reconnect (registered) or a restart (failed)
EXPECTED_PARTICIPANT = {
    ("registered", "register"): "registered",
    ("registered", "begin"): "preparing",
    ("registered", "fail"): "failed",
    ("registered", "cancel"): "registered",
    ("preparing", "submit"): "serialized",
    ("preparing", "revise"): "preparing",
    ("preparing", "fail"): "failed",
    ("preparing", "cancel"): "registered",
    ("serialized", "submit"): "serialized",
    ("serialized", "revise"): "preparing",
    ("serialized", "freeze"): "frozen",
    ("serialized", "fail"): "failed",
    ("serialized", "cancel"): "registered",
    ("frozen", "fail"): "failed",
    ("frozen", "cancel"): "registered",
    ("failed", "register"): "registered",
    ("failed", "cancel"): "registered",
}

# available -> retrieved -> finished (a restarted participant retrieves again)
EXPECTED_RESTORE = {
    ("available", "retrieve"): "retrieved",
    ("retrieved", "retrieve"): "retrieved",
    ("retrieved", "finish"): "finished",
}

# restoring -> released
EXPECTED_HOST_RESTORE = {
    ("restoring", "release"): "released",
}

Step = Callable[[object, object], object]

MACHINES: list[tuple[str, type, type, Mapping[tuple[str, str], str], Step]] = [
    ("handover", HandoverState, HandoverEvent, EXPECTED_HANDOVER, handover_next),
    ("participant", ParticipantState, ParticipantEvent, EXPECTED_PARTICIPANT, participant_next),
    ("restore", RestoreState, RestoreEvent, EXPECTED_RESTORE, restore_next),
    ("host-restore", HostRestoreState, HostRestoreEvent, EXPECTED_HOST_RESTORE, host_restore_next),
]


def _cases() -> list[Any]:
    cases = []
    for machine, states, events, expected, step in MACHINES:
        for state, event in itertools.product(states, events):
            cases.append(
                pytest.param(
                    machine,
                    state,
                    event,
                    expected.get((str(state), str(event))),
                    step,
                    id=f"{machine}:{state}+{event}",
                )
            )
    return cases


CASES = _cases()


def test_expected_tables_name_real_states_and_events() -> None:
    # Guards the test itself: a typo here would silently become "refused".
    for _machine, states, events, expected, _step in MACHINES:
        names = {str(s) for s in states}
        for (state, event), to in expected.items():
            assert state in names and to in names
            assert event in {str(e) for e in events}


@pytest.mark.parametrize(("machine", "state", "event", "want", "step"), CASES)
def test_every_state_event_pair(
    machine: str, state: object, event: object, want: str | None, step: Step
) -> None:
    table = TABLES[machine]
    if want is not None:
        got = step(state, event)
        assert got == want
        assert type(got) is type(state)  # the table maps to the machine's own enum
        assert next_state(machine, table, state, event) == want
        return
    for call in (lambda: step(state, event), lambda: next_state(machine, table, state, event)):
        with pytest.raises(IllegalTransition) as info:
            call()
        err = info.value
        assert isinstance(err, LifecycleError)
        assert (err.machine, err.state, err.event) == (machine, str(state), str(event))
        msg = str(err)
        assert msg == f"{machine}: event {str(event)!r} is not allowed in state {str(state)!r}"
        assert err.code == "illegal-transition"


def test_enums_are_the_designs_vocabulary() -> None:
    assert [str(s) for s in HandoverState] == [
        "idle",
        "preparing",
        "freezing",
        "frozen",
        "assembled",
        "committed",
    ]
    assert [str(s) for s in ParticipantState] == [
        "registered",
        "preparing",
        "serialized",
        "frozen",
        "failed",
    ]
    assert [str(s) for s in RestoreState] == ["available", "retrieved", "finished"]
    assert [str(s) for s in HostRestoreState] == ["restoring", "released"]


@pytest.mark.parametrize(
    ("table", "states"),
    [
        (HANDOVER_TABLE, HandoverState),
        (PARTICIPANT_TABLE, ParticipantState),
        (RESTORE_TABLE, RestoreState),
        (HOST_RESTORE_TABLE, HostRestoreState),
    ],
)
def test_every_state_has_a_row(table: Mapping[object, object], states: type) -> None:
    assert set(table) == set(states)


# -- properties of the tables: what any edit of them must keep ------------------

#: Where each machine starts.
INITIAL: dict[str, StrEnum] = {
    "handover": HandoverState.IDLE,
    "participant": ParticipantState.REGISTERED,
    "restore": RestoreState.AVAILABLE,
    "host-restore": HostRestoreState.RESTORING,
}
#: Where each machine must always be able to get to: the outgoing machines
#: back to rest (a host is never stuck unable to begin its next handover),
#: the incoming ones to their end (a restore always ends).
HOME: dict[str, StrEnum] = {
    "handover": HandoverState.IDLE,
    "participant": ParticipantState.REGISTERED,
    "restore": RestoreState.FINISHED,
    "host-restore": HostRestoreState.RELEASED,
}


def reachable(table: Mapping[StrEnum, Mapping[StrEnum, StrEnum]], start: StrEnum) -> set[StrEnum]:
    seen, todo = {start}, [start]
    while todo:
        for to in table[todo.pop()].values():
            if to not in seen:
                seen.add(to)
                todo.append(to)
    return seen


def test_the_registry_has_one_table_per_machine_over_its_own_states() -> None:
    assert set(TABLES) == {m for m, *_ in MACHINES}
    for machine, states, events, _expected, _step in MACHINES:
        table = TABLES[machine]
        assert set(table) == set(states), machine
        for row in table.values():
            assert set(row) <= set(events), machine
            assert all(type(to) is states for to in row.values()), machine


@pytest.mark.parametrize("machine", sorted(INITIAL))
def test_every_state_is_reachable_from_the_start(machine: str) -> None:
    table = TABLES[machine]
    assert reachable(table, INITIAL[machine]) == set(table)


@pytest.mark.parametrize("machine", sorted(HOME))
def test_home_is_reachable_from_every_state(machine: str) -> None:
    table = TABLES[machine]
    stuck = [str(s) for s in table if HOME[machine] not in reachable(table, s)]
    assert stuck == [], f"{machine}: {HOME[machine]} cannot be reached from {stuck}"


def test_only_the_ends_of_a_restore_are_dead_ends() -> None:
    dead = {(m, str(s)) for m, table in TABLES.items() for s, row in table.items() if not row}
    assert dead == {("restore", "finished"), ("host-restore", "released")}


def test_a_handover_ends_in_one_step_from_every_running_state() -> None:
    # Nothing in between: the state after an abort is the one published with it.
    for state in RUNNING_STATES:
        assert handover_next(state, HandoverEvent.ABORT) is HandoverState.IDLE
    assert handover_next(HandoverState.COMMITTED, HandoverEvent.WITHDRAW) is HandoverState.IDLE


def test_abortable_and_running() -> None:
    assert {str(s) for s in ABORTABLE} == {"preparing", "freezing", "frozen", "assembled"}
    assert {str(s) for s in RUNNING_STATES} == {"preparing", "freezing", "frozen", "assembled"}


def test_illegal_transition_detail_is_appended() -> None:
    err = IllegalTransition("handover", "idle", "abort", "nothing to abort")
    assert str(err) == "handover: event 'abort' is not allowed in state 'idle': nothing to abort"


# -- order() ---------------------------------------------------------------------


def test_order_empty() -> None:
    assert order({}) == []


def test_order_without_edges_is_by_name() -> None:
    assert order({"vm2": [], "b": [], "vm10": [], "a": []}) == ["a", "b", "vm10", "vm2"]


def test_order_honours_edges_against_the_alphabet() -> None:
    assert order({"agent": ["vm"], "vm": [], "db": []}) == ["db", "vm", "agent"]


def test_order_diamond() -> None:
    after = {"d": ["b", "c"], "c": ["a"], "b": ["a"], "a": []}
    assert order(after) == ["a", "b", "c", "d"]


def test_order_ties_by_name_at_every_step() -> None:
    # a and z are ready at once; m waits for z. Smallest-name-first gives a, z, m.
    assert order({"m": ["z"], "z": [], "a": []}) == ["a", "z", "m"]
    # y waits for b; c is ready from the start and sorts before y.
    assert order({"y": ["b"], "b": [], "c": []}) == ["b", "c", "y"]


def test_order_is_deterministic_under_input_order_and_duplicates() -> None:
    a = order({"c": ["a", "b"], "b": ["a"], "a": [], "x": []})
    b = order({"x": [], "a": [], "b": ["a", "a"], "c": ("b", "a", "b")})
    assert a == b == ["a", "b", "c", "x"]


def test_order_rejects_a_cycle_showing_the_path() -> None:
    with pytest.raises(OrderingError) as info:
        order({"a": ["c"], "b": ["a"], "c": ["b"], "free": []})
    assert str(info.value) == "freeze order has a cycle: a -> c -> b -> a"
    assert info.value.code == "bad-ordering"


def test_order_rejects_a_cycle_in_restore_wording() -> None:
    with pytest.raises(OrderingError, match=r"^restore order has a cycle: x -> y -> x$"):
        order({"x": ["y"], "y": ["x"]}, what="restore")


def test_order_rejects_self_edge() -> None:
    with pytest.raises(OrderingError, match=r"'a' cannot freeze after itself"):
        order({"a": ["a"]})


def test_order_rejects_an_unknown_name() -> None:
    with pytest.raises(OrderingError) as info:
        order({"vm": ["ghost", "db"], "db": []})
    msg = str(info.value)
    assert "'ghost'" in msg
    assert "'vm'" in msg
    assert "'db'" not in msg  # only the unknown one is blamed
    assert "not part of the handover" in msg


def test_find_cycle() -> None:
    assert find_cycle({}) == []
    assert find_cycle({"a": ["b"], "b": []}) == []
    assert find_cycle({"a": ["ghost"]}) == []  # unknown names are no edges
    assert find_cycle({"a": ["a"]}) == ["a", "a"]
    assert find_cycle({"b": ["a"], "a": ["b"]}) == ["a", "b", "a"]
    assert find_cycle({"a": [], "b": ["c"], "c": ["d"], "d": ["b"]}) == ["b", "c", "d", "b"]


# -- hypothesis ------------------------------------------------------------------

NAMES = st.lists(
    st.text("abcdefghij0123456789-._", min_size=1, max_size=4), min_size=0, max_size=9, unique=True
)


def reference_order(after: Mapping[str, list[str]]) -> list[str]:
    """Smallest available name first: the documented tie rule, by brute force."""
    done: list[str] = []
    left = set(after)
    while left:
        ready = [n for n in left if set(after[n]) <= set(done)]
        assert ready, "reference_order called on a cyclic graph"
        n = min(ready)
        done.append(n)
        left.remove(n)
    return done


@st.composite
def dags(draw: st.DrawFn) -> dict[str, list[str]]:
    names = draw(NAMES)
    # Edges go only from later to earlier in a random permutation: acyclic.
    perm = draw(st.permutations(names))
    after: dict[str, list[str]] = {}
    for i, n in enumerate(perm):
        after[n] = draw(st.lists(st.sampled_from(perm[:i]), max_size=4)) if i else []
    keys = draw(st.permutations(list(after)))  # insertion order must not matter
    return {k: after[k] for k in keys}


@settings(max_examples=300, deadline=None)
@given(dags())
def test_order_of_a_dag_is_a_valid_topological_order(after: dict[str, list[str]]) -> None:
    result = order(after)
    assert sorted(result) == sorted(after)
    pos = {n: i for i, n in enumerate(result)}
    for n, before in after.items():
        for m in before:
            assert pos[m] < pos[n], f"{n} must come after {m}"
    assert result == reference_order(after)
    assert order(dict(reversed(list(after.items())))) == result
    assert find_cycle(after) == []


@st.composite
def cyclic_graphs(draw: st.DrawFn) -> tuple[dict[str, list[str]], list[str]]:
    names = draw(st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=8, unique=True))
    after: dict[str, list[str]] = {
        n: draw(st.lists(st.sampled_from(names), max_size=3)) for n in names
    }
    ring = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
    for i, n in enumerate(ring):
        after[n] = [*after[n], ring[i - 1]]  # n after its predecessor in the ring
    return after, ring


def _is_cycle_of(path: list[str], after: Mapping[str, list[str]]) -> bool:
    return (
        len(path) >= 2
        and path[0] == path[-1]
        and all(b in after[a] for a, b in itertools.pairwise(path))
    )


@settings(max_examples=300, deadline=None)
@given(cyclic_graphs())
def test_order_of_a_cyclic_graph_is_refused(g: tuple[dict[str, list[str]], list[str]]) -> None:
    after, _ring = g
    with pytest.raises(OrderingError) as info:
        order(after)
    msg = str(info.value)
    self_loops = [n for n, d in after.items() if n in d]
    if self_loops:
        assert re.search(r"'(.+)' cannot freeze after itself", msg)
        return
    m = re.fullmatch(r"freeze order has a cycle: (.+)", msg)
    assert m, msg
    path = m.group(1).split(" -> ")
    assert _is_cycle_of(path, after), path
    assert _is_cycle_of(find_cycle(after), after)


@settings(max_examples=200, deadline=None)
@given(dags(), st.data())
def test_order_unknown_name_is_refused(after: dict[str, list[str]], data: st.DataObject) -> None:
    ghost = "zz-not-there"
    victim = data.draw(st.sampled_from([*after, "solo"]))
    after.setdefault(victim, [])
    after[victim] = [*after[victim], ghost]
    with pytest.raises(OrderingError, match=re.escape(repr(ghost))):
        order(after)
