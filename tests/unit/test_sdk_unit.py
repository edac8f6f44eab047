"""khod_client's pure logic: what a sequence of statuses means, and reply parsing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import khod_client
from khod.config import Settings
from khod_client import FragmentReceipt, HandoverCancelled, Participant
from khod_client._events import (
    Began,
    Cancelled,
    MayFreeze,
    Tracker,
)
from khod_wire.errors import ProtocolError, RegistrationError, RemoteError, RequestTimeout
from khod_wire.protocol import (
    HandoverSignal,
    HandoverStatus,
    ParticipantStatus,
    load_status,
    parse_status,
    reply_data,
)

ME = "vm-1"
_seq = iter(range(1, 1_000_000))


def signal(
    state: str,
    hid: str | None = "h1",
    *,
    abort_reason: str | None = None,
    side: str = "outgoing",
    seq: int | None = None,
    epoch: str = "e1",
) -> HandoverSignal:
    return HandoverSignal.model_validate(
        {
            "seq": next(_seq) if seq is None else seq,
            "epoch": epoch,
            "side": side,
            "id": hid,
            "state": state,
            "abort_reason": abort_reason,
            "updated_at": 1.0,
        }
    )


def me(
    state: str = "preparing",
    hid: str | None = "h1",
    *,
    may_freeze: bool | None = None,
    seq: int | None = None,
    name: str = ME,
) -> ParticipantStatus:
    return ParticipantStatus.model_validate(
        {
            "seq": next(_seq) if seq is None else seq,
            "epoch": "e1",
            "name": name,
            "state": state,
            "compatible": "test,vm-v1",
            "instance": 1,
            "handover_id": hid,
            "may_freeze": may_freeze,
            "updated_at": 1.0,
        }
    )


def kinds(events: list[Any]) -> list[str]:
    return [type(e).__name__ for e in events]


def taking_part(t: Tracker, state: str = "preparing", hid: str = "h1") -> list[Any]:
    """The participant's own state names ``hid``, then the broadcast shows it running."""
    return [*t.observe_state(me("preparing", hid)), *t.observe(signal(state, hid))]


# -- the tracker ---------------------------------------------------------------


def test_a_whole_handover_gives_began_then_may_freeze_once() -> None:
    t = Tracker(ME)
    assert t.observe(signal("idle", None)) == []
    assert t.begun() is None
    assert kinds(taking_part(t)) == ["Began"]
    assert t.current == "h1" and t.begun() is not None
    assert t.observe(signal("freezing")) == []  # not serialized yet: no freeze
    assert not t.freeze_reached("h1")
    events = t.observe_state(me("serialized"))
    assert kinds(events) == ["MayFreeze"] and t.freeze_reached("h1")
    assert t.observe_state(me("serialized")) == []  # once per handover
    assert t.observe_state(me("frozen")) == []
    assert t.observe(signal("frozen")) == []
    assert t.observe(signal("committed")) == []
    assert t.committed == {"h1"} and not t.live and t.begun() is None
    # After the commit, a new handover is not a cancel of the committed one.
    assert kinds(t.observe(signal("preparing", "h2"))) == []
    assert t.cancelled == {}


def test_serialized_before_the_freeze_signal_may_freeze_at_the_signal() -> None:
    t = Tracker(ME)
    taking_part(t)
    assert t.observe_state(me("serialized")) == []
    assert kinds(t.observe(signal("freezing"))) == ["MayFreeze"]


def test_an_ordered_participant_waits_for_its_own_may_freeze() -> None:
    t = Tracker(ME)
    taking_part(t)
    t.observe_state(me("serialized", may_freeze=False))
    assert t.observe(signal("freezing")) == []
    assert t.observe_state(me("serialized", may_freeze=False)) == []
    assert kinds(t.observe_state(me("serialized", may_freeze=True))) == ["MayFreeze"]


def test_abort_cancels_once_with_the_reason_then_a_new_handover_begins() -> None:
    t = Tracker(ME)
    taking_part(t)
    events = t.observe(signal("idle", abort_reason="operator abort: testing"))
    assert events == [Cancelled("h1", "operator abort: testing")]
    assert t.observe(signal("idle", abort_reason="operator abort: testing")) == []
    assert t.begun() is None
    assert kinds(taking_part(t, hid="h2")) == ["Began"] and t.current == "h2"


def test_an_abort_without_reason_still_cancels() -> None:
    t = Tracker(ME)
    taking_part(t)
    [event] = t.observe(signal("idle"))
    assert isinstance(event, Cancelled) and "h1" in event.reason


def test_a_missed_abort_is_seen_as_a_replaced_handover() -> None:
    t = Tracker(ME)
    taking_part(t)
    events = t.observe(signal("preparing", "h2"))
    assert kinds(events) == ["Cancelled"] and not t.live
    assert isinstance(events[0], Cancelled) and "replaced by handover h2" in events[0].reason
    assert kinds(t.observe_state(me("preparing", "h2"))) == ["Began"] and t.current == "h2"


def test_left_out_by_a_forced_freeze_is_a_cancel() -> None:
    t = Tracker(ME)
    taking_part(t)
    t.observe(signal("freezing"))
    events = t.observe_state(me("registered", None))
    assert kinds(events) == ["Cancelled"]
    assert isinstance(events[0], Cancelled) and "forced freeze" in events[0].reason


def test_a_handover_without_me_is_ignored() -> None:
    t = Tracker(ME)
    t.observe_state(me("registered", None))
    assert t.observe(signal("preparing")) == []
    assert t.observe(signal("freezing")) == []
    assert t.observe(signal("idle", abort_reason="x")) == []
    assert t.current is None and t.cancelled == {}


def test_joining_while_freezing_gives_both_events() -> None:
    t = Tracker(ME)
    t.observe(signal("freezing"))
    assert kinds(t.observe_state(me("serialized"))) == ["Began", "MayFreeze"]


def test_an_older_status_is_ignored_whatever_its_source() -> None:
    t = Tracker(ME)
    taking_part(t, "freezing")
    # A persistent broker replays the idle status of before the handover.
    assert t.observe(signal("idle", None, seq=1)) == []
    assert t.live and t.latest is not None and t.latest.state == "freezing"
    assert t.observe_state(me("registered", None, seq=1)) == []
    assert t.me is not None and t.me.handover_id == "h1"


def test_a_committed_handover_is_never_cancelled_by_a_stale_status() -> None:
    t = Tracker(ME)
    taking_part(t)
    t.observe(signal("committed"))
    assert t.observe(signal("idle", "h1", abort_reason="old", seq=2)) == []
    assert t.committed == {"h1"} and t.cancelled == {}


def test_a_withdrawn_payload_thaws_the_participant() -> None:
    t = Tracker(ME)
    taking_part(t)
    t.observe(signal("committed"))
    events = t.observe(signal("idle", "h1", abort_reason="payload withdrawn: kexec postponed"))
    assert events == [Cancelled("h1", "payload withdrawn: kexec postponed")]


def test_another_epoch_starts_the_numbers_again() -> None:
    t = Tracker(ME)
    taking_part(t)
    assert kinds(t.observe(signal("idle", abort_reason="state lost", seq=1, epoch="e2"))) == [
        "Cancelled"
    ]


def test_the_incoming_side_gives_no_outgoing_events() -> None:
    t = Tracker(ME)
    taking_part(t)
    assert t.observe(signal("restoring", side="incoming")) == []
    assert t.latest is not None and t.latest.side == "incoming"
    assert t.begun() is None


def test_freeze_reached_after_the_freeze_even_if_may_freeze_was_missed() -> None:
    t = Tracker(ME)
    taking_part(t)
    t.observe(signal("assembled"))  # reconnected late: everyone already froze
    assert t.freeze_reached("h1")


_ids = st.sampled_from(["h1", "h2", "h3"])
_states = st.sampled_from(["idle", "preparing", "freezing", "frozen", "assembled", "committed"])
_mine = st.sampled_from(["registered", "preparing", "serialized", "frozen"])
_steps = st.one_of(
    st.builds(lambda hid, state: ("signal", hid, state, None), _ids, _states),
    st.builds(
        lambda hid, state, may: ("me", hid, state, may),
        st.one_of(st.none(), _ids),
        _mine,
        st.sampled_from([None, False, True]),
    ),
)


@given(st.lists(_steps, max_size=30))
def test_events_never_repeat_and_follow_a_begin(steps: list[tuple[Any, ...]]) -> None:
    t = Tracker(ME)
    began: list[str] = []
    freezes: list[str] = []
    cancels: list[str] = []
    for kind, hid, state, may in steps:
        if kind == "signal":
            events = t.observe(signal(state, hid))
        else:
            events = t.observe_state(me(state, hid, may_freeze=may))
        for e in events:
            if isinstance(e, Began):
                assert e.status.id is not None and t.me is not None
                assert t.me.handover_id == e.status.id
                began.append(e.status.id)
            elif isinstance(e, MayFreeze):
                assert e.status.id in began and e.status.id not in cancels
                assert t.me is not None and t.me.state == "serialized"
                assert t.me.may_freeze is not False
                freezes.append(str(e.status.id))
            else:
                assert e.handover_id in began and e.handover_id not in t.committed
                cancels.append(e.handover_id)
    assert len(freezes) == len(set(freezes))
    assert len(cancels) == len(set(cancels))


# -- parsing -------------------------------------------------------------------


def test_receipt_from_a_reply() -> None:
    blob = b"\xd0\x0d\xfe\xed" + bytes(60)
    sha = hashlib.sha256(blob).hexdigest()
    r = FragmentReceipt.from_reply({"size": 64, "sha256": sha, "handover": {}}, fragment=blob)
    assert r == FragmentReceipt(64, sha)
    with pytest.raises(AttributeError):
        r.size = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"size": 64},
        {"size": "64", "sha256": "0" * 64},
        {"size": True, "sha256": "0" * 64},
        {"size": 0, "sha256": "0" * 64},
        {"size": 64, "sha256": "0" * 63},
        {"size": 64, "sha256": "G" * 64},
    ],
)
def test_malformed_receipts_are_refused(data: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError, match="malformed fragment receipt"):
        FragmentReceipt.from_reply(data)


def test_a_receipt_for_other_bytes_is_refused() -> None:
    with pytest.raises(ProtocolError, match="were sent"):
        FragmentReceipt.from_reply({"size": 3, "sha256": "0" * 64}, fragment=b"abc")


def test_reply_data_and_error_replies() -> None:
    ok = {"protocol": 1, "op": "register", "ok": True, "data": {"x": 1}, "later": "field"}
    assert reply_data("register", json.dumps(ok).encode()) == {"x": 1}
    err = {
        "protocol": 1,
        "op": "frozen",
        "ok": False,
        "error": {"code": "busy", "message": "no handover"},
    }
    with pytest.raises(RemoteError) as info:
        reply_data("frozen", json.dumps(err).encode())
    assert info.value.code == "busy" and "no handover" in str(info.value)
    for garbage in (b"", b"\xff", b"[1]", b'{"op": "x"}'):
        with pytest.raises(ProtocolError):
            reply_data("x", garbage)


def test_statuses_parse_leniently() -> None:
    assert parse_status(HandoverStatus, b"") is None
    s = signal("preparing").model_dump()
    s["added_in_a_later_version"] = True
    parsed = parse_status(HandoverStatus, json.dumps(s).encode())
    assert parsed is not None and parsed.state == "preparing"
    with pytest.raises(ProtocolError, match="HandoverStatus"):
        parse_status(HandoverStatus, b'{"state": "idle"}')
    with pytest.raises(ProtocolError, match="not JSON"):
        parse_status(HandoverStatus, b"{")
    ps = load_status(
        ParticipantStatus,
        {"name": ME, "state": "available", "compatible": "c", "instance": 1, "updated_at": 1},
    )
    assert ps.state == "available"


# -- the public front ------------------------------------------------------------


def test_public_names() -> None:
    for name in khod_client.__all__:
        assert hasattr(khod_client, name), name
    assert {"Participant", "FragmentReceipt", "HandoverCancelled", "RemoteError"} <= set(
        khod_client.__all__
    )
    assert isinstance(khod_client.__version__, str)
    assert issubclass(HandoverCancelled, khod_client.KhodError)
    e = HandoverCancelled("why", "h1")
    assert e.reason == "why" and e.handover_id == "h1" and e.code == "cancelled"


def test_participant_arguments_are_checked_early() -> None:
    with pytest.raises(RegistrationError, match="participant name"):
        Participant("a/b", compatible="x,y", instance=1)
    with pytest.raises(RegistrationError, match="host id"):
        Participant("a", compatible="x,y", instance=1, host_id="h+")
    with pytest.raises(RegistrationError, match="linux-kho"):
        Participant("a", compatible="linux-kho,x", instance=1)
    with pytest.raises(RegistrationError, match="instance"):
        Participant("a", compatible="x,y", instance=-1)
    with pytest.raises(RegistrationError, match="participant name"):
        Participant("a", compatible="x,y", instance=1, freeze_after=["b#"])
    p = Participant("a", compatible="x,y", instance=1)
    assert p.host_id == Settings().host_id
    assert p.topics.reply("a") == f"khod/v1/{p.host_id}/p/a/reply"
    assert p.handover is None and p.status is None and p.handover_id is None
    # A stable client id (docs/protocol.md, "Connecting"), unless told otherwise.
    assert p._conn.identifier == f"khod-{p.host_id}-p-a"
    assert Participant("a", compatible="x,y", instance=1, identifier="me")._conn.identifier == "me"
    frag = p.start_storage().finish_storage()
    assert frag[:4] == b"\xd0\x0d\xfe\xed"


async def test_requests_need_a_connection() -> None:
    p = Participant("a", compatible="x,y", instance=1, host_id="h")
    with pytest.raises(RuntimeError, match="async with"):
        await p.register()
    with pytest.raises(RuntimeError, match="async with"):
        await p.wait_for_begin()


async def test_no_broker_is_a_request_timeout(tmp_path: Path) -> None:
    p = Participant(
        "a",
        compatible="x,y",
        instance=1,
        host_id="h",
        broker=f"unix://{tmp_path}/no-broker.sock",
        request_timeout=0.3,
    )
    with pytest.raises(RequestTimeout, match="no connection"):
        async with p:
            pass
    with pytest.raises(RuntimeError, match="async with"):
        await p.frozen()  # its tasks are gone
