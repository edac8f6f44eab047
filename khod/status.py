"""What the daemon shows on its retained topics, derived from its aggregates.

Pure functions: the aggregates in, the wire models of ``khod_wire.protocol`` out.
``*_signal`` are the O(1) broadcasts participants act on; ``*_status`` the
detailed views for monitors and operators.
"""

from __future__ import annotations

from typing import Any

from khod.handover import Outgoing
from khod.records import Participant
from khod.restore import Incoming
from khod_wire.protocol import HandoverSignal, HandoverStatus, ParticipantStatus, Registration


def _outgoing(out: Outgoing, *, epoch: str, now: float) -> dict[str, Any]:
    """What the signal and the detailed status say alike, outgoing."""
    h = out.handover
    return {
        "seq": h.seq,
        "epoch": epoch,
        "side": "outgoing",
        "id": h.id,
        "state": str(h.state),
        "deadline": h.deadline,
        "abort_reason": h.abort_reason,
        "began_at": h.began_at,
        "freeze_at": h.freeze_at,
        "committed_at": h.committed_at,
        "payload": h.payload,
        "updated_at": now,
    }


def _incoming(inc: Incoming, *, epoch: str, now: float) -> dict[str, Any]:
    """What the signal and the detailed status say alike, incoming."""
    return {
        "seq": inc.seq,
        "epoch": epoch,
        "side": "incoming",
        "id": inc.handover_id,
        "state": str(inc.state),
        "deadline": inc.deadline,
        "began_at": inc.started_at,
        "released_at": inc.released_at,
        "updated_at": now,
    }


def outgoing_signal(out: Outgoing, *, epoch: str, now: float) -> HandoverSignal:
    return HandoverSignal.model_validate(_outgoing(out, epoch=epoch, now=now))


def incoming_signal(inc: Incoming, *, epoch: str, now: float) -> HandoverSignal:
    return HandoverSignal.model_validate(_incoming(inc, epoch=epoch, now=now))


def outgoing_status(out: Outgoing, *, epoch: str, now: float) -> HandoverStatus:
    h = out.handover
    return HandoverStatus.model_validate(
        {
            **_outgoing(out, epoch=epoch, now=now),
            "expected": list(h.expected),
            "counts": out.counts(),
            "missing": out.waiting(),
            "may_freeze": out.may_freeze_now(),
            "left_out": list(h.left_out),
        }
    )


def incoming_status(inc: Incoming, *, epoch: str, now: float) -> HandoverStatus:
    return HandoverStatus.model_validate(
        {
            **_incoming(inc, epoch=epoch, now=now),
            "expected": list(inc.restore_order),
            "counts": inc.counts(),
            "missing": inc.not_finished(),
            "may_retrieve": inc.may_retrieve_now(),
            "unclaimed": list(inc.unclaimed),
        }
    )


def participant_status(out: Outgoing, name: str, *, epoch: str) -> ParticipantStatus:
    p = out.participants[name]
    h = out.handover
    return ParticipantStatus(
        seq=p.seq,
        epoch=epoch,
        name=p.name,
        state=str(p.state),
        compatible=p.compatible,
        instance=p.instance,
        # The handover it takes part in; None when it takes part in none.
        handover_id=h.id if out.is_member(name) else None,
        freeze_after=list(p.freeze_after),
        restore_after=list(p.restore_after),
        fragment_size=p.fragment_size,
        fragment_sha256=p.fragment_sha256,
        error=p.error,
        may_freeze=out.may_freeze(name),
        updated_at=p.updated_at,
    )


def claim_status(
    inc: Incoming, name: str, registered: Participant | None, *, epoch: str
) -> ParticipantStatus:
    """A restore claim, and the registration made since for the next handover."""
    c = inc.claims[name]
    registration = None
    if registered is not None:
        registration = Registration(
            state=str(registered.state),
            compatible=registered.compatible,
            instance=registered.instance,
            freeze_after=list(registered.freeze_after),
            restore_after=list(registered.restore_after),
            error=registered.error,
            updated_at=registered.updated_at,
        )
    return ParticipantStatus(
        seq=c.seq,
        epoch=epoch,
        name=c.name,
        state=str(c.state),
        compatible=c.compatible,
        instance=c.instance,
        handover_id=inc.handover_id,
        restore_after=list(c.restore_after),
        fragment_size=c.size,
        fragment_sha256=c.sha256,
        may_retrieve=inc.may_retrieve(name),
        updated_at=c.updated_at,
        registration=registration,
    )
