"""docs/ cannot drift from the wire contract silently.

- ``docs/protocol.md`` names every op, every error code, every topic and, in
  one table per model, exactly the fields of each request, reply and state
  model.
- ``docs/asyncapi.yaml`` is AsyncAPI 3.0.0, its model schemas are exactly what
  pydantic generates from ``khod_wire.protocol``, every topic has a channel, and
  every ``$ref`` resolves.
- The reply ``data`` documented per op (in both documents) is what the daemon
  really sends: requests go through ``Daemon.handle`` in-process, with a
  store in a temporary directory and a publisher that records. Participant
  replies carry the compact ``HandoverSignal``, operator replies the detailed
  ``HandoverStatus``; both documents must say which.
- The numbers a client relies on (protocol version, replies kept, the
  sequence gap of a restarted daemon, the progress rate) are the code's.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

import khod
import khod_wire
from khod.config import Settings
from khod.daemon import Daemon
from khod.host import SEQ_RESTART_GAP
from khod.payload import PayloadImage
from khod.persist import REPLIES_KEPT
from khod.replies import ENTRY_OVERHEAD, ReplyCache
from khod.service import TICK
from khod.store import Store
from khod_wire import errors
from khod_wire.fragment import start_storage
from khod_wire.protocol import (
    DTB,
    JSON,
    MAX_CORRELATION_DATA,
    MAX_JSON_BODY,
    PROTOCOL_VERSION,
    AbortRequest,
    BeginRequest,
    ControlOp,
    DaemonStatus,
    EmptyRequest,
    ErrorBody,
    FailRequest,
    FreezeRequest,
    HandoverSignal,
    HandoverStatus,
    ParticipantOp,
    ParticipantStatus,
    RegisterRequest,
    Registration,
    Reply,
    Topics,
    decode,
)
from tests.fakes import Recorder

DOCS = Path(__file__).resolve().parents[2] / "docs"
REF_TEMPLATE = "#/components/schemas/{model}"

#: Every model on the wire; each has a field table in protocol.md and a schema in asyncapi.yaml.
MODELS: list[type[BaseModel]] = [
    RegisterRequest,
    FailRequest,
    EmptyRequest,
    BeginRequest,
    FreezeRequest,
    AbortRequest,
    Reply,
    ErrorBody,
    DaemonStatus,
    HandoverSignal,
    HandoverStatus,
    ParticipantStatus,
    Registration,
]
PARTICIPANT_OPS = [str(op) for op in ParticipantOp]
CONTROL_OPS = [str(op) for op in ControlOp]
#: The asyncapi schema describing the reply ``data`` of each op (retrieve replies raw bytes).
REPLY_DATA_SCHEMA = {
    "register": "RegisterReplyData",
    "fragment": "FragmentReplyData",
    "revise": "ParticipantReplyData",
    "frozen": "FrozenReplyData",
    "fail": "ParticipantReplyData",
    "gone": "GoneReplyData",
    "finish": "FinishReplyData",
    "begin": "HandoverReplyData",
    "freeze": "FreezeReplyData",
    "abort": "HandoverReplyData",
    "status": "StatusReplyData",
}
#: Which handover model the ``handover`` of each op's reply data is: participants
#: get the O(1) signal, operators the detailed status.
REPLY_HANDOVER_MODEL: dict[str, type[BaseModel]] = {
    "register": HandoverSignal,
    "fragment": HandoverSignal,
    "frozen": HandoverSignal,
    "finish": HandoverSignal,
    "begin": HandoverStatus,
    "freeze": HandoverStatus,
    "abort": HandoverStatus,
    "status": HandoverStatus,
}
#: The retained channels of asyncapi.yaml.
RETAINED_CHANNELS = {"daemon", "handover", "progress", "participantState"}


# -- helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def protocol_md() -> str:
    return (DOCS / "protocol.md").read_text()


@pytest.fixture(scope="module")
def asyncapi() -> dict[str, Any]:
    doc = yaml.safe_load((DOCS / "asyncapi.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def all_error_codes() -> set[str]:
    """The ``code`` of every KhodError subclass of the daemon and the wire, and ``internal``."""
    for pkg in (khod, khod_wire):
        for mod in pkgutil.iter_modules(pkg.__path__, f"{pkg.__name__}."):
            importlib.import_module(mod.name)  # every module that may define an error class
    codes: set[str] = {"internal"}  # the daemon's answer to an unexpected exception
    todo: list[type[errors.KhodError]] = [errors.KhodError]
    while todo:
        cls = todo.pop()
        if cls.__module__.split(".")[0] in ("khod", "khod_wire"):  # not the SDK's own
            codes.add(cls.code)
        todo.extend(cls.__subclasses__())
    return codes


def section(text: str, heading: str) -> str:
    """The text under the first heading that contains ``heading``, up to the next heading."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("#") and heading in line:
            rest = []
            for more in lines[i + 1 :]:
                if more.startswith("#"):
                    break
                rest.append(more)
            return "\n".join(rest)
    raise AssertionError(f"protocol.md has no heading containing {heading!r}")


def table_keys(text: str) -> list[str]:
    """The backquoted first cells of the table rows in ``text``."""
    return re.findall(r"^\| `([^`]+)` \|", text, flags=re.MULTILINE)


def schema_of(model: type[BaseModel]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the model's schema without ``$defs``, its ``$defs``), refs pointing into components."""
    schema = model.model_json_schema(ref_template=REF_TEMPLATE)
    defs = schema.pop("$defs", {})
    return schema, defs


def pointer(doc: Any, ref: str) -> Any:
    assert ref.startswith("#/"), f"only local refs are used: {ref}"
    node = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"unresolvable $ref {ref}"
        node = node[part]
    return node


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def resolve(doc: dict[str, Any], node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        node = pointer(doc, node["$ref"])
    return node


def address_regex(address: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]+\})", address)
    return re.compile(
        "".join("[^/+#]+" if p.startswith("{") else re.escape(p) for p in parts) + "$"
    )


# -- protocol.md ---------------------------------------------------------------


def test_protocol_md_documents_every_op(protocol_md: str) -> None:
    for op in PARTICIPANT_OPS:
        assert f"`khod/v1/<host>/p/<name>/req/{op}`" in protocol_md, op
        assert re.search(rf"^### 5\.\d+ `{op}`$", protocol_md, re.M), op
    for op in CONTROL_OPS:
        assert f"`khod/v1/<host>/ctl/req/{op}`" in protocol_md, op
        assert re.search(rf"^### 6\.\d+ `{op}`$", protocol_md, re.M), op


def test_protocol_md_documents_every_topic(protocol_md: str) -> None:
    t = Topics("<host>")
    topics = [t.daemon, t.handover, t.progress, t.state("<name>"), t.reply("<name>")]
    topics += [t.control_reply("<client>"), f"{t.prefix}/p/<name>/req/<op>"]
    topics += [f"{t.prefix}/ctl/req/<op>"]
    topics += [t.participant_states, t.all_participant_requests, t.all_control_requests]
    for topic in topics:
        assert f"`{topic}`" in protocol_md, topic


def test_protocol_md_error_table_is_exactly_the_codes(protocol_md: str) -> None:
    documented = table_keys(section(protocol_md, "7. Error codes"))
    assert sorted(documented) == sorted(all_error_codes())


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_protocol_md_field_table_is_exactly_the_model(protocol_md: str, model: type) -> None:
    documented = table_keys(section(protocol_md, f"`{model.__name__}`"))
    assert documented == list(model.model_fields), (
        f"the table under the heading `{model.__name__}` in docs/protocol.md lists "
        f"{documented}; the model has {list(model.model_fields)}"
    )


def test_protocol_md_error_precedence_covers_every_op(protocol_md: str) -> None:
    documented = table_keys(section(protocol_md, "7.1 Which error when several apply"))
    assert sorted(documented) == sorted(PARTICIPANT_OPS + CONTROL_OPS)


def test_protocol_md_reply_data_table_covers_every_op(protocol_md: str) -> None:
    documented = table_keys(section(protocol_md, "4.4 Reply data per op"))
    assert sorted(documented) == sorted(PARTICIPANT_OPS + CONTROL_OPS)


def test_protocol_md_states_the_limits(protocol_md: str) -> None:
    assert f"{MAX_JSON_BODY} bytes" in protocol_md
    assert f"at most {MAX_CORRELATION_DATA} bytes" in protocol_md
    assert f"fixed {ENTRY_OVERHEAD} bytes per entry" in protocol_md
    cache = ReplyCache()
    assert cache.max_entries == REPLIES_KEPT  # in memory and in the store alike
    assert f"last {cache.max_entries} replies" in protocol_md
    assert f"{cache.max_bytes // 2**20} MiB" in protocol_md
    assert "`application/json`" in protocol_md and f"`{DTB}`" in protocol_md and JSON in protocol_md


def test_reliability_md_states_the_hostile_input_bounds(protocol_md: str) -> None:
    from khod.service import MAX_INBOUND_BYTES
    from khod_wire.fdt import MAX_DEPTH, MAX_NAME_LEN
    from tests.integration.test_hostile import FLOOD_GROWTH_MIB

    text = section((DOCS / "reliability.md").read_text(), "Hostile input")
    inbound = f"{MAX_INBOUND_BYTES // 2**20} MiB"
    assert f"**{inbound}**" in text and f"than {inbound} of them" in protocol_md
    assert f"{MAX_INBOUND_BYTES // 4 // 2**20} MiB more" in text
    assert f"at most **{FLOOD_GROWTH_MIB} MiB**" in text
    assert f"**{MAX_CORRELATION_DATA} bytes**" in text
    assert f"**{MAX_DEPTH}** nodes deep" in text and f"**{MAX_NAME_LEN} bytes**" in text


def test_protocol_md_states_the_version(protocol_md: str) -> None:
    assert protocol_md.splitlines()[0].endswith(f"version {PROTOCOL_VERSION}")
    versioning = section(protocol_md, "16. Versioning")
    assert f"**{PROTOCOL_VERSION}**" in versioning
    # What an older client gets: the code the daemon really answers with.
    with pytest.raises(errors.ProtocolError) as refused:
        decode(EmptyRequest, json.dumps({"protocol": PROTOCOL_VERSION - 1}).encode())
    assert f"`{refused.value.code}`" in versioning
    assert f'"protocol": {PROTOCOL_VERSION}' in section(protocol_md, "4.2 Bodies")


def test_protocol_md_states_the_numbers_of_ordering(protocol_md: str) -> None:
    assert SEQ_RESTART_GAP == 2**20 and "2^20" in section(protocol_md, "Sequence numbers")
    assert f"every {TICK} s" in section(protocol_md, "9.3 `HandoverStatus`")


# -- asyncapi.yaml ---------------------------------------------------------------


def test_asyncapi_is_version_3_0_0(asyncapi: dict[str, Any]) -> None:
    assert asyncapi["asyncapi"] == "3.0.0"
    for key in ("info", "servers", "channels", "operations", "components"):
        assert key in asyncapi, key
    assert asyncapi["info"]["title"] and asyncapi["info"]["version"]
    assert asyncapi["info"]["version"].split(".")[0] == str(PROTOCOL_VERSION)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_asyncapi_schema_equals_the_model(asyncapi: dict[str, Any], model: type) -> None:
    schemas = asyncapi["components"]["schemas"]
    schema, defs = schema_of(model)
    assert schemas.get(model.__name__) == schema, (
        f"components/schemas/{model.__name__} in docs/asyncapi.yaml differs from "
        f"{model.__name__}.model_json_schema(ref_template={REF_TEMPLATE!r}): " + json.dumps(schema)
    )
    for name, sub in defs.items():
        assert schemas.get(name) == sub, f"components/schemas/{name} differs: {json.dumps(sub)}"


def test_asyncapi_refs_resolve(asyncapi: dict[str, Any]) -> None:
    for ref in refs(asyncapi):
        pointer(asyncapi, ref)


def test_asyncapi_channel_parameters_match_addresses(asyncapi: dict[str, Any]) -> None:
    for cid, channel in asyncapi["channels"].items():
        placeholders = set(re.findall(r"\{([^}]+)\}", channel["address"]))
        assert set(channel.get("parameters", {})) == placeholders, cid


def test_asyncapi_has_a_channel_for_every_topic(asyncapi: dict[str, Any]) -> None:
    addresses = [c["address"] for c in asyncapi["channels"].values()]
    t = Topics("hv-1")
    concrete = [t.daemon, t.handover, t.progress, t.state("vm-7"), t.reply("vm-7")]
    concrete += [t.control_reply("op-1")]
    concrete += [t.request("vm-7", op) for op in ParticipantOp]
    concrete += [t.control(op) for op in ControlOp]
    for topic in concrete:
        assert any(address_regex(a).match(topic) for a in addresses), topic
    # The daemon's wildcard subscriptions are channels too, with {param} for each '+'.
    as_filters = {re.sub(r"\{[^}]+\}", "+", a) for a in addresses}
    for wildcard in (t.participant_states, t.all_participant_requests, t.all_control_requests):
        assert wildcard.replace(t.host, "+", 1) in as_filters, wildcard


def test_asyncapi_request_messages(asyncapi: dict[str, Any]) -> None:
    channels = asyncapi["channels"]
    by_address = {c["address"]: c for c in channels.values()}
    for op in PARTICIPANT_OPS + CONTROL_OPS:
        where = "p/{name}/req" if op in PARTICIPANT_OPS else "ctl/req"
        channel = by_address[f"khod/v1/{{host}}/{where}/{op}"]
        (message,) = (resolve(asyncapi, m) for m in channel["messages"].values())
        payload = resolve(asyncapi, message["payload"])
        if op == "fragment":
            assert message["contentType"] == DTB
            assert payload["type"] == "string" and payload["format"] == "binary"
        else:
            assert message["contentType"] == JSON
            assert payload["additionalProperties"] is False  # a JSON request model
        if op == "gone":  # the will: no response topic, no correlation data
            assert "correlationId" not in message
        else:
            cid = resolve(asyncapi, message["correlationId"])
            assert cid["location"] == "$message.header#/correlationData"


def test_asyncapi_operations_bindings(asyncapi: dict[str, Any]) -> None:
    for oid, operation in asyncapi["operations"].items():
        mqtt = operation["bindings"]["mqtt"]
        assert mqtt["qos"] == 1, oid
        channel_id = operation["channel"]["$ref"].rsplit("/", 1)[1]
        assert mqtt["retain"] is (channel_id in RETAINED_CHANNELS), oid
        for m in operation["messages"]:
            assert m["$ref"].startswith(f"#/channels/{channel_id}/messages/"), (oid, m)


def test_asyncapi_retained_channels_carry_their_models(asyncapi: dict[str, Any]) -> None:
    channels = asyncapi["channels"]
    expected = {
        "daemon": ("khod/v1/{host}/daemon", {"DaemonStatus"}),
        "handover": ("khod/v1/{host}/handover", {"HandoverSignal"}),
        "progress": ("khod/v1/{host}/progress", {"HandoverStatus"}),
        "participantState": ("khod/v1/{host}/p/{name}/state", {"ParticipantStatus", "Removed"}),
    }
    assert set(expected) == RETAINED_CHANNELS
    for cid, (address, models) in expected.items():
        assert channels[cid]["address"] == address, cid
        payloads = {
            resolve(asyncapi, m)["payload"]["$ref"].rsplit("/", 1)[1]
            for m in channels[cid]["messages"].values()
        }
        assert payloads == models, cid
    # Every retained channel can be received: someone watches it.
    watched = {
        op["channel"]["$ref"].rsplit("/", 1)[1]
        for op in asyncapi["operations"].values()
        if op["action"] == "receive"
    }
    assert watched >= RETAINED_CHANNELS


def test_asyncapi_retrieve_reply_is_raw(asyncapi: dict[str, Any]) -> None:
    reply = asyncapi["operations"]["retrieve"]["reply"]
    contents = {resolve(asyncapi, m)["contentType"] for m in reply["messages"]}
    assert contents == {DTB, JSON}  # the fragment, or an error Reply


# -- reply data, as the daemon really sends it -----------------------------------


class Bus:
    """Requests into one in-process daemon; replies and publishes recorded."""

    def __init__(self, tmp: Path, host: str = "docs") -> None:
        self.settings = Settings(host_id=host, state_dir=tmp, handover_deadline=600)
        self.store = Store(tmp)
        self.pub = Recorder()
        self.daemon = Daemon(self.settings, self.store, self.pub)
        self.t = Topics(host)
        self.n = 0
        self.data: dict[str, list[dict[str, Any]]] = {}
        self.worker: asyncio.Task[None] | None = None

    async def request(self, name: str | None, op: str, body: bytes = b"") -> dict[str, Any]:
        self.n += 1
        corr = f"c{self.n}".encode()
        if name is None:
            topic, reply_to = self.t.control(ControlOp(op)), self.t.control_reply("docs-test")
        else:
            topic, reply_to = self.t.request(name, ParticipantOp(op)), self.t.reply(name)
        ctype = DTB if op == "fragment" else JSON
        start = len(self.pub.sent)
        if self.worker is None:  # asyncio.run() cancels it at the end
            self.worker = asyncio.create_task(self.daemon.run())
        await self.daemon.handle(topic, body, (ctype, reply_to, corr))
        await self.daemon.settled()
        replies = [s for s in self.pub.sent[start:] if s[0] == reply_to]
        assert len(replies) == 1, replies
        _, payload, kw = replies[0]
        assert kw["correlation"] == corr and kw["content_type"] == JSON and not kw.get("retain")
        reply = Reply.model_validate_json(payload)
        assert reply.ok, reply.error
        assert reply.op == op
        self.data.setdefault(op, []).append(reply.data)
        return reply.data

    async def retrieve(self, name: str) -> bytes:
        """``retrieve``, whose successful reply is the raw fragment."""
        self.n += 1
        corr = f"c{self.n}".encode()
        topic, reply_to = self.t.request(name, ParticipantOp.RETRIEVE), self.t.reply(name)
        start = len(self.pub.sent)
        if self.worker is None:
            self.worker = asyncio.create_task(self.daemon.run())
        await self.daemon.handle(topic, b"", (JSON, reply_to, corr))
        await self.daemon.settled()
        replies = [s for s in self.pub.sent[start:] if s[0] == reply_to]
        assert len(replies) == 1, replies
        _, payload, kw = replies[0]
        assert kw["correlation"] == corr and kw["content_type"] == DTB
        assert isinstance(payload, bytes)
        return payload


def fragment(compatible: str, instance: int | str) -> bytes:
    b = start_storage(compatible, instance)
    b.property_u32("vcpus", 4)
    return b.finish_storage()


@pytest.fixture(scope="module")
def reply_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """The reply data of every op, from two real handovers and the restore of one."""

    async def run() -> dict[str, list[dict[str, Any]]]:
        seen: dict[str, list[dict[str, Any]]] = {}
        # 1. a committed handover: register, begin, fragment, revise, frozen, status.
        committed = tmp_path_factory.mktemp("committed")
        bus = Bus(committed)
        await bus.request("vm-7", "register", b'{"compatible":"example,vm-v1","instance":7}')
        await bus.request(None, "begin", b'{"deadline":60}')
        blob = fragment("example,vm-v1", 7)
        data = await bus.request("vm-7", "fragment", blob)
        assert data["size"] == len(blob) and data["sha256"] == hashlib.sha256(blob).hexdigest()
        await bus.request("vm-7", "revise")
        await bus.request("vm-7", "fragment", blob)
        await bus.request("vm-7", "frozen")
        await bus.request(None, "status")
        assert bus.daemon.handover_status().state == "committed"
        PayloadImage.from_file(bus.settings.payload_path)  # the committed image reads back
        await bus.daemon.publish_progress()  # what the daemon's tick does, 4 times a second
        retained = {bus.t.daemon, bus.t.handover, bus.t.progress, bus.t.state("vm-7")}
        models: dict[str, type[BaseModel]] = {
            bus.t.handover: HandoverSignal,
            bus.t.progress: HandoverStatus,
            bus.t.state("vm-7"): ParticipantStatus,
        }
        published = set()
        for topic, payload, kw in bus.pub.sent:
            if topic in retained:
                assert kw.get("retain") is True, topic
                published.add(topic)
                if topic in models:  # exactly the model's fields, no more
                    assert set(json.loads(payload)) == set(models[topic].model_fields), topic
        assert published >= set(models), published
        bus.store.close()
        for op, values in bus.data.items():
            seen.setdefault(op, []).extend(values)
        # 2. an aborted one: freeze --force, abort, fail, gone.
        bus = Bus(tmp_path_factory.mktemp("aborted"))
        await bus.request("a", "register", b'{"compatible":"example,a-v1","instance":1}')
        await bus.request("b", "register", b'{"compatible":"example,b-v1","instance":"b"}')
        await bus.request(None, "begin", b'{"auto_freeze":false}')
        await bus.request("a", "fragment", fragment("example,a-v1", 1))
        data = await bus.request(None, "freeze", b'{"force":true}')
        assert data["left_out"] == ["b"]
        await bus.request(None, "abort", b'{"reason":"docs"}')
        await bus.request("a", "fail", b'{"reason":"docs"}')
        await bus.request("b", "gone")
        bus.store.close()
        for op, values in bus.data.items():
            seen.setdefault(op, []).extend(values)
        # 3. the restore of the committed payload: retrieve (twice: it may), finish.
        bus = Bus(committed)
        bus.daemon.load_incoming(bus.settings.payload_path)
        assert await bus.retrieve("vm-7") == blob
        assert await bus.retrieve("vm-7") == blob
        data = await bus.request("vm-7", "finish")
        assert data["handover"]["state"] == "released"
        bus.store.close()
        for op, values in bus.data.items():
            seen.setdefault(op, []).extend(values)
        return seen

    return asyncio.run(run())


@pytest.mark.parametrize("op", sorted(REPLY_DATA_SCHEMA))
def test_reply_data_is_as_documented(
    op: str, reply_data: dict[str, list[dict[str, Any]]], asyncapi: dict[str, Any], protocol_md: str
) -> None:
    schema = asyncapi["components"]["schemas"][REPLY_DATA_SCHEMA[op]]
    documented = set(schema.get("required", []))
    row = next(
        line
        for line in section(protocol_md, "4.4 Reply data per op").splitlines()
        if line.startswith(f"| `{op}` |")
    )
    assert reply_data[op], op
    for data in reply_data[op]:
        assert set(data) == documented, f"{op}: the daemon sent {sorted(data)}"
        for key in data:
            assert f'"{key}"' in row, f"protocol.md §4.4 does not name {key!r} for {op}"
        if "participant" in data:
            ParticipantStatus.model_validate(data["participant"])
        if "handover" in data:
            model = REPLY_HANDOVER_MODEL[op]
            model.model_validate(data["handover"])
            assert set(data["handover"]) == set(model.model_fields), op
            ref = schema["properties"]["handover"]["$ref"]
            assert ref == REF_TEMPLATE.format(model=model.__name__), (op, ref)
            assert f'"handover": {model.__name__}' in row, op
        for p in data.get("participants", []):
            ParticipantStatus.model_validate(p)
        if "daemon" in data:
            DaemonStatus.model_validate(data["daemon"])
