"""Every request field is strict: JSON types are never coerced (issue 8, item 4).

One case per field and per wrong JSON type, through ``protocol.decode`` (what
the daemon runs on every JSON body), and then through ``Daemon.handle`` for
the requests whose coercion did harm: the refusal is ``bad-request`` and
nothing changes.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from khod_wire.errors import ProtocolError
from khod_wire.protocol import (
    PROTOCOL_VERSION,
    REQUEST_MODELS,
    AbortRequest,
    BeginRequest,
    EmptyRequest,
    FailRequest,
    FreezeRequest,
    RegisterRequest,
    Request,
    decode,
)
from tests.fakes import InProcessBus

REGISTER = {"compatible": "example,vm-v1", "instance": 7}

#: (model, field, the rest of a valid body) for every request field on the wire.
FIELDS: list[tuple[type[Request], str, dict[str, Any]]] = [
    (RegisterRequest, "protocol", REGISTER),
    (RegisterRequest, "compatible", {"instance": 7}),
    (RegisterRequest, "instance", {"compatible": "example,vm-v1"}),
    (RegisterRequest, "freeze_after", REGISTER),
    (RegisterRequest, "restore_after", REGISTER),
    (FailRequest, "protocol", {}),
    (FailRequest, "reason", {}),
    (EmptyRequest, "protocol", {}),
    (BeginRequest, "protocol", {}),
    (BeginRequest, "deadline", {}),
    (BeginRequest, "expect", {}),
    (BeginRequest, "auto_freeze", {}),
    (FreezeRequest, "protocol", {}),
    (FreezeRequest, "force", {}),
    (AbortRequest, "protocol", {}),
    (AbortRequest, "reason", {}),
]

#: Values of the wrong JSON type for each kind of field. Each one was accepted
#: (coerced) by the lax models: "1" -> 1, 1.0 -> 1, true -> 1, "yes" -> True,
#: 1 -> True, "no" -> False ...
WRONG: dict[str, list[Any]] = {
    "int": ["1", 1.0, True, None, [1]],
    "str": [1, 1.5, True, None, ["x"], {"a": "b"}],
    "instance": [True, False, 7.0, None, [7], {"i": 7}],
    "list": ["vm-a", {"vm-a": 1}, [1], [True], [None], None],
    "float": [True, False, "60", "1e3", [60], {"s": 60}],
    "bool": ["yes", "no", "true", 1, 0, 1.0, None],
}
KIND = {
    "protocol": "int",
    "compatible": "str",
    "instance": "instance",
    "freeze_after": "list",
    "restore_after": "list",
    "reason": "str",
    "deadline": "float",
    "expect": "list",
    "auto_freeze": "bool",
    "force": "bool",
}
#: null is a valid value for the optional ones (it means "the default").
NULLABLE = {"deadline", "expect"}


def _cases() -> list[Any]:
    out = []
    for model, field, rest in FIELDS:
        for value in WRONG[KIND[field]]:
            if value is None and field in NULLABLE:
                continue
            out.append(
                pytest.param(model, field, rest, value, id=f"{model.__name__}.{field}={value!r}")
            )
    return out


def test_every_request_field_is_listed() -> None:
    listed = {(m, f) for m, f, _ in FIELDS}
    models = {*REQUEST_MODELS.values(), EmptyRequest}
    every = {(m, f) for m in models for f in m.model_fields}
    assert listed == every


@pytest.mark.parametrize(("model", "field", "rest", "value"), _cases())
def test_a_wrong_json_type_is_refused(
    model: type[Request], field: str, rest: dict[str, Any], value: Any
) -> None:
    body = json.dumps({**rest, field: value}).encode()
    with pytest.raises(ProtocolError, match=field):
        decode(model, body)


@pytest.mark.parametrize(
    ("model", "body", "field", "expected"),
    [
        # A JSON integer is a JSON number: a deadline of 60 is 60.0 seconds.
        (BeginRequest, {"deadline": 60}, "deadline", 60.0),
        (BeginRequest, {"deadline": 0.5}, "deadline", 0.5),
        (BeginRequest, {"deadline": None, "expect": None}, "expect", None),
        (BeginRequest, {"auto_freeze": False}, "auto_freeze", False),
        (BeginRequest, {"expect": ["vm-a"]}, "expect", ["vm-a"]),
        (FreezeRequest, {"force": True}, "force", True),
        (RegisterRequest, {**REGISTER, "instance": "ioas-0"}, "instance", "ioas-0"),
        (RegisterRequest, {**REGISTER, "protocol": PROTOCOL_VERSION}, "protocol", PROTOCOL_VERSION),
        (FailRequest, {"reason": "disk"}, "reason", "disk"),
    ],
)
def test_the_right_json_type_is_accepted(
    model: type[Request], body: dict[str, Any], field: str, expected: Any
) -> None:
    req = decode(model, json.dumps(body).encode())
    assert getattr(req, field) == expected
    assert type(getattr(req, field)) is type(expected)


@pytest.mark.parametrize(
    "body", [b'{"deadline": NaN}', b'{"deadline": Infinity}', b'{"deadline": 1e400}']
)
def test_deadline_is_finite(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="deadline"):
        decode(BeginRequest, body)


# -- through the daemon: refused, and nothing changed ------------------------------


class Bus(InProcessBus):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, "strict")


@pytest.mark.parametrize(
    ("op", "body"),
    [
        ("freeze", {"force": "yes"}),
        ("freeze", {"force": 1}),
        ("begin", {"deadline": True}),
        ("begin", {"auto_freeze": "no"}),
        ("begin", {"protocol": "1"}),
        ("abort", {"reason": 5}),
    ],
)
def test_the_daemon_refuses_coercible_values_and_changes_nothing(
    tmp_path: Path, op: str, body: dict[str, Any]
) -> None:
    async def run() -> None:
        bus = Bus(tmp_path)
        for name in ("vm-a", "vm-b"):
            reply = await bus.call(
                name, "register", {"compatible": f"example,{name}", "instance": 1}
            )
            assert reply.ok, reply.error
        if op != "begin":
            assert (await bus.call(None, "begin", {"auto_freeze": False})).ok
        before = bus.daemon.handover_status().model_dump(exclude={"updated_at"})
        published = len(bus.pub.sent)
        reply = await bus.call(None, op, body)
        assert not reply.ok and reply.error is not None
        assert reply.error.code == "bad-request", reply.error
        assert next(iter(body)) in reply.error.message
        assert bus.daemon.handover_status().model_dump(exclude={"updated_at"}) == before
        assert len(bus.pub.sent) == published + 1  # the reply, nothing retained
        bus.store.close()

    asyncio.run(run())
