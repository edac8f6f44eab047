"""The outgoing side's records: a participant and the handover, as stored.

Plain data, with the one way each is written to and read from the store
(``to_record``/``from_record``). What may happen to them is the business
of ``khod.handover``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from khod_wire import identity
from khod_wire.protocol import HandoverState, ParticipantState

P = ParticipantState
H = HandoverState


@dataclass
class Participant:
    name: str
    compatible: str
    instance: identity.Instance
    freeze_after: tuple[str, ...] = ()
    restore_after: tuple[str, ...] = ()
    state: ParticipantState = P.REGISTERED
    fragment_size: int | None = None
    fragment_sha256: str | None = None
    error: str | None = None
    updated_at: float = 0.0
    #: the status sequence number it was last published with (the daemon stamps it)
    seq: int = 0

    def same_identity(self, other: Participant) -> bool:
        return (self.compatible, self.instance, self.freeze_after, self.restore_after) == (
            other.compatible,
            other.instance,
            other.freeze_after,
            other.restore_after,
        )

    def to_record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "compatible": self.compatible,
            "instance": self.instance,
            "freeze_after": list(self.freeze_after),
            "restore_after": list(self.restore_after),
            "state": str(self.state),
            "fragment_size": self.fragment_size,
            "fragment_sha256": self.fragment_sha256,
            "error": self.error,
            "updated_at": self.updated_at,
            "seq": self.seq,
        }

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> Participant:
        return cls(
            name=r["name"],
            compatible=r["compatible"],
            instance=r["instance"],
            freeze_after=tuple(r.get("freeze_after", ())),
            restore_after=tuple(r.get("restore_after", ())),
            state=ParticipantState(r["state"]),
            fragment_size=r.get("fragment_size"),
            fragment_sha256=r.get("fragment_sha256"),
            error=r.get("error"),
            updated_at=float(r.get("updated_at", 0.0)),
            seq=int(r.get("seq", 0)),
        )


@dataclass
class Handover:
    id: str | None = None
    state: HandoverState = H.IDLE
    deadline: float | None = None
    expected: tuple[str, ...] = ()
    explicit: bool = False  # the operator named who to expect
    auto_freeze: bool = True
    began_at: float | None = None
    freeze_at: float | None = None
    committed_at: float | None = None
    left_out: tuple[str, ...] = ()
    freeze_order: tuple[str, ...] = ()
    abort_reason: str | None = None
    last_id: str | None = None  # the id of the previous (aborted) handover
    payload: dict[str, Any] | None = None
    seq: int = 0  # the status sequence number it was last published with

    def to_record(self) -> dict[str, Any]:
        r = dict(self.__dict__)
        r["state"] = str(self.state)
        r["expected"] = list(self.expected)
        r["left_out"] = list(self.left_out)
        r["freeze_order"] = list(self.freeze_order)
        return r

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> Handover:
        h = cls(**{k: v for k, v in r.items() if k in cls.__dataclass_fields__})
        h.state = HandoverState(h.state)
        h.expected = tuple(h.expected)
        h.left_out = tuple(h.left_out)
        h.freeze_order = tuple(h.freeze_order)
        return h
