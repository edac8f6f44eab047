"""The lifecycles of khod: every state, every event, every allowed transition.

Theory of operation
-------------------
Three machines, each one explicit table ``{STATE: {EVENT: NEXT_STATE}}``:

* the **handover** (outgoing side, one per host)::

      idle -> preparing -> freezing -> frozen -> assembled -> committed
      any state before committed -> idle   (abort)
      committed -> idle                     (withdraw: the kexec will not happen)

* a **participant** inside a handover::

      registered -> preparing -> serialized -> frozen
      serialized -> serialized  (a new fragment replaces the old, until freeze)
      preparing/serialized -> preparing   (revise: the fragment is stale, a new one follows)
      any -> failed; on abort every participant returns to registered

* a participant's **restore** (incoming side, after the kexec)::

      available -> retrieved -> finished

  and the host's restore: ``restoring -> released``.

The states themselves are part of the wire contract and are defined once,
in ``khod_wire.protocol`` (with the sets derived from them, such as
``RUNNING_STATES``); this module adds the events and the transitions.
Everything that decides whether a transition is legal lives here; the
aggregates in ``khod.handover`` and ``khod.restore`` only consult these
tables. An event a table lacks raises ``IllegalTransition`` naming the
machine, the state and the event, and nothing changes. There is no I/O in
this module.

Ordering: a participant may name participants it must freeze after (and
restore after). ``order()`` turns those edges into one deterministic
sequence and rejects cycles and unknown names; ``check_after`` is the one
check of a participant's own edges.
"""

from __future__ import annotations

import heapq
from collections.abc import Container, Iterable, Mapping
from enum import StrEnum
from typing import TypeVar

from khod_wire.errors import IllegalTransition, OrderingError
from khod_wire.protocol import (
    RUNNING_STATES,
    HandoverState,
    HostRestoreState,
    ParticipantState,
    RestoreState,
)

__all__ = [
    "ABORTABLE",
    "HANDOVER_TABLE",
    "HOST_RESTORE_TABLE",
    "PARTICIPANT_TABLE",
    "RESTORE_TABLE",
    "RUNNING_STATES",
    "TABLES",
    "HandoverEvent",
    "HandoverState",
    "HostRestoreEvent",
    "HostRestoreState",
    "ParticipantEvent",
    "ParticipantState",
    "RestoreEvent",
    "RestoreState",
    "check_after",
    "find_cycle",
    "order",
]


class HandoverEvent(StrEnum):
    BEGIN = "begin"
    FREEZE = "freeze"
    ALL_FROZEN = "all-frozen"
    ASSEMBLE = "assemble"
    COMMIT = "commit"
    ABORT = "abort"
    WITHDRAW = "withdraw"


class ParticipantEvent(StrEnum):
    REGISTER = "register"
    BEGIN = "begin"
    SUBMIT = "submit"
    REVISE = "revise"
    FREEZE = "freeze"
    FAIL = "fail"
    CANCEL = "cancel"


class RestoreEvent(StrEnum):
    RETRIEVE = "retrieve"
    FINISH = "finish"


class HostRestoreEvent(StrEnum):
    RELEASE = "release"


H, P, R = HandoverState, ParticipantState, RestoreState

HANDOVER_TABLE: dict[HandoverState, dict[HandoverEvent, HandoverState]] = {
    H.IDLE: {HandoverEvent.BEGIN: H.PREPARING},
    H.PREPARING: {HandoverEvent.FREEZE: H.FREEZING, HandoverEvent.ABORT: H.IDLE},
    H.FREEZING: {HandoverEvent.ALL_FROZEN: H.FROZEN, HandoverEvent.ABORT: H.IDLE},
    H.FROZEN: {HandoverEvent.ASSEMBLE: H.ASSEMBLED, HandoverEvent.ABORT: H.IDLE},
    H.ASSEMBLED: {HandoverEvent.COMMIT: H.COMMITTED, HandoverEvent.ABORT: H.IDLE},
    # Committed is final for this boot, like KHO after finalization (-EBUSY),
    # with one way back: the operator withdraws the payload because the kexec
    # will not happen (postponed, `kexec -l` failed), and everyone thaws.
    H.COMMITTED: {HandoverEvent.WITHDRAW: H.IDLE},
}

PARTICIPANT_TABLE: dict[ParticipantState, dict[ParticipantEvent, ParticipantState]] = {
    P.REGISTERED: {
        # Registering again with the same identity is a reconnect, not an error.
        ParticipantEvent.REGISTER: P.REGISTERED,
        ParticipantEvent.BEGIN: P.PREPARING,
        ParticipantEvent.FAIL: P.FAILED,
        ParticipantEvent.CANCEL: P.REGISTERED,
    },
    P.PREPARING: {
        ParticipantEvent.SUBMIT: P.SERIALIZED,
        # Design: "preparing/serialized -> preparing"; a replayed revise is harmless.
        ParticipantEvent.REVISE: P.PREPARING,
        ParticipantEvent.FAIL: P.FAILED,
        ParticipantEvent.CANCEL: P.REGISTERED,
    },
    P.SERIALIZED: {
        ParticipantEvent.SUBMIT: P.SERIALIZED,
        ParticipantEvent.REVISE: P.PREPARING,
        ParticipantEvent.FREEZE: P.FROZEN,
        ParticipantEvent.FAIL: P.FAILED,
        ParticipantEvent.CANCEL: P.REGISTERED,
    },
    P.FROZEN: {
        ParticipantEvent.FAIL: P.FAILED,
        ParticipantEvent.CANCEL: P.REGISTERED,
    },
    P.FAILED: {
        # A failed component that restarts registers again.
        ParticipantEvent.REGISTER: P.REGISTERED,
        ParticipantEvent.CANCEL: P.REGISTERED,
    },
}

RESTORE_TABLE: dict[RestoreState, dict[RestoreEvent, RestoreState]] = {
    R.AVAILABLE: {RestoreEvent.RETRIEVE: R.RETRIEVED},
    # A participant that restarts before finishing retrieves its fragment again.
    R.RETRIEVED: {RestoreEvent.RETRIEVE: R.RETRIEVED, RestoreEvent.FINISH: R.FINISHED},
    R.FINISHED: {},
}

HOST_RESTORE_TABLE: dict[HostRestoreState, dict[HostRestoreEvent, HostRestoreState]] = {
    HostRestoreState.RESTORING: {HostRestoreEvent.RELEASE: HostRestoreState.RELEASED},
    HostRestoreState.RELEASED: {},
}

TABLES: dict[str, Mapping[StrEnum, Mapping[StrEnum, StrEnum]]] = {
    "handover": HANDOVER_TABLE,  # type: ignore[dict-item]
    "participant": PARTICIPANT_TABLE,  # type: ignore[dict-item]
    "restore": RESTORE_TABLE,  # type: ignore[dict-item]
    "host-restore": HOST_RESTORE_TABLE,  # type: ignore[dict-item]
}

#: Handover states in which a payload does not exist yet and abort is possible.
ABORTABLE = frozenset(s for s, row in HANDOVER_TABLE.items() if HandoverEvent.ABORT in row)

S = TypeVar("S", bound=StrEnum)
E = TypeVar("E", bound=StrEnum)


def next_state(machine: str, table: Mapping[S, Mapping[E, S]], state: S, event: E) -> S:
    """The state ``event`` leads to from ``state``, or ``IllegalTransition``."""
    try:
        return table[state][event]
    except KeyError:
        raise IllegalTransition(machine, str(state), str(event)) from None


def handover_next(state: HandoverState, event: HandoverEvent) -> HandoverState:
    return next_state("handover", HANDOVER_TABLE, state, event)


def participant_next(state: ParticipantState, event: ParticipantEvent) -> ParticipantState:
    return next_state("participant", PARTICIPANT_TABLE, state, event)


def restore_next(state: RestoreState, event: RestoreEvent) -> RestoreState:
    return next_state("restore", RESTORE_TABLE, state, event)


def host_restore_next(state: HostRestoreState, event: HostRestoreEvent) -> HostRestoreState:
    return next_state("host-restore", HOST_RESTORE_TABLE, state, event)


def order(after: Mapping[str, Iterable[str]], *, what: str = "freeze") -> list[str]:
    """Every name of ``after`` once, each after the names it lists.

    ``after[n]`` are the names ``n`` must come after. Ties are broken by name,
    so the same input always gives the same order (the payload is
    deterministic). An unknown name or a cycle raises ``OrderingError``.
    """
    deps: dict[str, set[str]] = {}
    for name, before in after.items():
        check_after(name, before, after.keys(), what=what)
        deps[name] = set(before)
    result: list[str] = []
    done: set[str] = set()
    # A heap: ties broken by name in O(log N), not by re-sorting a list.
    ready = [n for n, d in deps.items() if not d]
    heapq.heapify(ready)
    dependants: dict[str, list[str]] = {n: [] for n in deps}
    for n, d in deps.items():
        for m in d:
            dependants[m].append(n)
    pending = {n: len(d) for n, d in deps.items()}
    while ready:
        n = heapq.heappop(ready)
        result.append(n)
        done.add(n)
        for m in dependants[n]:
            if _release(pending, m):
                heapq.heappush(ready, m)
    if len(result) != len(deps):
        raise OrderingError(f"{what} order has a cycle: {' -> '.join(find_cycle(deps))}")
    return result


def check_after(
    name: str, after: Iterable[str], known: Container[str] | None = None, *, what: str
) -> None:
    """The rules of one participant's ordering edges: only names that take part, never itself.

    ``after``: the names ``name`` must ``what`` (freeze, restore) after;
    ``known``: the names that take part (None: not known yet, at registration).
    """
    wanted = sorted(set(after))
    if known is not None:
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise OrderingError(
                f"{name!r} must {what} after {', '.join(map(repr, unknown))}, "
                "which is not part of the handover"
            )
    if name in wanted:
        raise OrderingError(f"{name!r} cannot {what} after itself")


def _release(pending: dict[str, int], name: str) -> bool:
    pending[name] -= 1
    return pending[name] == 0


def find_cycle(after: Mapping[str, Iterable[str]]) -> list[str]:
    """One cycle of the ``after`` graph as a closed path, or [] when acyclic."""
    graph = {n: sorted(set(d) & after.keys()) for n, d in after.items()}
    colour: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(n: str) -> list[str]:
        colour[n] = 1
        path.append(n)
        for m in graph[n]:
            if colour.get(m) == 1:
                return [*path[path.index(m) :], m]
            if m not in colour and (cycle := visit(m)):
                return cycle
        colour[n] = 2
        path.pop()
        return []

    for n in sorted(graph):
        if n not in colour and (cycle := visit(n)):
            return cycle
    return []
