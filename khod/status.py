"""What the daemon shows on its retained topics, derived from its aggregates.

Pure functions: the aggregates in, the wire models of ``khod.protocol`` out.
"""

from __future__ import annotations

from khod.handover import Outgoing, Participant
from khod.protocol import HandoverStatus, ParticipantStatus, Registration
from khod.restore import Claim, Incoming


def outgoing_status(out: Outgoing, *, now: float) -> HandoverStatus:
    h = out.handover
    return HandoverStatus(
        side="outgoing",
        id=h.id,
        state=str(h.state),
        deadline=h.deadline,
        expected=list(h.expected),
        counts=out.counts(),
        missing=out.waiting(),
        may_freeze=out.may_freeze_now(),
        left_out=list(h.left_out),
        abort_reason=h.abort_reason,
        began_at=h.began_at,
        freeze_at=h.freeze_at,
        committed_at=h.committed_at,
        payload=h.payload,
        updated_at=now,
    )


def participant_status(p: Participant, handover_id: str | None) -> ParticipantStatus:
    """``handover_id``: the handover it takes part in, None when it takes part in none."""
    return ParticipantStatus(
        name=p.name,
        state=str(p.state),
        compatible=p.compatible,
        instance=p.instance,
        handover_id=handover_id,
        freeze_after=list(p.freeze_after),
        restore_after=list(p.restore_after),
        fragment_size=p.fragment_size,
        fragment_sha256=p.fragment_sha256,
        error=p.error,
        updated_at=p.updated_at,
    )


def incoming_status(inc: Incoming, *, now: float) -> HandoverStatus:
    return HandoverStatus(
        side="incoming",
        id=inc.handover_id,
        state=str(inc.state),
        deadline=inc.deadline,
        expected=list(inc.restore_order),
        counts=inc.counts(),
        missing=inc.not_finished(),
        may_retrieve=inc.may_retrieve_now(),
        unclaimed=list(inc.unclaimed),
        began_at=inc.started_at,
        released_at=inc.released_at,
        updated_at=now,
    )


def claim_status(c: Claim, handover_id: str, registered: Participant | None) -> ParticipantStatus:
    """A restore claim, and the registration made since for the next handover."""
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
        name=c.name,
        state=str(c.state),
        compatible=c.compatible,
        instance=c.instance,
        handover_id=handover_id,
        restore_after=list(c.restore_after),
        fragment_size=c.size,
        fragment_sha256=c.sha256,
        updated_at=c.updated_at,
        registration=registration,
    )
