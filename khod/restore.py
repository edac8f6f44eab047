"""The incoming side (``kho_in``): after the kexec, hand each fragment back.

Pure, like ``khod.handover``: requests go through the restore tables of
``khod.lifecycle`` and come back as ``Changes``. The payload is released
when every participant has finished, or when the deadline passes; in that
case the fragments nobody finished are reported as unclaimed, never dropped
silently.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from khod.changes import Changes, Transition
from khod.lifecycle import (
    HostRestoreEvent,
    HostRestoreState,
    RestoreEvent,
    RestoreState,
    host_restore_next,
    order,
    restore_next,
)
from khod_wire.errors import Busy, OrderingError, UnknownParticipant
from khod_wire.identity import Instance

R = RestoreState


@dataclass
class Claim:
    """One fragment of the incoming payload and who has claimed it."""

    name: str
    compatible: str
    instance: Instance
    size: int
    sha256: str
    restore_after: tuple[str, ...] = ()
    state: RestoreState = R.AVAILABLE
    updated_at: float = 0.0
    seq: int = 0  # the status sequence number it was last published with

    def to_record(self) -> dict[str, Any]:
        r = dict(self.__dict__)
        r["state"] = str(self.state)
        r["restore_after"] = list(self.restore_after)
        return r

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> Claim:
        c = cls(**{k: v for k, v in r.items() if k in cls.__dataclass_fields__})
        c.state = RestoreState(c.state)
        c.restore_after = tuple(c.restore_after)
        return c


@dataclass
class Incoming:
    handover_id: str
    claims: dict[str, Claim]
    deadline: float
    state: HostRestoreState = HostRestoreState.RESTORING
    started_at: float = 0.0
    released_at: float | None = None
    unclaimed: tuple[str, ...] = ()
    restore_order: tuple[str, ...] = field(default=())
    seq: int = 0  # the status sequence number it was last published with
    #: how many claims are finished, and who restores after whom: O(1) requests
    _finished: int = field(default=-1, repr=False, compare=False)
    _dependents: dict[str, list[str]] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def start(
        cls, handover_id: str, claims: Iterable[Claim], *, deadline: float, now: float
    ) -> Incoming:
        by_name = {c.name: c for c in claims}
        # Edges to participants absent from the payload cannot bind: they were
        # left out of the handover, so nobody will ever finish them.
        graph = {n: [d for d in c.restore_after if d in by_name] for n, c in by_name.items()}
        for c in by_name.values():
            c.updated_at = c.updated_at or now
        inc = cls(handover_id, by_name, deadline, started_at=now)
        inc.restore_order = tuple(order(graph, what="restore"))
        return inc

    # -- queries -------------------------------------------------------------

    def waiting_for(self, name: str) -> list[str]:
        return [
            d
            for d in self.claims[name].restore_after
            if d in self.claims and self.claims[d].state is not R.FINISHED
        ]

    def may_retrieve_now(self) -> list[str]:
        if self.state is not HostRestoreState.RESTORING:
            return []
        return [
            n
            for n in self.restore_order
            if self.claims[n].state is R.AVAILABLE and not self.waiting_for(n)
        ]

    def may_retrieve(self, name: str) -> bool | None:
        """Whether one that named ``restore_after`` may retrieve now; None if it named none."""
        c = self.claims[name]
        if not c.restore_after:
            return None
        return (
            self.state is HostRestoreState.RESTORING
            and c.state is R.AVAILABLE
            and not self.waiting_for(name)
        )

    def finished_count(self) -> int:
        if self._finished < 0:
            self._finished = sum(c.state is R.FINISHED for c in self.claims.values())
        return self._finished

    def dependents(self, name: str) -> list[str]:
        if self._dependents is None:
            self._dependents = {}
            for n, c in self.claims.items():
                for d in c.restore_after:
                    if d in self.claims:
                        self._dependents.setdefault(d, []).append(n)
        return self._dependents.get(name, [])

    def not_finished(self) -> list[str]:
        return [n for n in self.restore_order if self.claims[n].state is not R.FINISHED]

    def counts(self) -> dict[str, int]:
        c = {str(s): 0 for s in RestoreState}
        for claim in self.claims.values():
            c[str(claim.state)] += 1
        return c

    # -- requests ------------------------------------------------------------

    def retrieve(self, name: str, *, now: float) -> Changes:
        claim = self.claim(name)
        self.check_open(name, "retrieve its fragment")
        waiting = self.waiting_for(name)
        if waiting:
            raise OrderingError(
                f"{name!r} must restore after {', '.join(map(repr, waiting))}, not finished yet"
            )
        changes = Changes()
        self._step(changes, claim, RestoreEvent.RETRIEVE, now)
        return changes

    def finish(self, name: str, *, now: float) -> Changes:
        claim = self.claim(name)
        self.check_open(name, "finish")
        changes = Changes()
        finished = self.finished_count()
        self._step(changes, claim, RestoreEvent.FINISH, now)
        self._finished = finished + 1
        # Those that restore after it may now retrieve: their own state says so.
        changes.participants.update(self.dependents(name))
        if self._finished == len(self.claims):
            self._release(changes, now, "every participant finished")
        return changes

    def check_deadline(self, *, now: float) -> Changes:
        changes = Changes()
        if self.state is HostRestoreState.RESTORING and now >= self.deadline:
            self.unclaimed = tuple(self.not_finished())
            self._release(
                changes, now, "deadline passed; unclaimed: " + (", ".join(self.unclaimed) or "none")
            )
        return changes

    # -- persistence ---------------------------------------------------------

    def to_record(self) -> dict[str, Any]:
        return {
            "handover_id": self.handover_id,
            "claims": [c.to_record() for c in self.claims.values()],
            "deadline": self.deadline,
            "state": str(self.state),
            "started_at": self.started_at,
            "released_at": self.released_at,
            "unclaimed": list(self.unclaimed),
            "restore_order": list(self.restore_order),
            "seq": self.seq,
        }

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> Incoming:
        claims = {c["name"]: Claim.from_record(c) for c in r["claims"]}
        return cls(
            handover_id=r["handover_id"],
            claims=claims,
            deadline=float(r["deadline"]),
            state=HostRestoreState(r["state"]),
            started_at=float(r["started_at"]),
            released_at=r["released_at"],
            unclaimed=tuple(r["unclaimed"]),
            restore_order=tuple(r["restore_order"]),
            seq=int(r.get("seq", 0)),
        )

    # -- internals -----------------------------------------------------------

    def claim(self, name: str) -> Claim:
        """The fragment ``name`` claims, or UnknownParticipant."""
        try:
            return self.claims[name]
        except KeyError:
            raise UnknownParticipant(
                f"no fragment for {name!r} in the incoming payload {self.handover_id}"
            ) from None

    def check_open(self, name: str, what: str) -> None:
        if self.state is HostRestoreState.RELEASED:
            raise Busy(f"{name!r} cannot {what}: the incoming payload was released")

    def _step(self, changes: Changes, claim: Claim, event: RestoreEvent, now: float) -> None:
        to = restore_next(claim.state, event)
        changes.transitions.append(
            Transition.step(claim.name, str(event), str(claim.state), str(to))
        )
        changes.participants.add(claim.name)
        claim.state, claim.updated_at = to, now

    def _release(self, changes: Changes, now: float, detail: str) -> None:
        to = host_restore_next(self.state, HostRestoreEvent.RELEASE)
        changes.transitions.append(
            Transition.step("restore", "release", str(self.state), str(to), detail)
        )
        changes.handover = True
        self.state, self.released_at = to, now
