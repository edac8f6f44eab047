"""khod.monitor: the retained topics of a host in, progress and text out (no broker)."""

from __future__ import annotations

from typing import Any

import pytest
from rich.console import Console

from khod.monitor import MonitorState, fmt_seconds, participants_table, status_header
from khod_wire.protocol import (
    DaemonStatus,
    HandoverSignal,
    HandoverStatus,
    ParticipantStatus,
    Topics,
    encode,
)

HOST = "h1"
T = Topics(HOST)
HID = "0b7e9a52-5f0a-4c43-9a3e-2f5d8f3b6a11"
NOW = 1_000.0


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def handover(state: str, **kw: Any) -> bytes:
    kw.setdefault("id", HID)
    kw.setdefault("side", "outgoing")
    return encode(HandoverStatus(state=state, updated_at=NOW, **kw))


def participant(name: str, state: str, **kw: Any) -> bytes:
    kw.setdefault("compatible", f"test,{name}")
    kw.setdefault("instance", 1)
    return encode(ParticipantStatus(name=name, state=state, updated_at=NOW, **kw))


def daemon(state: str = "online", side: str = "outgoing") -> bytes:
    return encode(DaemonStatus(version="0.1.0", state=state, side=side))  # type: ignore[arg-type]


def text(renderable: Any) -> str:
    console = Console(record=True, width=120)
    console.print(renderable)
    return console.export_text()


def feed(m: MonitorState, *states: tuple[str, str]) -> None:
    m.ingest(T.daemon, daemon())
    for name, state in states:
        m.ingest(T.state(name), participant(name, state))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def mon(clock: Clock) -> MonitorState:
    return MonitorState(HOST, clock=clock)


# -- counting and waiting -----------------------------------------------------------


def test_preparing_counts_and_outstanding(mon: MonitorState) -> None:
    mon.ingest(T.progress, handover("preparing", expected=["a", "b", "c", "d"]))
    feed(mon, ("a", "serialized"), ("b", "preparing"), ("c", "frozen"), ("x", "registered"))
    # d is expected but has not registered yet: outstanding, in no bar.
    assert mon.members() == ["a", "b", "c", "d"]
    assert mon.counts() == {
        "registered": 0,
        "preparing": 1,
        "serialized": 1,
        "frozen": 1,
        "failed": 0,
    }
    assert mon.outstanding() == ["b", "d"]
    assert mon.blackout() is None
    assert mon.done is None
    line = mon.summary()
    assert "handover 0b7e9a52 preparing" in line
    assert "serialized 1/4" in line and "waiting for b, d" in line
    assert "registered" not in line  # empty quiet states are left out


def test_freezing_outstanding_and_running_blackout(mon: MonitorState, clock: Clock) -> None:
    mon.ingest(
        T.progress, handover("freezing", expected=["a", "b"], freeze_at=NOW - 0.25, left_out=["z"])
    )
    feed(mon, ("a", "frozen"), ("b", "serialized"), ("z", "registered"))
    assert mon.outstanding() == ["b"]
    assert mon.blackout() == pytest.approx(0.25)
    clock.t += 1.5
    assert mon.blackout() == pytest.approx(1.75)
    assert "blackout 1.75 s" in mon.summary()
    assert "blackout" not in mon.summary(clocks=False)  # a running clock is no change
    out = text(mon.render())
    assert "blackout so far 1.75 s" in out
    assert "left out z" in out
    assert "waiting for b" in out


def test_idle_without_handover_counts_everyone(mon: MonitorState) -> None:
    mon.ingest(T.progress, handover("idle", id=None))
    feed(mon, ("a", "registered"), ("b", "registered"))
    assert mon.members() == ["a", "b"]
    assert mon.counts()["registered"] == 2
    assert mon.outstanding() == []
    out = text(mon.render())
    assert "idle, no handover yet" in out
    assert "a" in out.split() and "b" in out.split()


# -- done -----------------------------------------------------------------------------


def test_committed_is_done_with_the_blackout_figure(mon: MonitorState, clock: Clock) -> None:
    mon.ingest(T.progress, handover("freezing", expected=["a"], freeze_at=NOW))
    assert mon.done is None
    clock.t += 60  # the figure must not keep running once committed
    mon.ingest(
        T.progress,
        handover(
            "committed",
            expected=["a"],
            freeze_at=NOW,
            committed_at=NOW + 0.0042,
            payload={"path": "/var/lib/khod/payload.kho", "size": 8192},
        ),
    )
    feed(mon, ("a", "frozen"))
    assert mon.done == "committed"
    assert mon.blackout() == pytest.approx(0.0042)
    assert mon.outstanding() == []
    out = text(mon.render())
    assert "committed" in out and "blackout 4.2 ms" in out
    assert "/var/lib/khod/payload.kho" in out


def test_a_commit_counts_every_member_frozen_before_their_own_states_arrive(
    mon: MonitorState,
) -> None:
    # The daemon publishes members' own states just after the outcome.
    feed(mon, ("a", "serialized"), ("b", "frozen"), ("x", "registered"))
    mon.ingest(T.handover, handover("freezing", expected=["a", "b"], freeze_at=NOW))
    assert mon.counts()["frozen"] == 1
    mon.ingest(T.progress, handover("committed", expected=["a", "b"], freeze_at=NOW, seq=9))
    assert mon.counts() == {**mon.counts(), "frozen": 2, "serialized": 0}
    assert "frozen 2/2" in mon.summary()
    # Not a member: what its own topic says.
    assert mon.state_of("x") == "registered"
    # A handover so short that progress never showed it: the broadcast and
    # the members' own (serialized) states are enough.
    short = MonitorState(HOST)
    short.ingest(T.state("a"), participant("a", "serialized", handover_id=HID))
    short.ingest(T.state("x"), participant("x", "registered"))
    signal = HandoverSignal(state="committed", id=HID, side="outgoing", updated_at=NOW)
    short.ingest(T.handover, encode(signal))
    assert (short.state_of("a"), short.state_of("x")) == ("frozen", "registered")
    # An aborted one is not committed: the topics are the truth.
    mon.ingest(T.progress, handover("idle", abort_reason="no", seq=10))
    assert mon.state_of("a") == "serialized"


def test_late_monitor_sees_a_commit() -> None:
    m = MonitorState(HOST)
    m.ingest(T.progress, handover("committed", freeze_at=NOW, committed_at=NOW + 1))
    assert m.done == "committed"


def test_abort_counts_only_after_running(mon: MonitorState) -> None:
    # An old abort, retained from before this monitor started: not an end.
    mon.ingest(T.progress, handover("idle", id="old", abort_reason="operator abort"))
    assert mon.done is None
    mon.ingest(T.progress, handover("preparing", expected=["a"]))
    assert mon.done is None
    mon.ingest(T.progress, handover("idle", expected=["a"], abort_reason="a failed: oops"))
    assert mon.done == "aborted"
    assert "aborted: a failed: oops" in mon.summary()
    assert "aborted: a failed: oops" in text(mon.render())


def test_forget_keeps_what_was_seen_running(mon: MonitorState) -> None:
    mon.ingest(T.progress, handover("preparing", expected=["a"]))
    feed(mon, ("a", "preparing"))
    mon.forget()
    assert mon.handover is None and mon.daemon is None and mon.participants == {}
    mon.ingest(T.progress, handover("idle", expected=["a"], abort_reason="deadline passed"))
    assert mon.done == "aborted"


def test_incoming_side(mon: MonitorState) -> None:
    mon.ingest(T.daemon, daemon(side="incoming"))
    mon.ingest(
        T.progress,
        handover("restoring", side="incoming", expected=["a", "b", "c"], deadline=NOW + 90),
    )
    for name, state in (("a", "finished"), ("b", "retrieved"), ("c", "available")):
        mon.ingest(T.state(name), participant(name, state, handover_id=HID, fragment_size=64))
    assert mon.counts() == {"available": 1, "retrieved": 1, "finished": 1}
    assert mon.outstanding() == ["b", "c"]
    assert mon.done is None
    out = text(mon.render())
    assert f"restore {HID} restoring" in out
    assert "deadline in 1m30s" in out
    assert "finished" in out and "1/3" in out
    mon.ingest(
        T.progress,
        handover("released", side="incoming", expected=["a", "b", "c"], unclaimed=["b", "c"]),
    )
    assert mon.done == "released"
    assert mon.outstanding() == []
    assert "unclaimed fragments: b, c" in text(mon.render())
    assert "unclaimed: b, c" in mon.summary()


# -- robustness ---------------------------------------------------------------------


def test_empty_payload_deletes_a_participant(mon: MonitorState) -> None:
    feed(mon, ("a", "registered"), ("b", "registered"))
    mon.ingest(T.state("a"), b"")
    assert sorted(mon.participants) == ["b"]
    mon.ingest(T.state("nobody"), b"")  # deleting the unknown is harmless
    mon.ingest(T.daemon, b"")
    assert mon.daemon is None


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"state": "preparing"}',  # missing required fields
        b'{"name": "a", "state": 3}',
    ],
)
def test_garbage_is_ignored(mon: MonitorState, payload: bytes) -> None:
    mon.ingest(T.progress, handover("preparing", expected=["a"]))
    feed(mon, ("a", "preparing"))
    before = (mon.handover, dict(mon.participants), mon.daemon)
    for topic in (T.handover, T.state("a"), T.daemon, T.state("b")):
        mon.ingest(topic, payload)
    assert (mon.handover, dict(mon.participants), mon.daemon) == before


def test_other_topics_and_spoofed_names_are_ignored(mon: MonitorState) -> None:
    mon.ingest(Topics("other").handover, handover("preparing"))
    mon.ingest(f"{T.prefix}/p/a/reply", participant("a", "preparing"))
    mon.ingest(T.state("a"), participant("b", "preparing"))  # a state under someone else's name
    assert mon.handover is None and mon.participants == {}


def test_unknown_fields_from_a_newer_daemon_are_dropped(mon: MonitorState) -> None:
    body = handover("preparing", expected=["a"])[:-1] + b',"from_the_future":1}'
    mon.ingest(T.handover, body)
    assert mon.handover is not None and mon.handover.state == "preparing"


# -- rendering ------------------------------------------------------------------------


def test_render_before_anything_arrived(mon: MonitorState) -> None:
    out = text(mon.render())
    assert "host h1" in out and "daemon unknown" in out and "no handover status yet" in out
    assert mon.summary() == "host h1: daemon unknown; no handover status"
    mon.connected = False
    assert "broker disconnected" in text(mon.render())
    assert mon.summary() == "host h1: broker disconnected, reconnecting"


def test_render_daemon_offline_and_participant_rows(mon: MonitorState) -> None:
    mon.ingest(T.daemon, daemon("offline"))
    mon.ingest(T.progress, handover("preparing", expected=["vm0", "vm1"]))
    mon.ingest(
        T.state("vm0"),
        participant("vm0", "serialized", fragment_size=512, fragment_sha256="ab" * 32),
    )
    mon.ingest(T.state("vm1"), participant("vm1", "failed", error="vanished (connection lost)"))
    out = text(mon.render())
    assert "daemon offline" in out
    row = next(line for line in out.splitlines() if line.startswith("vm0"))
    assert "serialized" in row and "test,vm0" in row and "512 B" in row and "abababababab" in row
    assert "ab" * 7 not in row  # the hash is shortened
    # failures come first in the table, and get a bar of their own
    names = [line.split()[0] for line in out.splitlines() if line.startswith("vm")]
    assert names == ["vm1", "vm0"]
    assert any(line.startswith("failed") and "1/2" in line for line in out.splitlines())
    assert "vanished (connection lost)" in out


def test_render_cuts_a_long_table(mon: MonitorState) -> None:
    names = [f"p{i:03d}" for i in range(50)]
    mon.ingest(T.progress, handover("preparing", expected=names))
    for n in names:
        mon.ingest(T.state(n), participant(n, "serialized" if n != "p042" else "preparing"))
    out = text(mon.render(max_rows=5))
    assert "... and 45 more" in out
    first_row = next(line for line in out.splitlines() if line.startswith("p0"))
    assert first_row.startswith("p042")
    assert "serialized" in out and "49/50" in out


def test_status_helpers() -> None:
    h = HandoverStatus(
        side="outgoing",
        id=HID,
        state="idle",
        counts={"registered": 2, "frozen": 0},
        abort_reason="x",
        updated_at=NOW,
    )
    line = text(status_header(HOST, h, 2))
    assert f"handover {HID} idle" in line and "2 participants (registered 2)" in line
    assert "aborted: x" in line
    p = ParticipantStatus(
        name="a", state="registered", compatible="c,a", instance="k", updated_at=0
    )
    table = text(participants_table([p]))
    assert "NAME" in table and "a" in table and "c,a" in table


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0.0042, "4.2 ms"),
        (1.5, "1.50 s"),
        (59.5, "59.50 s"),
        (90, "1m30s"),
        (150, "2m30s"),
        (7300, "2h01m"),
    ],
)
def test_fmt_seconds(seconds: float, shown: str) -> None:
    assert fmt_seconds(seconds) == shown


def test_text_from_the_bus_is_not_rich_markup(mon: MonitorState) -> None:
    mon.ingest(T.progress, handover("idle", expected=["a"], abort_reason="[bold]boom[/]"))
    mon.ingest(T.state("a"), participant("a", "failed", instance="[red]x", error="[i]err"))
    out = text(mon.render())
    assert "[bold]boom[/]" in out and "[red]x" in out and "[i]err" in out


def test_status_header_before_any_handover() -> None:
    h = HandoverStatus(side="outgoing", id=None, state="idle", updated_at=NOW)
    out = text(status_header(HOST, h, 0))
    assert "0 participants" in out and "idle, no handover yet" in out


def test_the_signal_moves_the_state_at_once_and_keeps_the_details(mon: MonitorState) -> None:
    mon.ingest(T.progress, handover("preparing", expected=["a", "b"], seq=5))
    mon.ingest(T.handover, encode(HandoverSignal(seq=6, side="outgoing", id=HID,
                                                 state="freezing", updated_at=NOW)))  # fmt: skip
    assert mon.handover is not None and mon.handover.state == "freezing"
    assert mon.members() == ["a", "b"]
    # An older broadcast (a persistent broker's replay) changes nothing.
    mon.ingest(T.handover, encode(HandoverSignal(seq=2, side="outgoing", id=None,
                                                 state="idle", updated_at=NOW)))  # fmt: skip
    assert mon.handover.state == "freezing"
