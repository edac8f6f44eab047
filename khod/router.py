"""The request path up to the core: a bus message becomes a typed request on the queue.

``Router.handle`` does what needs no state (the topic, the retain flag, the
response topic, the correlation data, the reply cache) at once, and queues
the rest for the worker. There one op table (``PARTICIPANT_OPS``,
``CONTROL_OPS``) maps the operation to its request model and its handler in
``khod.ops``: the body is decoded into that model, and the handler gets it
typed. Bad input never escapes as an exception: every ``KhodError``
becomes an error reply with its code; anything unexpected is logged and
answered as ``internal``. A ``StoreError`` is the exception: the disk is
the truth, and a daemon that cannot write it must stop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from khod.announce import Announcer
from khod.commit import Committer
from khod.host import Host
from khod.ops import Asked, Data, Ops
from khod.replies import ReplyCache, internal, ok, refused
from khod.worker import Batch, Worker
from khod_wire import identity
from khod_wire.errors import KhodError, ProtocolError, StoreError
from khod_wire.protocol import (
    DTB,
    JSON,
    AbortRequest,
    BeginRequest,
    ControlOp,
    EmptyRequest,
    FailRequest,
    FreezeRequest,
    ParticipantOp,
    RegisterRequest,
    Request,
    Topics,
    check_correlation,
    decode,
)

log = logging.getLogger(__name__)

R = TypeVar("R")
Q = TypeVar("Q", bound=Request)


@dataclass(frozen=True)
class Route(Generic[R]):
    """One operation: how its body is read, and who handles it."""

    parse: Callable[[bytes], R]
    handler: Callable[[Ops, Asked, R], Data | bytes]

    def __call__(self, ops: Ops, asked: Asked, payload: bytes) -> Data | bytes:
        return self.handler(ops, asked, self.parse(payload))


def _json(model: type[Q]) -> Callable[[bytes], Q]:
    return lambda body: decode(model, body)


def _raw(body: bytes) -> bytes:
    return body  # fragments travel raw both ways


PARTICIPANT_OPS: dict[str, Route[Any]] = {
    ParticipantOp.REGISTER: Route(_json(RegisterRequest), Ops.register),
    ParticipantOp.FRAGMENT: Route(_raw, Ops.fragment),
    ParticipantOp.REVISE: Route(_json(EmptyRequest), Ops.revise),
    ParticipantOp.FROZEN: Route(_json(EmptyRequest), Ops.frozen),
    ParticipantOp.FAIL: Route(_json(FailRequest), Ops.fail),
    ParticipantOp.GONE: Route(_json(EmptyRequest), Ops.gone),
    ParticipantOp.RETRIEVE: Route(_json(EmptyRequest), Ops.retrieve),
    ParticipantOp.FINISH: Route(_json(EmptyRequest), Ops.finish),
}
CONTROL_OPS: dict[str, Route[Any]] = {
    ControlOp.BEGIN: Route(_json(BeginRequest), Ops.begin),
    ControlOp.FREEZE: Route(_json(FreezeRequest), Ops.freeze),
    ControlOp.ABORT: Route(_json(AbortRequest), Ops.abort),
    ControlOp.STATUS: Route(_json(EmptyRequest), Ops.status),
}


class Router:
    def __init__(
        self,
        host: Host,
        topics: Topics,
        announce: Announcer,
        worker: Worker,
        ops: Ops,
        commit: Committer,
        replies: ReplyCache,
    ) -> None:
        self.host = host
        self.topics = topics
        self.announce = announce
        self.worker = worker
        self.ops = ops
        self.commit = commit
        self.replies = replies
        #: keys of requests queued or waiting for the commit, not answered yet
        self._inflight: set[bytes] = set()

    async def handle(
        self,
        topic: str,
        payload: bytes,
        response_topic: str | None,
        correlation: bytes | None,
        *,
        retain: bool = False,
    ) -> None:
        """One message from the bus. Never raises for bad input; never waits for the disk."""
        try:
            name, op = self.topics.parse_request(topic)
        except ProtocolError:
            self.worker.submit(lambda batch: self._stale_state(topic, payload))
            return
        if retain:
            # A retained request would run again at every (re)connect.
            log.warning("ignoring retained request on %s", topic)
            return
        if response_topic is not None and not self._reply_allowed(name, response_topic):
            log.warning("request on %s: response topic %r refused", topic, response_topic)
            if name is None:
                return
            # Tell the participant on its own reply topic, the only one it may read.
            response_topic = self.topics.reply(name)
            refusal = ProtocolError(f"response topic must be {response_topic}")
            await self.announce.reply(response_topic, refused(op, refusal), JSON, correlation)
            return
        if response_topic is not None and not await self._correlation_ok(
            op, response_topic, correlation
        ):
            return
        key = None
        if response_topic and correlation:
            key = self.replies.key(topic, payload, response_topic, correlation)
            cached = self.replies.get(key)
            if cached is not None:
                await self.announce.reply(response_topic, *cached, correlation)  # a replay
                return
            if key in self._inflight:
                return  # a replay of a request not answered yet: its reply will come
            self._inflight.add(key)

        async def execute(batch: Batch) -> None:
            asked = Asked(batch, name or "", will=response_topic is None)
            if name is not None:
                batch.asked.add(name)
            if name is None and op == ControlOp.ABORT and self.host.committed():
                body, ctype = await self._withdraw(batch, payload)
            else:
                body, ctype = self._execute(asked, name, op, payload)
            if response_topic is None:
                return
            if asked.hold and name is not None:
                self.ops.hold(response_topic, correlation, key, name)
            else:
                batch.replies.append((response_topic, body, ctype, correlation, key))

        self.worker.enqueue(execute)

    def answered(self, batch: Batch) -> None:
        """The batch's replies are durable: a replay gets them from now on."""
        for _, body, ctype, _, key in batch.replies:
            if key is not None:
                self.replies.put(key, body, ctype)
                self._inflight.discard(key)

    def _execute(
        self, asked: Asked, name: str | None, op: str, payload: bytes
    ) -> tuple[bytes, str]:
        who = name or "operator"
        try:
            if name in self.ops.vanished and op != ParticipantOp.GONE:
                # A restarted participant: its old connection's will comes first.
                self.ops.expire_gone(asked.batch, self.host.now(), only=name)
            route = (CONTROL_OPS if name is None else PARTICIPANT_OPS).get(op)
            if route is None:
                raise ProtocolError(f"unknown operation {op!r}")
            result = route(self.ops, asked, payload)
            if isinstance(result, bytes):
                return result, DTB
            return ok(op, result), JSON
        except StoreError:
            raise
        except KhodError as exc:
            log.info("%s %s refused: %s", who, op, exc)
            return refused(op, exc), JSON
        except Exception as exc:  # the daemon never dies of one request
            log.exception("%s %s: internal error", who, op)
            return internal(op, exc), JSON

    async def _withdraw(self, batch: Batch, payload: bytes) -> tuple[bytes, str]:
        try:
            req = decode(AbortRequest, payload)
        except KhodError as exc:
            log.error("withdrawing the payload of %s failed: %s", self.host.out.handover.id, exc)
            return refused(ControlOp.ABORT, exc), JSON
        return await self.commit.withdraw(batch, req)

    def _reply_allowed(self, name: str | None, response_topic: str) -> bool:
        # The daemon may write anywhere under its prefix; never let a request
        # steer it into writing someone else's topics (or a wildcard).
        if name is None:
            client = response_topic.removeprefix(self.topics.control_reply(""))
            return client != response_topic and identity.HOST_RE.fullmatch(client) is not None
        return response_topic == self.topics.reply(name)

    async def _correlation_ok(
        self, op: str, response_topic: str, correlation: bytes | None
    ) -> bool:
        # Replies are kept under a digest of the correlation data: bound it
        # before anything is digested, kept or written to the store.
        try:
            check_correlation(correlation)
        except ProtocolError as exc:
            log.info("%s refused: %s", op, exc)
            await self.announce.reply(response_topic, refused(op, exc), JSON, correlation)
            return False
        return True

    async def _stale_state(self, topic: str, payload: bytes) -> None:
        """A retained state of a participant nobody knows any more: clear it."""
        prefix, suffix = self.topics.prefix + "/p/", "/state"
        if not (payload and topic.startswith(prefix) and topic.endswith(suffix)):
            return
        if self.host.participant_status(topic[len(prefix) : -len(suffix)]) is None:
            await self.announce.clear(topic)
