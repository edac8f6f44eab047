"""The host's live state, which every part of the daemon reads: one place.

``Host`` owns the two aggregates (``Outgoing`` always, ``Incoming`` after a
kexec), the incoming payload image, the fragments of the running handover,
the status sequence numbers, and the statuses all of that shows. It does no
I/O beyond reading the store once, when the daemon starts.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from khod import __version__
from khod.handover import Outgoing
from khod.payload import PayloadImage
from khod.records import Handover, Participant
from khod.restore import Incoming
from khod.status import (
    claim_status,
    incoming_signal,
    incoming_status,
    outgoing_signal,
    outgoing_status,
    participant_status,
)
from khod.store import Store
from khod_wire.protocol import (
    DaemonStatus,
    HandoverSignal,
    HandoverState,
    HandoverStatus,
    ParticipantStatus,
)

#: A restarted daemon's sequence numbers start this far above the last one
#: persisted: statuses it published but had not persisted (the assembled
#: state, say) stay older than anything it publishes next.
SEQ_RESTART_GAP = 1 << 20


class Host:
    def __init__(self, store: Store, clock: Callable[[], float]) -> None:
        self.now = clock
        self.out = Outgoing(
            Handover.from_record(h) if (h := store.load_handover()) else None,
            (Participant.from_record(r) for r in store.load_participants().values()),
        )
        self.inc: Incoming | None = None
        self.image: PayloadImage | None = None
        self.image_path: Path | None = None
        self.started_at = clock()
        # Sequence numbers: persisted with every record they stamp; see SEQ_RESTART_GAP.
        self.epoch_id = store.get_meta("epoch") or uuid.uuid4().hex[:12]
        self.seq = int(store.get_meta("seq") or 0) + SEQ_RESTART_GAP
        with store.transaction():
            store.set_meta("epoch", self.epoch_id)
            store.set_meta("seq", str(self.seq))
        # The fragments of the running handover, validated and hashed on
        # arrival, so that assembly never reads or hashes them again.
        self.fragments: dict[str, bytes] = {}
        for p in self.out.participants.values():
            if p.fragment_sha256 is not None and (blob := store.get_fragment(p.name)):
                self.fragments[p.name] = blob
        #: whether the detailed status changed since it was last published
        self.progress_dirty = True

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def committed(self) -> bool:
        """Whether this boot's payload is committed (and not a restore under way)."""
        return self.out.handover.state is HandoverState.COMMITTED and self.inc is None

    def incoming_record(self) -> dict[str, Any]:
        assert self.inc is not None
        return {
            "handover_id": self.inc.handover_id,
            "image": str(self.image_path),
            "incoming": self.inc.to_record(),
        }

    # -- what is shown -------------------------------------------------------

    def daemon_status(self, state: Literal["online", "offline"]) -> DaemonStatus:
        return DaemonStatus(
            version=__version__,
            state=state,
            side="incoming" if self.inc is not None else "outgoing",
            pid=os.getpid(),
            since=self.started_at,
        )

    def handover_signal(self) -> HandoverSignal:
        if self.inc is not None:
            return incoming_signal(self.inc, epoch=self.epoch_id, now=self.now())
        return outgoing_signal(self.out, epoch=self.epoch_id, now=self.now())

    def handover_status(self) -> HandoverStatus:
        if self.inc is not None:
            return incoming_status(self.inc, epoch=self.epoch_id, now=self.now())
        return outgoing_status(self.out, epoch=self.epoch_id, now=self.now())

    def participant_status(self, name: str) -> ParticipantStatus | None:
        if self.inc is not None and name in self.inc.claims:
            return claim_status(
                self.inc, name, self.out.participants.get(name), epoch=self.epoch_id
            )
        if name not in self.out.participants:
            return None
        return participant_status(self.out, name, epoch=self.epoch_id)

    def participant_dump(self, name: str) -> dict[str, Any] | None:
        status = self.participant_status(name)
        return None if status is None else status.model_dump()

    def signal_dump(self) -> dict[str, Any]:
        # O(1): replies carry the compact signal, never the detailed status.
        return self.handover_signal().model_dump()
