"""Who takes part in the outgoing handover and where each stands: read-only, O(1).

``Members`` holds the handover record and the participants' records, with
the indexes that keep every request O(1) in the number of participants,
and answers the questions the requests and the statuses ask (who is
missing, who may freeze now, how many are in each state). ``Outgoing`` in
``khod.handover`` adds the requests that change them.
"""

from __future__ import annotations

from collections.abc import Iterable

from khod.lifecycle import RUNNING_STATES
from khod.records import Handover, Participant
from khod_wire.protocol import HandoverState, ParticipantState

P = ParticipantState
H = HandoverState


class Members:
    """Who takes part in the handover, and where each stands: indexes and queries."""

    def __init__(
        self,
        handover: Handover | None = None,
        participants: Iterable[Participant] = (),
    ) -> None:
        self.handover = handover or Handover()
        self.participants: dict[str, Participant] = {p.name: p for p in participants}
        #: who is registered as each (compatible, instance): one name each
        self._identities: dict[tuple[str, object], str] = {
            (p.compatible, p.instance): p.name for p in self.participants.values()
        }
        # Indexes that keep every request O(1) in the number of participants:
        # the members of the handover as a set, and how many are in each
        # state. Rebuilt (O(N)) only when ``handover.expected`` is replaced,
        # which begin and a forced freeze do, never a participant's request.
        self._indexed: tuple[str, ...] | None = None
        self._members: set[str] = set()
        self._tally: dict[ParticipantState, int] = {}
        #: who names whom in freeze_after, among the members (built at freeze)
        self._dependents: dict[str, list[str]] = {}
        if self.handover.state is H.FREEZING:
            self._index_dependents()

    # -- indexes -------------------------------------------------------------

    def _index(self) -> None:
        expected = self.handover.expected
        if self._indexed is expected:
            return
        self._indexed = expected
        self._members = set(expected)
        self._tally = dict.fromkeys(ParticipantState, 0)
        for n in self._members:
            p = self.participants.get(n)
            if p is not None:
                self._tally[p.state] += 1

    def _join(self, name: str) -> None:
        """Add ``name`` to the expected members, keeping the indexes (O(1) amortized)."""
        self._index()
        self.handover.expected = (*self.handover.expected, name)
        self._indexed = self.handover.expected
        self._members.add(name)
        p = self.participants.get(name)
        if p is not None:
            self._tally[p.state] += 1

    def _count(self, *states: ParticipantState) -> int:
        self._index()
        return sum(self._tally[s] for s in states)

    # -- queries -------------------------------------------------------------

    def is_member(self, name: str) -> bool:
        """Whether ``name`` is expected by the current handover (running or not)."""
        self._index()
        return name in self._members

    def in_handover(self, name: str) -> bool:
        return self.handover.state in RUNNING_STATES and self.is_member(name)

    def missing_count(self) -> int:
        """How many expected participants are not serialized (or frozen) yet, in O(1)."""
        return len(self.handover.expected) - self._count(P.SERIALIZED, P.FROZEN)

    def not_frozen_count(self) -> int:
        return len(self.handover.expected) - self._count(P.FROZEN)

    def may_freeze(self, name: str) -> bool | None:
        """Whether one that named ``freeze_after`` may freeze now; None if it named none."""
        p = self.participants[name]
        if not p.freeze_after:
            return None
        return (
            self.handover.state is H.FREEZING
            and p.state is P.SERIALIZED
            and self.is_member(name)
            and not self._waiting_for(name)
        )

    def missing(self) -> list[str]:
        """Expected participants not serialized (or frozen) yet."""
        ok = (P.SERIALIZED, P.FROZEN)
        return [
            n
            for n in self.handover.expected
            if n not in self.participants or self.participants[n].state not in ok
        ]

    def not_frozen(self) -> list[str]:
        return [
            n
            for n in self.handover.expected
            if n not in self.participants or self.participants[n].state is not P.FROZEN
        ]

    def may_freeze_now(self) -> list[str]:
        """Serialized participants whose freeze predecessors are all frozen."""
        if self.handover.state is not H.FREEZING:
            return []
        return [
            n
            for n in self.handover.freeze_order
            if self.participants[n].state is P.SERIALIZED and not self._waiting_for(n)
        ]

    def _waiting_for(self, name: str) -> list[str]:
        return [
            m
            for m in self.participants[name].freeze_after
            if self.is_member(m) and self.participants[m].state is not P.FROZEN
        ]

    def counts(self) -> dict[str, int]:
        """Participants per state: those of the running handover, else all."""
        c = {str(s): 0 for s in ParticipantState}
        running = self.handover.state in RUNNING_STATES
        members = set(self.handover.expected)
        for p in self.participants.values():
            if not running or p.name in members:
                c[str(p.state)] += 1
        return c

    def waiting(self) -> list[str]:
        """Who the handover waits for now: to serialize, then to freeze."""
        if self.handover.state is H.PREPARING:
            return self.missing()
        if self.handover.state is H.FREEZING:
            return self.not_frozen()
        return []

    def _index_dependents(self) -> None:
        self._dependents = {}
        for n in self.handover.freeze_order:
            for d in self.participants[n].freeze_after:
                if self.is_member(d):
                    self._dependents.setdefault(d, []).append(n)
