"""What a request changed: the pure core's answer, the persister's input.

``Outgoing`` and ``Incoming`` return a ``Changes`` from every request; the
daemon stamps, writes and announces what it names (``khod.persist``). Its
``Transition`` entries are the history the store keeps: the same type on
both sides, numbered and dated by the store when it records them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Transition:
    """One entry of the history: ``subject`` went ``from_state`` -> ``to_state`` on ``event``.

    The core makes them unrecorded (``step``: ``seq`` 0, ``at`` 0.0); the
    store gives each its number and time when it records it.
    """

    seq: int
    at: float
    subject: str  # "handover", "restore" or the participant's name
    event: str
    from_state: str | None
    to_state: str
    detail: str = ""

    @classmethod
    def step(
        cls, subject: str, event: str, from_state: str | None, to_state: str, detail: str = ""
    ) -> Transition:
        """A transition just made, not recorded yet."""
        return cls(0, 0.0, subject, event, from_state, to_state, detail)


@dataclass
class Changes:
    """What one request changed, for the daemon to persist and publish."""

    handover: bool = False
    participants: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    transitions: list[Transition] = field(default_factory=list)
    drop_fragments: set[str] = field(default_factory=set)
    # Set when every participant is frozen: the daemon assembles the payload.
    assemble: bool = False

    def __bool__(self) -> bool:
        return bool(self.handover or self.participants or self.removed or self.transitions)

    def merge(self, other: Changes) -> Changes:
        """This and then ``other``, as one change (in place)."""
        self.handover |= other.handover
        self.participants |= other.participants
        self.removed |= other.removed
        self.transitions += other.transitions
        self.drop_fragments |= other.drop_fragments
        self.assemble |= other.assemble
        return self
