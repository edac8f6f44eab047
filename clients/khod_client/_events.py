"""What the daemon says, and what it means for one participant. No I/O.

The daemon's signals cost O(1) per participant: the host's ``handover``
broadcast (a compact status without per-participant lists) and the
participant's own retained ``state``. The SDK turns the statuses it sees
into events for one participant; :class:`Tracker` holds the rules:

* **ordered** — every status carries ``(epoch, seq)``; one that is not newer
  than the last one seen on its topic is ignored (a persistent broker can
  replay an old retained message, and replies may be older than the topic);
* **began** — the broadcast shows a running handover, and the participant's
  own state names that handover (``handover_id``): it takes part in it;
* **may freeze** — that handover is ``freezing``, the participant is
  ``serialized``, and its own state does not say ``may_freeze: false``
  (only a participant that named ``freeze_after`` waits for ``true``);
  once per handover;
* **cancelled** — the handover shows ``idle``, or it is
  replaced by a different id, or the participant's own state no longer
  names it (left out by a forced freeze): once per handover. ``committed``
  ends it, except that an operator may withdraw a committed payload (the
  kexec did not happen): a newer ``idle`` for that handover then means thaw.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel

# Re-exported: _participant.py and older callers import it from here.
from khod_wire.errors import HandoverCancelled as HandoverCancelled
from khod_wire.errors import ProtocolError
from khod_wire.protocol import (
    BEGUN_STATES,
    ENDED_STATES,
    PAST_FREEZE_STATES,
    RUNNING_STATES,
    TAKING_PART_STATES,
    HandoverSignal,
    ParticipantStatus,
    newer,
)

#: Handover states in which a handover runs and its participants take part.
RUNNING = RUNNING_STATES
#: States in which a participant that takes part still serializes or freezes.
BEGUN = BEGUN_STATES
#: States that end a handover without a payload (an abort goes back to idle).
ENDED = ENDED_STATES
#: States in which every participant of the handover has already frozen.
PAST_FREEZE = PAST_FREEZE_STATES
#: A participant's own states while it takes part in a handover.
TAKING_PART = TAKING_PART_STATES

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class FragmentReceipt:
    """The daemon's acknowledgement of a fragment: it is durable, with this size and hash."""

    size: int
    sha256: str

    @classmethod
    def from_reply(
        cls, data: Mapping[str, Any], *, fragment: bytes | None = None
    ) -> FragmentReceipt:
        """The receipt in a ``fragment`` reply's data; ProtocolError if it is malformed.

        With ``fragment``, the receipt must describe exactly those bytes.
        """
        size, sha = data.get("size"), data.get("sha256")
        if (
            isinstance(size, bool)
            or not isinstance(size, int)
            or size <= 0
            or not isinstance(sha, str)
            or len(sha) != 64
            or any(c not in "0123456789abcdef" for c in sha)
        ):
            raise ProtocolError(
                f"malformed fragment receipt: size {size!r}, sha256 {sha!r} "
                "(expected a positive int and 64 lowercase hex digits)"
            )
        receipt = cls(size, sha)
        if fragment is not None:
            mine = cls(len(fragment), hashlib.sha256(fragment).hexdigest())
            if receipt != mine:
                raise ProtocolError(
                    f"the daemon acknowledged {receipt.size} bytes with sha256 "
                    f"{receipt.sha256}, but {mine.size} bytes with sha256 {mine.sha256} were sent"
                )
        return receipt


# -- parsing -----------------------------------------------------------------


# -- events ------------------------------------------------------------------


@dataclass(frozen=True)
class Began:
    """The participant takes part in the handover ``status.id``."""

    status: HandoverSignal


@dataclass(frozen=True)
class MayFreeze:
    """The participant may freeze now (it has not reported frozen yet)."""

    status: HandoverSignal


@dataclass(frozen=True)
class Cancelled:
    """The handover the participant took part in is cancelled (or its payload withdrawn)."""

    handover_id: str
    reason: str


Event = Began | MayFreeze | Cancelled


@dataclass
class Tracker:
    """One participant's view of the host's handover, fed with every status seen."""

    name: str
    latest: HandoverSignal | None = None
    me: ParticipantStatus | None = None
    #: id of the last handover the participant took part in (or None)
    current: str | None = None
    cancelled: dict[str, str] = field(default_factory=dict)
    freeze_signalled: set[str] = field(default_factory=set)
    committed: set[str] = field(default_factory=set)
    _seen: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        """Whether the participant takes part in a handover that is not over."""
        c = self.current
        return c is not None and c not in self.cancelled and c not in self.committed

    def observe(self, status: HandoverSignal) -> list[Event]:
        """Take a handover broadcast into account; the events it causes, in order."""
        if not newer(status, self._seen.get("handover")):
            return []
        self._seen["handover"] = (status.epoch, status.seq)
        self.latest = status
        return self._evaluate()

    def observe_state(self, status: ParticipantStatus) -> list[Event]:
        """Take the participant's own state into account; the events it causes."""
        if status.name != self.name or not newer(status, self._seen.get("state")):
            return []
        self._seen["state"] = (status.epoch, status.seq)
        self.me = status
        return self._evaluate()

    def _evaluate(self) -> list[Event]:
        s, me = self.latest, self.me
        if s is None or s.side != "outgoing":
            return []
        events: list[Event] = []
        sid = s.id
        takes_part = (
            sid is not None
            and me is not None
            and me.handover_id == sid
            and me.state in TAKING_PART
            and s.state in RUNNING
        )
        cur = self.current
        if cur is not None and cur in self.committed and sid == cur and s.state in ENDED:
            # Committed, then withdrawn by the operator: the kexec will not happen.
            self.committed.discard(cur)
            events.append(self._cancel(cur, s.abort_reason or f"payload {cur} withdrawn"))
        elif self.live:
            assert cur is not None
            if sid != cur:
                gone = f"handover {cur} was replaced by handover {sid}" if sid else None
                events.append(self._cancel(cur, gone or f"handover {cur} is gone"))
            elif s.state in ENDED:
                events.append(self._cancel(cur, s.abort_reason or f"handover {cur} aborted"))
            elif s.state == "committed":
                self.committed.add(cur)
            elif me is not None and me.handover_id != cur:
                events.append(self._cancel(cur, f"left out of handover {cur} by a forced freeze"))
        if takes_part and sid != self.current and sid not in self.cancelled:
            assert sid is not None
            self.current = sid
            events.append(Began(s))
        if (
            takes_part
            and sid == self.current
            and self.live
            and s.state == "freezing"
            and me is not None
            and me.state == "serialized"
            and me.may_freeze is not False
            and sid not in self.freeze_signalled
        ):
            assert sid is not None
            self.freeze_signalled.add(sid)
            events.append(MayFreeze(s))
        return events

    def _cancel(self, handover_id: str, reason: str) -> Cancelled:
        self.cancelled[handover_id] = reason
        return Cancelled(handover_id, reason)

    # -- questions the waiting calls ask -------------------------------------

    def begun(self) -> HandoverSignal | None:
        """The running handover that includes the participant, if it is preparing or freezing."""
        s = self.latest
        if (
            s is not None
            and s.side == "outgoing"
            and s.state in BEGUN
            and s.id is not None
            and s.id == self.current
            and self.live
        ):
            return s
        return None

    def freeze_reached(self, handover_id: str) -> bool:
        """Whether the participant may freeze (or has frozen) in ``handover_id``."""
        if handover_id in self.freeze_signalled or handover_id in self.committed:
            return True
        s = self.latest
        return s is not None and s.id == handover_id and s.state in PAST_FREEZE
