"""What ``khod monitor`` (and ``khod demo``) show, from the retained topics alone.

``MonitorState`` ingests ``(topic, payload)`` pairs of one host's retained
topics and derives what an operator watches during a blackout: participants
per state, who is outstanding, the blackout so far, whether it is done. The
render functions turn that into rich renderables. No I/O: the caller owns
the connection and the terminal (live view, snapshot, log lines, tests).

Parsing is lenient: a message that is not JSON of the expected shape is
ignored (a monitor must not die of one bad message), and unknown fields are
dropped, so an older monitor keeps working against a newer daemon.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from pydantic import BaseModel
from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from khod_wire.errors import ProtocolError
from khod_wire.protocol import (
    BLACKOUT_STATES,
    RUNNING_STATES,
    DaemonStatus,
    HandoverSignal,
    HandoverStatus,
    HostRestoreState,
    ParticipantState,
    ParticipantStatus,
    RestoreState,
    Topics,
    load_status,
    parse_status,
)

M = TypeVar("M", bound=BaseModel)

#: Participant states in lifecycle order, per side of the kexec.
OUTGOING_STATES = tuple(ParticipantState)
INCOMING_STATES = tuple(RestoreState)
#: States only worth a bar when someone is in them (noise otherwise).
QUIET_STATES = frozenset({"registered", "failed"})
#: Handover states in which a handover is under way (seen once: an idle with
#: an abort reason afterwards means it was aborted, not that it never ran).
RUNNING = RUNNING_STATES | {HostRestoreState.RESTORING}
#: Handover states during which the blackout clock runs.
BLACKOUT = BLACKOUT_STATES
STATE_STYLE = {
    **dict.fromkeys(("serialized", "finished", "online"), "green"),
    **dict.fromkeys(("frozen", "retrieved"), "cyan"),
    **dict.fromkeys(("committed", "released"), "bold green"),
    **dict.fromkeys(("failed", "offline"), "bold red"),
    "preparing": "yellow",
}


def parse(model: type[M], payload: bytes) -> M | None:
    """``payload`` as ``model``, or None if it is empty or not of that shape."""
    try:
        return parse_status(model, payload)
    except ProtocolError:
        return None


def parse_obj(model: type[M], data: object) -> M | None:
    """Decoded JSON as ``model``, or None."""
    try:
        return load_status(model, data)
    except ProtocolError:
        return None


class MonitorState:
    """One host as its retained topics describe it."""

    def __init__(self, host_id: str, *, clock: Callable[[], float] = time.time) -> None:
        self.host_id = host_id
        self.topics = Topics(host_id)
        self.clock = clock
        self.daemon: DaemonStatus | None = None
        self.handover: HandoverStatus | None = None
        self.participants: dict[str, ParticipantStatus] = {}
        #: set by the caller: None before the first connection, then up/down
        self.connected: bool | None = None
        self._running_ids: set[str | None] = set()
        self._prefix = self.topics.prefix + "/p/"

    # -- input ---------------------------------------------------------------

    def ingest(self, topic: str, payload: bytes) -> None:
        # An empty retained message clears a topic; a bad one changes nothing.
        if topic == self.topics.daemon:
            d = parse(DaemonStatus, payload) if payload else None
            if d is not None or not payload:
                self.daemon = d
        elif topic == self.topics.progress:
            h = parse(HandoverStatus, payload) if payload else None
            cur = self.handover
            if h is not None and (cur is None or h.epoch != cur.epoch or h.seq >= cur.seq):
                self._take(h)
        elif topic == self.topics.handover:
            # The O(1) broadcast comes first; the details follow on progress.
            sig = parse(HandoverSignal, payload) if payload else None
            cur = self.handover
            if sig is not None and (cur is None or sig.epoch != cur.epoch or sig.seq > cur.seq):
                same = cur is not None and cur.id == sig.id and cur.side == sig.side
                base = cur.model_dump() if same and cur is not None else {}
                self._take(HandoverStatus.model_validate({**base, **sig.model_dump()}))
        elif topic.startswith(self._prefix) and topic.endswith("/state"):
            name = topic[len(self._prefix) : -len("/state")]
            if not payload:  # the daemon's way of saying a participant is gone
                self.participants.pop(name, None)
                return
            p = parse(ParticipantStatus, payload)
            if p is not None and p.name == name:
                self.participants[name] = p

    def _take(self, h: HandoverStatus) -> None:
        if h.state in RUNNING:
            self._running_ids.add(h.id)
        self.handover = h

    def forget(self) -> None:
        """Drop the snapshot before a reconnect re-delivers it.

        A deletion that happened while disconnected is not retained, so the
        only way not to show a participant that is gone is to start over;
        what was seen running is kept, for ``done``.
        """
        self.daemon, self.handover = None, None
        self.participants.clear()

    # -- derived -------------------------------------------------------------

    @property
    def states(self) -> tuple[str, ...]:
        incoming = self.handover is not None and self.handover.side == "incoming"
        return INCOMING_STATES if incoming else OUTGOING_STATES

    def members(self) -> list[str]:
        """Who the current handover (or restore) is about; everyone when idle."""
        h = self.handover
        if h is not None and h.id is not None and h.expected:
            return list(h.expected)
        return sorted(self.participants)

    def counts(self) -> dict[str, int]:
        c = dict.fromkeys(self.states, 0)
        for n in self.members():
            state = self.state_of(n)
            if state:
                c[state] = c.get(state, 0) + 1
        return c

    def state_of(self, name: str) -> str:
        """What ``name`` is in now; "" if nothing was seen of it.

        A committed handover holds every member frozen: the daemon publishes
        their own states just after the outcome, so they may still show the
        step before.
        """
        h, p = self.handover, self.participants.get(name)
        committed = h is not None and h.side == "outgoing" and h.state == "committed"
        # A member: on progress (expected), or by its own last state when only
        # the broadcast was seen of a handover too short for progress.
        if (
            committed
            and h is not None
            and (name in h.expected or (p is not None and h.id and p.handover_id == h.id))
        ):
            return "frozen"
        return "" if p is None else p.state

    def outstanding(self) -> list[str]:
        """Who the handover is waiting for in its current state."""
        h = self.handover
        if h is None:
            return []
        ok = {
            "preparing": ("serialized", "frozen"),
            "freezing": ("frozen",),
            "restoring": ("finished",),
        }.get(h.state)
        if ok is None:
            return []
        return [
            n
            for n in self.members()
            if (p := self.participants.get(n)) is None or p.state not in ok
        ]

    def blackout(self) -> float | None:
        """Seconds from the freeze signal to now (or to the commit)."""
        h = self.handover
        if h is None or h.freeze_at is None:
            return None
        if h.state in BLACKOUT:
            return max(self.clock() - h.freeze_at, 0.0)
        if h.state == "committed" and h.committed_at is not None:
            return max(h.committed_at - h.freeze_at, 0.0)
        return None

    @property
    def done(self) -> str | None:
        """The end reached: committed, aborted, released; None until then.

        Committed and released are final, so a monitor that arrives late
        still sees them. An aborted handover returns to idle with its
        reason, which is also what an old abort looks like: it only counts
        once this monitor has seen that handover running.
        """
        h = self.handover
        if h is None:
            return None
        if h.side == "outgoing" and h.state == "committed":
            return "committed"
        if h.side == "incoming" and h.state == "released":
            return "released"
        if h.state == "idle" and h.abort_reason and h.id in self._running_ids:
            return "aborted"
        return None

    # -- output --------------------------------------------------------------

    def summary(self, *, clocks: bool = True) -> str:
        """One line, for logs and non-terminal output.

        ``clocks=False`` leaves out figures that change by themselves (a
        blackout still running), so that comparing lines detects changes.
        """
        if self.connected is False:
            return f"host {self.host_id}: broker disconnected, reconnecting"
        parts = [f"host {self.host_id}: daemon {self.daemon.state if self.daemon else 'unknown'}"]
        h = self.handover
        if h is None:
            parts.append("no handover status")
        else:
            parts.append(f"{_what(h)} {(h.id or '-')[:8]} {h.state}")
            total = len(self.members())
            parts.append(
                ", ".join(
                    f"{s} {n}/{total}"
                    for s, n in self.counts().items()
                    if n or s not in QUIET_STATES
                )
            )
            waiting = self.outstanding()
            if waiting:
                parts.append("waiting for " + _names(waiting, 8))
            b = self.blackout()
            if b is not None and (clocks or h.state == "committed"):
                parts.append(f"blackout {fmt_seconds(b)}")
            if h.abort_reason and h.state == "idle":
                parts.append(f"aborted: {h.abort_reason}")
            if h.unclaimed:
                parts.append("unclaimed: " + _names(h.unclaimed, 8))
        return "; ".join(parts)

    def render(self, *, max_rows: int = 20) -> RenderableType:
        """The whole view: header, progress bars, what is pending, participants."""
        rows: list[RenderableType] = [self._header()]
        h = self.handover
        if h is not None and h.id is not None:
            rows.append(self._bars())
        rows.extend(self._notes())
        if self.participants:
            rows.append(participants_table(self._table_order(), limit=max_rows))
        return Group(*rows)

    def _header(self) -> Text:
        t = Text.assemble(("host ", "dim"), (self.host_id, "bold"), "  ")
        if self.connected is False:
            t.append("broker disconnected, reconnecting  ", "bold red")
        t.append("daemon ", "dim")
        if self.daemon is None:
            t.append("unknown", "dim")
        else:
            t.append(self.daemon.state, STATE_STYLE[self.daemon.state])
            t.append(f" (v{self.daemon.version}, {self.daemon.side or '?'})", "dim")
        h = self.handover
        if h is None:
            t.append("\nno handover status yet", "dim")
        elif h.id is None:
            t.append(f"\n{h.state}, no handover yet", "dim")
        else:
            t.append(f"\n{_what(h)} ", "dim")
            t.append(h.id, "bold")
            t.append(" ")
            t.append(h.state, STATE_STYLE.get(h.state, "bold"))
            if h.deadline is not None and h.state in RUNNING:
                left = h.deadline - self.clock()
                t.append(
                    f"  deadline in {fmt_seconds(left)}" if left > 0 else "  deadline passed",
                    "dim" if left > 0 else "bold red",
                )
        return t

    def _bars(self) -> Table:
        total = len(self.members())
        grid = Table.grid(padding=(0, 1))
        grid.add_column(width=11)
        grid.add_column(width=40)
        grid.add_column(justify="right")
        for state, n in self.counts().items():
            if n == 0 and state in QUIET_STATES:
                continue
            style = STATE_STYLE.get(state, "")
            bar = ProgressBar(total=max(total, 1), completed=n, width=40, complete_style=style)
            grid.add_row(Text(state, style), bar, f"{n}/{total}")
        return grid

    def _notes(self) -> list[RenderableType]:
        h = self.handover
        notes: list[RenderableType] = []
        if h is None:
            return notes
        waiting = self.outstanding()
        if waiting:
            notes.append(Text.assemble(("waiting for ", "yellow"), _names(waiting, 12)))
        b = self.blackout()
        if b is not None:
            done = h.state == "committed"
            notes.append(
                Text.assemble(("blackout " if done else "blackout so far ", "dim"), fmt_seconds(b))
            )
        if h.left_out:
            notes.append(Text.assemble(("left out ", "dim"), _names(h.left_out, 12)))
        if h.abort_reason and h.state == "idle":
            notes.append(Text.assemble(("aborted: ", "bold red"), h.abort_reason))
        if h.unclaimed:
            notes.append(
                Text.assemble(("unclaimed fragments: ", "bold red"), _names(h.unclaimed, 12))
            )
        if h.state == "committed" and h.payload:
            notes.append(Text.assemble(("payload ", "green"), str(h.payload.get("path", "?"))))
        return notes

    def _table_order(self) -> list[ParticipantStatus]:
        # Failures first, then who is awaited, so a long table still shows
        # what needs the operator when it is cut.
        waiting = set(self.outstanding())
        rank = {
            p.name: 0 if p.state == "failed" else 1 if p.name in waiting else 2
            for p in self.participants.values()
        }
        return sorted(self.participants.values(), key=lambda p: (rank[p.name], p.name))


# -- shared with ``khod status`` ------------------------------------------------


def participants_table(
    participants: Iterable[ParticipantStatus], *, limit: int | None = None
) -> Table:
    """Name, state, compatible, instance, fragment size, short sha256, error."""
    rows = list(participants)
    shown = rows if limit is None else rows[:limit]
    errors = any(p.error for p in shown)  # the column only when it says something
    table = Table(box=None, pad_edge=False, header_style="bold dim")
    # On a narrow terminal the wrapable columns give way first: compatible
    # and instance (no spaces in either: an ellipsis, one line per row).
    table.add_column("NAME", no_wrap=True)
    table.add_column("STATE", no_wrap=True)
    table.add_column("COMPATIBLE", overflow="ellipsis")
    table.add_column("INSTANCE", overflow="ellipsis")
    table.add_column("FRAGMENT", justify="right", no_wrap=True)
    table.add_column("SHA256", no_wrap=True)
    if errors:
        table.add_column("ERROR", overflow="fold")
    for p in shown:
        # Text, not str: a str cell is rich markup, and an instance may hold "[".
        cells = [
            Text(p.name),
            Text.assemble(
                (p.state, STATE_STYLE.get(p.state, "")),
                # Restoring, and registered already for the next handover.
                (f" (next: {p.registration.state})" if p.registration else "", "dim"),
            ),
            Text(p.compatible),
            Text(str(p.instance)),
            Text("-" if p.fragment_size is None else f"{p.fragment_size} B"),
            Text((p.fragment_sha256 or "-")[:12]),
        ]
        table.add_row(*cells, *([Text(p.error or "", "red")] if errors else []))
    if len(rows) > len(shown):
        table.caption = f"... and {len(rows) - len(shown)} more"
    return table


def status_header(host_id: str, handover: HandoverStatus, total: int) -> Text:
    """The lines above ``khod status``'s table."""
    t = Text.assemble(("host ", "dim"), (host_id, "bold"), "  ")
    counts = ", ".join(f"{s} {n}" for s, n in handover.counts.items() if n)
    t.append(f"{total} participant{'' if total == 1 else 's'}")
    if counts:
        t.append(f" ({counts})")
    if handover.id is None:
        t.append(f"\n{handover.state}, no handover yet", "dim")
        return t
    t.append(f"\n{_what(handover)} ", "dim")
    t.append(handover.id, "bold")
    t.append(" ")
    t.append(handover.state, STATE_STYLE.get(handover.state, "bold"))
    if handover.abort_reason and handover.state == "idle":
        t.append("  aborted: ", "bold red")
        t.append(handover.abort_reason)
    return t


def fmt_seconds(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.1f} ms"
    if s < 60:
        return f"{s:.2f} s"
    m, sec = divmod(int(s), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{sec:02d}s"


def _what(h: HandoverStatus) -> str:
    return "restore" if h.side == "incoming" else "handover"


def _names(names: Sequence[str], limit: int) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
