"""What the daemon says, and what it means for one participant. No I/O.

The daemon broadcasts freeze and cancel through one retained topic, the
host's ``handover`` status; the SDK turns the sequence of statuses it sees
into events for one participant. :class:`Tracker` holds the rules:

* **began** — a running handover (``preparing``/``freezing``/...) lists the
  participant in ``expected``, and it is not the handover already tracked:
  the participant now takes part in that handover (its id is remembered);
* **may freeze** — that handover is ``freezing`` and lists the participant in
  ``may_freeze``: once per handover;
* **cancelled** — the tracked handover shows ``aborting`` or ``idle`` (its
  ``abort_reason`` is the reason), or it is replaced by a different id, or
  it keeps running without the participant (left out by a forced freeze):
  once per handover. ``committed`` ends it for good: nothing after that is a
  cancel.

Statuses copied from replies (the ``handover`` of a register or fragment
reply) may be older than the retained one already seen; they are ignored
when their ``updated_at`` is older. Retained messages arrive in order and
are always applied.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel

from khod.errors import KhodError, ProtocolError
from khod.protocol import RUNNING_STATES, HandoverStatus

#: Handover states in which a handover runs and its participants take part.
RUNNING = RUNNING_STATES
#: States in which a participant that takes part still serializes or freezes.
BEGUN = frozenset({"preparing", "freezing"})
#: States that end a handover without a payload (abort resets to idle at once).
ENDED = frozenset({"aborting", "idle"})
#: States in which every participant of the handover has already frozen.
PAST_FREEZE = frozenset({"frozen", "assembled", "committed"})

M = TypeVar("M", bound=BaseModel)


class HandoverCancelled(KhodError):
    """The handover this participant takes part in was cancelled; it must resume running."""

    code = "cancelled"

    def __init__(self, reason: str, handover_id: str | None = None) -> None:
        self.reason = reason
        self.handover_id = handover_id
        super().__init__(f"handover {handover_id} cancelled: {reason}")


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

    status: HandoverStatus


@dataclass(frozen=True)
class MayFreeze:
    """The participant may freeze now (it has not reported frozen yet)."""

    status: HandoverStatus


@dataclass(frozen=True)
class Cancelled:
    """The handover the participant took part in is cancelled."""

    handover_id: str
    reason: str


Event = Began | MayFreeze | Cancelled


@dataclass
class Tracker:
    """One participant's view of the host's handover, fed with every status seen."""

    name: str
    latest: HandoverStatus | None = None
    #: id of the last handover the participant took part in (or None)
    current: str | None = None
    cancelled: dict[str, str] = field(default_factory=dict)
    freeze_signalled: set[str] = field(default_factory=set)
    committed: set[str] = field(default_factory=set)

    @property
    def live(self) -> bool:
        """Whether the participant takes part in a handover that is not over."""
        c = self.current
        return c is not None and c not in self.cancelled and c not in self.committed

    def observe(self, status: HandoverStatus, *, from_reply: bool = False) -> list[Event]:
        """Take ``status`` into account; the events it causes, in order."""
        if from_reply and self.latest is not None and status.updated_at < self.latest.updated_at:
            return []
        self.latest = status
        if status.side != "outgoing":
            return []
        events: list[Event] = []
        sid = status.id
        includes_me = status.state in RUNNING and sid is not None and self.name in status.expected
        if self.live:
            assert self.current is not None
            cur = self.current
            if sid != cur:
                reason = (
                    f"handover {cur} was replaced by handover {sid}"
                    if sid
                    else f"handover {cur} is gone"
                )
                events.append(self._cancel(cur, reason))
            elif status.state in ENDED:
                events.append(self._cancel(cur, status.abort_reason or f"handover {cur} aborted"))
            elif status.state == "committed":
                self.committed.add(cur)
            elif not includes_me:
                how = " by a forced freeze" if self.name in status.left_out else ""
                events.append(self._cancel(cur, f"left out of handover {cur}{how}"))
        if includes_me and sid != self.current and sid not in self.cancelled:
            assert sid is not None
            self.current = sid
            events.append(Began(status))
        if (
            includes_me
            and sid == self.current
            and self.live
            and status.state == "freezing"
            and self.name in status.may_freeze
            and sid not in self.freeze_signalled
        ):
            assert sid is not None
            self.freeze_signalled.add(sid)
            events.append(MayFreeze(status))
        return events

    def _cancel(self, handover_id: str, reason: str) -> Cancelled:
        self.cancelled[handover_id] = reason
        return Cancelled(handover_id, reason)

    # -- questions the waiting calls ask -------------------------------------

    def begun(self) -> HandoverStatus | None:
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
