"""The outgoing side (``kho_out``): one handover and its participants, pure.

``Outgoing`` applies requests to the lifecycle tables of ``khod.lifecycle``
and reports what changed as a ``Changes`` value (``khod.changes``); the
daemon persists those changes in one store transaction, then acknowledges
and publishes. The records are ``khod.records``; the indexes and the
read-only questions about who takes part are ``khod.members``. Every
method validates everything before it mutates anything, so a refused
request leaves the aggregate exactly as it was.

Time is always passed in (``now``): this module never reads a clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from khod.changes import Changes, Transition
from khod.lifecycle import (
    ABORTABLE,
    HandoverEvent,
    HandoverState,
    ParticipantEvent,
    ParticipantState,
    check_after,
    find_cycle,
    handover_next,
    order,
    participant_next,
)
from khod.members import Members
from khod.records import Handover, Participant
from khod_wire import identity
from khod_wire.errors import (
    Busy,
    NothingToHandOver,
    NotReady,
    OrderingError,
    RegistrationError,
    UnknownParticipant,
)

P = ParticipantState
H = HandoverState


class Outgoing(Members):
    """One host's handover and its registered participants: the requests that change them."""

    # -- requests from participants ------------------------------------------

    def register(
        self,
        name: str,
        compatible: str,
        instance: object,
        *,
        freeze_after: Iterable[str] = (),
        restore_after: Iterable[str] = (),
        now: float,
    ) -> Changes:
        new = Participant(
            name=identity.check_name(name),
            compatible=identity.check_compatible(compatible),
            instance=identity.check_instance(instance),
            freeze_after=tuple(sorted({identity.check_name(n) for n in freeze_after})),
            restore_after=tuple(sorted({identity.check_name(n) for n in restore_after})),
            updated_at=now,
        )
        for kind, deps in (("freeze", new.freeze_after), ("restore", new.restore_after)):
            check_after(name, deps, what=kind)
        old = self.participants.get(name)
        if old is not None and not old.same_identity(new):
            raise RegistrationError(
                f"duplicate name {name!r}: already registered as {old.compatible} "
                f"instance {old.instance!r}"
            )
        holder = self._identities.get((new.compatible, new.instance))
        if holder is not None and holder != name:
            raise RegistrationError(
                f"{new.compatible} instance {new.instance!r} is already registered as {holder!r}"
            )
        self._check_acyclic(new)
        hs = self.handover.state
        if old is not None and old.state is not P.FAILED:
            # Same identity, still known: a reconnect or a replay. Nothing changes.
            return Changes()
        if hs not in (H.IDLE, H.PREPARING):
            raise Busy(f"registration is closed: the handover is {hs}")
        joins = hs is H.PREPARING and (not self.handover.explicit or name in self.handover.expected)
        if joins and (new.freeze_after or new.restore_after):
            self._check_known_order(new, (*self.handover.expected, name))

        changes = Changes()
        if old is None:
            self.participants[name] = new
            self._identities[(new.compatible, new.instance)] = name
            if self.is_member(name):
                self._tally[new.state] += 1
            changes.participants.add(name)
            changes.transitions.append(Transition.step(name, "register", None, P.REGISTERED))
        else:
            self._participant(changes, old, ParticipantEvent.REGISTER, now)
        p = self.participants[name]
        if joins:
            if not self.is_member(name):
                # Not a handover change for the broadcast: the participant's own
                # state says it takes part, and monitors see it in the progress.
                self._join(name)
                changes.handover = True
            self._participant(changes, p, ParticipantEvent.BEGIN, now)
        return changes

    def submittable(self, name: str) -> Participant:
        """The participant, if it may submit a fragment now; else the error."""
        p = self._member(name, "submit a fragment")
        if self.handover.state not in (H.PREPARING, H.FREEZING):
            raise Busy(f"{name!r} cannot submit a fragment: the handover is {self.handover.state}")
        participant_next(p.state, ParticipantEvent.SUBMIT)
        return p

    def submit(self, name: str, size: int, sha256: str, *, now: float) -> Changes:
        p = self.submittable(name)
        changes = Changes()
        self._participant(changes, p, ParticipantEvent.SUBMIT, now)
        p.fragment_size, p.fragment_sha256 = size, sha256
        self._maybe_auto_freeze(changes, now)
        return changes

    def revise(self, name: str, *, now: float) -> Changes:
        p = self._member(name, "revise its fragment")
        if p.state is P.PREPARING:
            # No fragment to withdraw: nothing changes, so nothing is stored or republished.
            participant_next(p.state, ParticipantEvent.REVISE)
            return Changes()
        changes = Changes()
        self._participant(changes, p, ParticipantEvent.REVISE, now)
        p.fragment_size = p.fragment_sha256 = None
        changes.drop_fragments.add(name)
        return changes

    def frozen(self, name: str, *, now: float) -> Changes:
        p = self._member(name, "report frozen")
        if self.handover.state is not H.FREEZING:
            raise Busy(
                f"{name!r} cannot freeze: the handover is {self.handover.state}, not freezing"
            )
        waiting = self._waiting_for(name)
        if waiting:
            raise OrderingError(
                f"{name!r} must freeze after {', '.join(map(repr, waiting))}, not frozen yet"
            )
        changes = Changes()
        self._participant(changes, p, ParticipantEvent.FREEZE, now)
        # Those that freeze after it may now be free to go: their own state says so.
        changes.participants.update(self._dependents.get(name, ()))
        if self.not_frozen_count() == 0:
            self._handover(changes, HandoverEvent.ALL_FROZEN)
            changes.assemble = True
        return changes

    def fail(self, name: str, reason: str, *, now: float) -> Changes:
        p = self.participant(name)
        changes = Changes()
        self._participant(changes, p, ParticipantEvent.FAIL, now, detail=reason)
        p.error = reason
        if self.in_handover(name):
            changes.merge(self.abort(f"{name} failed: {reason}", now=now))
        return changes

    def gone(self, name: str, *, now: float) -> Changes:
        """The participant's connection died (its will message), or it left."""
        p = self.participant(name)
        if self.in_handover(name):
            changes = self.fail(name, "vanished (connection lost)", now=now)
        elif self.handover.state is H.COMMITTED:
            return Changes()  # after commit, components going away is expected
        else:
            changes = Changes()
        # It is gone: the next handover must not wait for it.
        if self.is_member(name):
            self._tally[p.state] -= 1
        del self.participants[name]
        self._identities.pop((p.compatible, p.instance), None)
        changes.removed.add(name)
        changes.participants.discard(name)
        changes.drop_fragments.add(name)
        changes.transitions.append(Transition.step(name, "gone", str(p.state), "removed"))
        return changes

    # -- requests from the operator ------------------------------------------

    def begin(
        self,
        handover_id: str,
        *,
        deadline: float,
        expect: Iterable[str] | None = None,
        auto_freeze: bool = True,
        now: float,
    ) -> Changes:
        handover_next(self.handover.state, HandoverEvent.BEGIN)  # validate first
        if expect is not None:
            expected = tuple(dict.fromkeys(identity.check_name(n) for n in expect))
            if not expected:
                raise NothingToHandOver("begin: --expect names no participant")
        else:
            expected = tuple(sorted(self.participants))
            if not expected:
                raise NothingToHandOver(
                    "begin: no participant is registered (nothing to hand over)"
                )
        for n in expected:
            p = self.participants.get(n)
            if p is not None:
                self._check_known_order(p, expected)
        changes = Changes()
        self.handover = Handover(
            id=handover_id,
            deadline=deadline,
            expected=expected,
            explicit=expect is not None,
            auto_freeze=auto_freeze,
            began_at=now,
            last_id=self.handover.id,
        )
        self._handover(changes, HandoverEvent.BEGIN, from_state=H.IDLE)
        for n in expected:
            p = self.participants.get(n)
            if p is not None:
                if p.state is P.FAILED:
                    self._participant(changes, p, ParticipantEvent.CANCEL, now)
                self._participant(changes, p, ParticipantEvent.BEGIN, now)
        return changes

    def freeze(self, *, force: bool = False, now: float) -> Changes:
        handover_next(self.handover.state, HandoverEvent.FREEZE)
        missing = self.missing()
        if missing and not force:
            raise NotReady(
                "cannot freeze: not serialized yet: " + ", ".join(missing) + " (use --force "
                "to leave them out)"
            )
        if len(missing) == len(self.handover.expected):
            raise NotReady("cannot freeze: no participant is serialized")
        changes = Changes()
        for n in missing:
            p = self.participants.get(n)
            if p is not None:
                self._participant(changes, p, ParticipantEvent.CANCEL, now, detail="left out")
                changes.drop_fragments.add(n)
        self.handover.left_out = tuple(missing)
        self.handover.expected = tuple(n for n in self.handover.expected if n not in missing)
        self._start_freeze(changes, now)
        return changes

    def abort(self, reason: str, *, now: float) -> Changes:
        """Abort the handover (or, once committed, withdraw its payload); everyone cancels."""
        committed = self.handover.state is H.COMMITTED
        if committed:
            reason = f"payload withdrawn: {reason}"
        changes = Changes()
        event = HandoverEvent.WITHDRAW if committed else HandoverEvent.ABORT
        self._handover(changes, event, detail=reason)
        self.handover.abort_reason = reason
        members = set(self.handover.expected)
        for p in self.participants.values():
            # A bystander that failed stays failed until it registers again.
            if p.state is P.FAILED and p.name not in members:
                continue
            if p.state is not P.REGISTERED or p.fragment_sha256 is not None:
                self._participant(changes, p, ParticipantEvent.CANCEL, now, detail="abort")
                p.fragment_size = p.fragment_sha256 = None
                changes.drop_fragments.add(p.name)
        self.handover.payload = None
        self.handover.freeze_order = ()
        self._dependents = {}
        return changes

    def check_deadline(self, *, now: float) -> Changes:
        h = self.handover
        if h.state in ABORTABLE and h.deadline is not None and now >= h.deadline:
            waiting = self.waiting()
            detail = f"; waiting for {', '.join(waiting)}" if waiting else ""
            return self.abort(f"deadline passed in {h.state}{detail}", now=now)
        return Changes()

    # -- steps the service takes ---------------------------------------------

    def payload_order(self) -> list[Participant]:
        return [self.participants[n] for n in self.handover.freeze_order]

    def assembled(self) -> Changes:
        changes = Changes()
        self._handover(changes, HandoverEvent.ASSEMBLE)
        return changes

    def committed(self, payload: Mapping[str, Any], *, now: float) -> Changes:
        changes = Changes()
        self._handover(changes, HandoverEvent.COMMIT)
        self.handover.committed_at = now
        self.handover.payload = dict(payload)
        return changes

    # -- internals -----------------------------------------------------------

    def participant(self, name: str) -> Participant:
        """The registered participant ``name``, or UnknownParticipant."""
        try:
            return self.participants[name]
        except KeyError:
            raise UnknownParticipant(f"unknown participant {name!r}: register first") from None

    def _member(self, name: str, what: str) -> Participant:
        p = self.participant(name)
        if not self.in_handover(name):
            raise Busy(
                f"{name!r} cannot {what}: it is not part of a running handover "
                f"(handover {self.handover.state})"
            )
        return p

    def _participant(
        self,
        changes: Changes,
        p: Participant,
        event: ParticipantEvent,
        now: float,
        detail: str = "",
    ) -> None:
        to = participant_next(p.state, event)
        changes.transitions.append(
            Transition.step(p.name, str(event), str(p.state), str(to), detail)
        )
        changes.participants.add(p.name)
        if self.is_member(p.name):
            self._tally[p.state] -= 1
            self._tally[to] += 1
        p.state, p.updated_at = to, now
        if to is P.REGISTERED:
            p.error = None

    def _handover(
        self,
        changes: Changes,
        event: HandoverEvent,
        *,
        from_state: HandoverState | None = None,
        detail: str = "",
    ) -> None:
        frm = from_state or self.handover.state
        to = handover_next(frm, event)
        changes.transitions.append(
            Transition.step("handover", str(event), str(frm), str(to), detail)
        )
        changes.handover = True
        self.handover.state = to

    def _maybe_auto_freeze(self, changes: Changes, now: float) -> None:
        h = self.handover
        if h.state is H.PREPARING and h.auto_freeze and self.missing_count() == 0:
            self._start_freeze(changes, now)

    def _start_freeze(self, changes: Changes, now: float) -> None:
        # Edges to participants left out by a forced freeze no longer bind.
        expected = set(self.handover.expected)
        members = {
            n: [d for d in self.participants[n].freeze_after if d in expected] for n in expected
        }
        self.handover.freeze_order = tuple(order(members, what="freeze"))
        self._index_dependents()
        for n in expected:
            if self.participants[n].freeze_after:
                # Its own state carries may_freeze: publish it with the signal.
                changes.participants.add(n)
        self._handover(changes, HandoverEvent.FREEZE)
        self.handover.freeze_at = now

    def _check_known_order(self, p: Participant, members: Iterable[str]) -> None:
        known = set(members)
        for kind, deps in (("freeze", p.freeze_after), ("restore", p.restore_after)):
            check_after(p.name, deps, known, what=kind)

    def _check_acyclic(self, new: Participant) -> None:
        for kind in ("freeze_after", "restore_after"):
            if not getattr(new, kind):
                # The graph without it is acyclic, and a cycle through it needs
                # an edge out of it: nothing to walk (keeps registering O(1)).
                continue
            graph = {n: getattr(q, kind) for n, q in self.participants.items()}
            graph[new.name] = getattr(new, kind)
            cycle = find_cycle(graph)
            if cycle:
                what = kind.removesuffix("_after")
                raise OrderingError(f"{what} order would have a cycle: {' -> '.join(cycle)}")
