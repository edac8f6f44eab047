"""The wire contract: topics, message models and the protocol version.

This module is shared by the daemon, the SDK and the operator CLI, and it is
the only place that knows the shape of anything on the bus. It has no I/O.
``docs/protocol.md`` describes the same contract for other languages.

Topic tree (``<host>`` is the host id, a single topic level)::

    khod/v1/<host>/daemon              retained  DaemonStatus (its will: offline)
    khod/v1/<host>/handover            retained  HandoverSignal (the O(1) freeze/cancel broadcast)
    khod/v1/<host>/progress            retained  HandoverStatus (details for monitors, rate-bounded)
    khod/v1/<host>/p/<name>/state      retained  ParticipantStatus
    khod/v1/<host>/p/<name>/req/<op>   participant -> daemon (ParticipantOp)
    khod/v1/<host>/p/<name>/reply      daemon -> participant
    khod/v1/<host>/ctl/req/<op>        operator -> daemon (ControlOp)
    khod/v1/<host>/ctl/reply/<client>  daemon -> operator

Requests use MQTT v5 request/response: the request carries a Response Topic
and Correlation Data, the reply goes to that topic with the same
correlation data, exactly once. Replaying a request (same correlation data)
returns the same reply without acting again.

Signals cost O(1) bytes per participant: the ``handover`` broadcast carries
no per-participant list, and a participant that must wait for others
(``freeze_after``/``restore_after``) learns that it may go on from its own
``state`` topic. Every status carries ``seq``, a number the daemon persists
and increases with every change: a reader ignores a status whose ``seq`` is
not greater than the last one it saw on that topic (a persistent broker can
replay an old retained message).

Payloads are JSON (content type ``application/json``), except fragments,
which travel as raw FDT bytes (content type ``application/x-dtb``) in the
``fragment`` request and in the ``retrieve`` reply.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from khod_wire.errors import ProtocolError, RemoteError

#: The version of the message bodies (the ``v1`` in the topic root is the
#: layout of the topic tree). Version 2 made the handover broadcast O(1).
PROTOCOL_VERSION = 2
ROOT = "khod/v1"
JSON = "application/json"
DTB = "application/x-dtb"
#: JSON bodies are small; anything bigger is hostile or a bug.
MAX_JSON_BODY = 64 * 1024
#: The daemon remembers the correlation data of every request it answers (its
#: reply cache): a request with more than this is refused, not remembered.
#: Generous for a UUID (16 bytes raw, 36 as text) or any printable id.
MAX_CORRELATION_DATA = 128


class ParticipantOp(StrEnum):
    REGISTER = "register"
    FRAGMENT = "fragment"
    REVISE = "revise"
    FROZEN = "frozen"
    FAIL = "fail"
    GONE = "gone"  # the participant's will: it never expects a reply
    RETRIEVE = "retrieve"
    FINISH = "finish"


class ControlOp(StrEnum):
    BEGIN = "begin"
    FREEZE = "freeze"
    ABORT = "abort"
    STATUS = "status"


# -- states: every state of every lifecycle, defined once -----------------------
# The transitions between them are the daemon's (khod.lifecycle); what a
# state means to a reader (running, ended, ...) is here, derived from these.


class HandoverState(StrEnum):
    IDLE = "idle"
    PREPARING = "preparing"
    FREEZING = "freezing"
    FROZEN = "frozen"
    ASSEMBLED = "assembled"
    COMMITTED = "committed"


class ParticipantState(StrEnum):
    REGISTERED = "registered"
    PREPARING = "preparing"
    SERIALIZED = "serialized"
    FROZEN = "frozen"
    FAILED = "failed"


class RestoreState(StrEnum):
    AVAILABLE = "available"
    RETRIEVED = "retrieved"
    FINISHED = "finished"


class HostRestoreState(StrEnum):
    RESTORING = "restoring"
    RELEASED = "released"


_H, _P = HandoverState, ParticipantState
#: Handover states in which a handover is running (participants take part).
RUNNING_STATES = frozenset({_H.PREPARING, _H.FREEZING, _H.FROZEN, _H.ASSEMBLED})
#: Running states in which participants still serialize or freeze.
BEGUN_STATES = frozenset({_H.PREPARING, _H.FREEZING})
#: Handover states of the blackout (freeze signal to commit).
BLACKOUT_STATES = RUNNING_STATES - {_H.PREPARING}
#: Handover states in which the daemon assembles and commits the payload.
COMMITTING_STATES = frozenset({_H.FROZEN, _H.ASSEMBLED})
#: Outgoing states the ``handover`` broadcast does not announce: nobody has
#: anything to do while the daemon commits; ``progress`` shows them.
QUIET_STATES = COMMITTING_STATES
#: Handover states in which every participant of the handover has frozen.
PAST_FREEZE_STATES = COMMITTING_STATES | {_H.COMMITTED}
#: Handover states that end a handover without a payload.
ENDED_STATES = frozenset(HandoverState) - RUNNING_STATES - {_H.COMMITTED}
#: A participant's own states while it takes part in a handover.
TAKING_PART_STATES = frozenset({_P.PREPARING, _P.SERIALIZED, _P.FROZEN})


class Topics:
    """Every topic of one host."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.prefix = f"{ROOT}/{host}"
        self.daemon = f"{self.prefix}/daemon"
        self.handover = f"{self.prefix}/handover"
        self.progress = f"{self.prefix}/progress"
        self.participant_states = f"{self.prefix}/p/+/state"
        self.all_participant_requests = f"{self.prefix}/p/+/req/+"
        self.all_control_requests = f"{self.prefix}/ctl/req/+"

    def state(self, name: str) -> str:
        return f"{self.prefix}/p/{name}/state"

    def request(self, name: str, op: ParticipantOp) -> str:
        return f"{self.prefix}/p/{name}/req/{op}"

    def reply(self, name: str) -> str:
        return f"{self.prefix}/p/{name}/reply"

    def control(self, op: ControlOp) -> str:
        return f"{self.prefix}/ctl/req/{op}"

    def control_reply(self, client: str) -> str:
        return f"{self.prefix}/ctl/reply/{client}"

    def parse_request(self, topic: str) -> tuple[str | None, str]:
        """``(participant name, op)`` of a request topic, name None for control.

        Raises ProtocolError for anything that is not a request topic of
        this host, naming the topic.
        """
        rest = topic.removeprefix(self.prefix + "/")
        parts = rest.split("/")
        if rest != topic and len(parts) == 4 and parts[0] == "p" and parts[2] == "req":
            return parts[1], parts[3]
        if rest != topic and len(parts) == 3 and parts[:2] == ["ctl", "req"]:
            return None, parts[2]
        raise ProtocolError(f"not a request topic of host {self.host!r}: {topic!r}")


# -- bodies ------------------------------------------------------------------


class Model(BaseModel):
    # Unknown fields are refused: a typo in a field name must not be ignored
    # silently on a host that is about to kexec.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Status(BaseModel):
    # What the daemon publishes: a newer daemon may add fields, and an older
    # reader must still understand the rest.
    model_config = ConfigDict(extra="ignore", frozen=True)


class Request(Model):
    # Strict: JSON types are never coerced. "yes" is not a boolean, true is not
    # a number, "1" is not an integer; on a host about to kexec a wrong type is
    # a client bug to refuse, not to guess at. One widening is allowed, as in
    # JSON itself: an integer where a number (float) is expected (deadline 60).
    model_config = ConfigDict(strict=True)

    protocol: int = PROTOCOL_VERSION


class RegisterRequest(Request):
    compatible: str = Field(max_length=128)
    # JSON true must not become instance 1, nor "7" become 7.
    instance: StrictInt | StrictStr
    freeze_after: list[str] = Field(default_factory=list, max_length=256)
    restore_after: list[str] = Field(default_factory=list, max_length=256)


class FailRequest(Request):
    reason: str = Field(default="failed", max_length=1024)


class EmptyRequest(Request):
    """revise, frozen, gone, retrieve, finish, status carry nothing else."""


class BeginRequest(Request):
    deadline: float | None = Field(default=None, gt=0, le=7 * 24 * 3600, allow_inf_nan=False)
    expect: list[str] | None = Field(default=None, max_length=4096)
    auto_freeze: bool = True


class FreezeRequest(Request):
    force: bool = False


class AbortRequest(Request):
    reason: str = Field(default="operator abort", max_length=1024)


REQUEST_MODELS: dict[str, type[Request]] = {
    ParticipantOp.REGISTER: RegisterRequest,
    ParticipantOp.FAIL: FailRequest,
    ControlOp.BEGIN: BeginRequest,
    ControlOp.FREEZE: FreezeRequest,
    ControlOp.ABORT: AbortRequest,
}


class ErrorBody(Status):
    code: str
    message: str


class Reply(Status):
    protocol: int = PROTOCOL_VERSION
    op: str
    ok: bool
    error: ErrorBody | None = None
    data: dict[str, Any] = Field(default_factory=dict)


# -- retained state ----------------------------------------------------------


class DaemonStatus(Status):
    protocol: int = PROTOCOL_VERSION
    version: str
    state: Literal["online", "offline"]
    side: Literal["outgoing", "incoming"] | None = None
    pid: int | None = None
    since: float | None = None


class HandoverSignal(Status):
    """The host's handover broadcast: O(1) bytes, whatever the number of participants.

    Every participant watches it: ``freezing`` with the id of the handover it
    takes part in means "freeze now" (unless it waits for others, see
    ``ParticipantStatus.may_freeze``), ``idle`` with that id means cancel,
    ``restoring`` on the incoming side means "retrieve now" (unless it
    restores after others). Published only when the state changes.
    """

    protocol: int = PROTOCOL_VERSION
    seq: int = 0
    epoch: str = ""
    side: Literal["outgoing", "incoming"]
    id: str | None
    state: str
    deadline: float | None = None
    abort_reason: str | None = None
    began_at: float | None = None
    freeze_at: float | None = None
    committed_at: float | None = None
    released_at: float | None = None
    payload: dict[str, Any] | None = None
    updated_at: float


class HandoverStatus(Status):
    """The handover (outgoing) or restore (incoming) state of the host, in detail.

    For monitors and operators (the ``progress`` topic, at most a few times a
    second, and the ``status`` reply): who is expected, missing, may freeze or
    retrieve now. Its size grows with the number of participants, so it is
    never on a participant's critical path.
    """

    protocol: int = PROTOCOL_VERSION
    seq: int = 0
    epoch: str = ""
    side: Literal["outgoing", "incoming"]
    id: str | None
    state: str
    deadline: float | None = None
    expected: list[str] = Field(default_factory=list)
    counts: dict[str, int] = Field(default_factory=dict)
    missing: list[str] = Field(default_factory=list)
    may_freeze: list[str] = Field(default_factory=list)
    may_retrieve: list[str] = Field(default_factory=list)
    left_out: list[str] = Field(default_factory=list)
    unclaimed: list[str] = Field(default_factory=list)
    abort_reason: str | None = None
    began_at: float | None = None
    freeze_at: float | None = None
    committed_at: float | None = None
    released_at: float | None = None
    payload: dict[str, Any] | None = None
    updated_at: float


class Registration(Status):
    """A participant's registration for the next handover, made while its host restores."""

    state: str
    compatible: str
    instance: int | str
    freeze_after: list[str] = Field(default_factory=list)
    restore_after: list[str] = Field(default_factory=list)
    error: str | None = None
    updated_at: float


class ParticipantStatus(Status):
    """One participant's retained state (or, after a kexec, its fragment's restore state).

    ``may_freeze`` / ``may_retrieve`` are set (true or false) only for a
    participant that named ``freeze_after`` / ``restore_after``: it goes on
    when its own state says true for the handover it takes part in. For the
    others they are null, and the ``handover`` broadcast alone is the signal.
    """

    protocol: int = PROTOCOL_VERSION
    seq: int = 0
    epoch: str = ""
    name: str
    state: str
    compatible: str
    instance: int | str
    handover_id: str | None = None
    freeze_after: list[str] = Field(default_factory=list)
    restore_after: list[str] = Field(default_factory=list)
    fragment_size: int | None = None
    fragment_sha256: str | None = None
    error: str | None = None
    may_freeze: bool | None = None
    may_retrieve: bool | None = None
    updated_at: float
    #: Incoming side only: the state above is the restore's, and this is the
    #: registration for the next handover, once the participant has made one.
    registration: Registration | None = None


def check_correlation(correlation: bytes | None) -> None:
    """ProtocolError if the correlation data is longer than MAX_CORRELATION_DATA."""
    if correlation is not None and len(correlation) > MAX_CORRELATION_DATA:
        raise ProtocolError(
            f"correlation data of {len(correlation)} bytes exceeds {MAX_CORRELATION_DATA}"
        )


def newer(
    status: HandoverSignal | HandoverStatus | ParticipantStatus, last: tuple[str, int] | None
) -> bool:
    """Whether ``status`` is newer than the last one seen on its topic, ``(epoch, seq)``.

    A status of another epoch (a daemon started on a new state directory)
    counts as newer: its numbers start again.
    """
    return last is None or status.epoch != last[0] or status.seq > last[1]


RequestT = TypeVar("RequestT", bound=Request)


def decode(model: type[RequestT], body: bytes) -> RequestT:
    """Parse a request body; an empty body is an empty request."""
    if len(body) > MAX_JSON_BODY:
        raise ProtocolError(f"request body of {len(body)} bytes exceeds {MAX_JSON_BODY}")
    try:
        req = model.model_validate_json(body or b"{}")
    except ValidationError as exc:
        raise ProtocolError(f"malformed {model.__name__}: {_details(exc)}") from None
    if req.protocol != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {req.protocol} is not supported (this daemon speaks "
            f"{PROTOCOL_VERSION})"
        )
    return req


def encode(model: BaseModel) -> bytes:
    return model.model_dump_json().encode()


# -- reading what the daemon publishes -----------------------------------------

S = TypeVar("S", bound=BaseModel)


def _details(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())


def load_status(model: type[S], data: object) -> S:
    """A status (or reply) from decoded JSON; ProtocolError if it is not one.

    Status models ignore fields they do not know, so a reader of an older
    version keeps working against a newer daemon.
    """
    if not isinstance(data, dict):
        raise ProtocolError(f"malformed {model.__name__}: not a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ProtocolError(f"malformed {model.__name__}: {_details(exc)}") from None


def parse_status(model: type[S], body: bytes) -> S | None:
    """A retained status; None for an empty (deleted) retained message."""
    if not body:
        return None
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{model.__name__} is not JSON: {exc}") from None
    return load_status(model, data)


def reply_data(op: str, body: bytes) -> dict[str, Any]:
    """The ``data`` of a successful JSON reply to ``op``; RemoteError for a refusal."""
    reply = parse_status(Reply, body)
    if reply is None:
        raise ProtocolError(f"empty reply to {op}")
    if not reply.ok:
        if reply.error is None:
            raise RemoteError("error", f"{op} refused without an error body")
        raise RemoteError(reply.error.code, reply.error.message)
    return dict(reply.data)
