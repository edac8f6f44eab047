"""The daemon's request handling: bus -> lifecycle -> store -> payload.

One ``Daemon`` owns the aggregates (``Outgoing`` always, ``Incoming`` after a
kexec), the store and the announcer. Every request runs under one lock:
apply to the aggregate, persist in one store transaction, then announce and
reply. So nothing is acknowledged before it is durable, and the retained
topics show states in the order they happened.

Bad input never escapes as an exception: every ``KhodError`` becomes an
error reply with its code; anything unexpected is logged and answered as
``internal``. A ``StoreError`` is the exception: the disk is the truth, and
a daemon that cannot write it must stop (systemd restarts it, and it
resumes from what is on disk).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

from khod import __version__, assembly, backend, names
from khod.announce import Announcer, Publisher
from khod.config import Settings
from khod.errors import (
    Busy,
    ConfigError,
    FragmentTooLarge,
    KhodError,
    PayloadError,
    ProtocolError,
    StoreError,
)
from khod.fragment import validate_fragment
from khod.handover import Changes, Outgoing, Participant
from khod.handover import Handover as HandoverRecord
from khod.lifecycle import HandoverState, HostRestoreState
from khod.payload import PayloadImage
from khod.protocol import (
    DTB,
    JSON,
    REQUEST_MODELS,
    AbortRequest,
    BeginRequest,
    ControlOp,
    DaemonStatus,
    EmptyRequest,
    ErrorBody,
    FailRequest,
    FreezeRequest,
    HandoverStatus,
    ParticipantOp,
    ParticipantStatus,
    RegisterRequest,
    Reply,
    Topics,
    decode,
    encode,
)
from khod.replies import ReplyCache
from khod.restore import Claim, Incoming
from khod.status import claim_status, incoming_status, outgoing_status, participant_status
from khod.store import Store

log = logging.getLogger(__name__)

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return "unknown"


class Daemon:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        publisher: Publisher,
        *,
        clock: Callable[[], float] = time.time,
        backlog: Callable[[], int] = lambda: 0,
        epoch: Callable[[], int] = lambda: 0,
    ) -> None:
        self.settings = settings
        self.store = store
        self.now = clock
        self.epoch = epoch
        self.topics = Topics(settings.host_id)
        self.announce = Announcer(publisher, self.topics, self.handover_status, backlog=backlog)
        self.lock = asyncio.Lock()
        self.out = Outgoing(
            HandoverRecord.from_record(h) if (h := store.load_handover()) else None,
            (Participant.from_record(r) for r in store.load_participants().values()),
        )
        self.inc: Incoming | None = None
        self.image: PayloadImage | None = None
        self.image_path: Path | None = None
        self.started_at = clock()
        self._replies = ReplyCache()
        #: participants whose will arrived: name -> (when it counts, bus epoch then)
        self._vanished: dict[str, tuple[float, int]] = {}

    # -- start-up ------------------------------------------------------------

    def load_incoming(self, explicit: Path | None, *, handed_over: Path | None = None) -> None:
        """Decide whether this boot restores a payload, and load it.

        With ``--restore`` a bad image is a ConfigError (the operator asked
        for it). Found by itself after a kexec (``handed_over``: the image
        the kernel carried, e.g. retrieved from a LUO session), a missing or
        corrupt image is logged and recorded, and the daemon starts on the
        outgoing side: a host must never be stuck unable to begin its next
        handover.
        """
        rec = self.store.load_restore()
        h = self.out.handover
        path = explicit or (Path(rec["image"]) if rec is not None else None) or handed_over
        if path is None and h.state is HandoverState.COMMITTED:
            if self.store.get_meta("boot_id") == boot_id():
                return  # the same boot: the kexec has not happened yet
            path = self.settings.payload_path
        if path is None:
            return
        try:
            self.image = PayloadImage.from_file(path, base=self.settings.payload_base)
        except (OSError, PayloadError) as exc:
            what = exc.strerror if isinstance(exc, OSError) else str(exc)
            if explicit is not None:
                raise ConfigError(f"cannot restore {path}: {what}") from None
            log.error("incoming payload %s unusable, not restoring: %s", path, what)
            self._new_boot(None, detail=f"{path}: {what}")
            return
        self.image_path = path
        if rec is not None and rec["handover_id"] == self.image.handover_id:
            self.inc = Incoming.from_record(rec["incoming"])
            return
        if self.store.get_meta("restored") == self.image.handover_id:
            # e.g. a unit that still says --restore after the restore is over:
            # restoring again would wipe the registrations of this boot.
            log.warning("%s was already restored on this host; not restoring it again", path)
            self.image = self.image_path = None
            return
        now = self.now()
        claims = [
            Claim(e.name, e.compatible, e.instance, e.size, e.sha256.hex(), e.restore_after)
            for e in self.image.entries
        ]
        inc = Incoming.start(
            self.image.handover_id, claims, deadline=now + self.settings.restore_deadline, now=now
        )
        self._new_boot(inc, detail=str(path))

    def _new_boot(self, inc: Incoming | None, *, detail: str) -> None:
        """Forget the old boot's components (they register anew) and its handover."""
        self.inc = inc
        with self.store.transaction():
            for name in list(self.out.participants):
                self.store.delete_participant(name)
                self.store.delete_fragment(name)
            self.out = Outgoing()
            self.store.save_handover(self.out.handover.to_record())
            if inc is None:
                self.store.clear_restore()
            else:
                self._save_incoming()
            state = "failed" if inc is None else str(inc.state)
            self.store.record_transition("restore", "start", None, state, detail=detail)

    async def resume(self) -> None:
        """Finish what a killed daemon left half-done: assembly and commit."""
        async with self.lock:
            # A handover whose deadline passed while the daemon was down aborts.
            await self._apply(self.out.check_deadline(now=self.now()))
            state = self.out.handover.state
            if state in (HandoverState.FROZEN, HandoverState.ASSEMBLED):
                log.info("resuming handover %s from %s", self.out.handover.id, state)
                await self._assemble_and_commit()

    # -- what is shown -------------------------------------------------------

    def daemon_status(self, state: Literal["online", "offline"]) -> DaemonStatus:
        return DaemonStatus(
            version=__version__,
            state=state,
            side="incoming" if self.inc is not None else "outgoing",
            pid=os.getpid(),
            since=self.started_at,
        )

    def handover_status(self) -> HandoverStatus:
        if self.inc is not None:
            return incoming_status(self.inc, now=self.now())
        return outgoing_status(self.out, now=self.now())

    def participant_status(self, name: str) -> ParticipantStatus | None:
        if self.inc is not None and name in self.inc.claims:
            return claim_status(self.inc.claims[name], self.inc.handover_id)
        p = self.out.participants.get(name)
        if p is None:
            return None
        h = self.out.handover
        return participant_status(p, h.id if name in h.expected else None)

    async def publish_all(self) -> None:
        """Everything retained, again: after each (re)connect."""
        async with self.lock:
            await self.announce.daemon(self.daemon_status("online"))
            self.announce.handover_changed()
            await self.announce.flush(force=True)
            claims = set(self.inc.claims) if self.inc is not None else set()
            for name in sorted(set(self.out.participants) | claims):
                await self.announce.participant(name, self.participant_status(name))

    async def publish_offline(self) -> None:
        # Under the lock: a request in flight finishes (and is answered) first.
        async with self.lock:
            await self.announce.daemon(self.daemon_status("offline"))

    async def _announce(self, changes: Changes) -> None:
        if not changes:
            return
        for name in sorted(changes.participants | changes.removed):
            await self.announce.participant(name, self.participant_status(name))
        self.announce.handover_changed()
        # A new handover state is a signal (freeze, cancel): it goes out before
        # the reply to the request that caused it. Counts may wait for the burst.
        signals = any(t.subject in ("handover", "restore") for t in changes.transitions)
        await self.announce.flush(force=signals)

    # -- persisting ----------------------------------------------------------

    def _record(self, changes: Changes) -> None:
        for t in changes.transitions:
            self.store.record_transition(
                t.subject, t.event, t.from_state, t.to_state, detail=t.detail
            )

    def _persist(self, changes: Changes, *, fragment: tuple[str, bytes, str] | None = None) -> None:
        with self.store.transaction():
            if changes.handover:
                self.store.save_handover(self.out.handover.to_record())
            for name in changes.participants:
                if name in self.out.participants:
                    self.store.save_participant(name, self.out.participants[name].to_record())
            for name in changes.removed:
                self.store.delete_participant(name)
            for name in changes.drop_fragments:
                self.store.delete_fragment(name)
            if fragment is not None:
                self.store.put_fragment(*fragment)
            self._record(changes)

    def _save_incoming(self) -> None:
        assert self.inc is not None
        self.store.save_restore(
            {
                "handover_id": self.inc.handover_id,
                "image": str(self.image_path),
                "incoming": self.inc.to_record(),
            }
        )

    async def _apply(
        self, changes: Changes, *, fragment: tuple[str, bytes, str] | None = None
    ) -> None:
        self._persist(changes, fragment=fragment)
        await self._announce(changes)

    async def _apply_incoming(self, changes: Changes) -> None:
        with self.store.transaction():
            self._save_incoming()
            self._record(changes)
        await self._announce(changes)

    # -- the request path ----------------------------------------------------

    async def handle(
        self, topic: str, payload: bytes, props: tuple[Any, ...], *, retain: bool = False
    ) -> None:
        """One message from the bus. Never raises for bad input."""
        _, response_topic, correlation = props
        try:
            name, op = self.topics.parse_request(topic)
        except ProtocolError:
            await self._stale_state(topic, payload)
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
            await self.announce.reply(response_topic, _error(op, refusal), JSON, correlation)
            return
        key = self._replies.key(topic, payload, response_topic or "", correlation or b"")
        cached = self._replies.get(key) if response_topic and correlation else None
        if cached is not None and response_topic is not None:
            await self.announce.reply(response_topic, *cached, correlation)  # a replay
            return
        async with self.lock:
            try:
                if name in self._vanished and op != ParticipantOp.GONE:
                    # A restarted participant: its old connection's will comes first.
                    await self._expire_gone(self.now(), only=name)
                body, ctype = await self._dispatch(name, op, payload, will=response_topic is None)
            except StoreError:
                # The disk is the truth and it cannot be written: stop, and say so,
                # since a stop by exception disconnects cleanly (no will).
                log.critical("%s %s: the store failed; stopping", name or "operator", op)
                await self.announce.daemon(self.daemon_status("offline"))
                raise
            except KhodError as exc:
                log.info("%s %s refused: %s", name or "operator", op, exc)
                body, ctype = _error(op, exc), JSON
            except Exception as exc:  # the daemon never dies of one request
                log.exception("%s %s: internal error", name or "operator", op)
                err = Reply(op=op, ok=False, error=ErrorBody(code="internal", message=repr(exc)))
                body, ctype = encode(err), JSON
            await self.announce.flush()
        if response_topic is None:
            return
        if correlation:
            self._replies.put(key, body, ctype)
        await self.announce.reply(response_topic, body, ctype, correlation)

    def _reply_allowed(self, name: str | None, response_topic: str) -> bool:
        # The daemon may write anywhere under its prefix; never let a request
        # steer it into writing someone else's topics (or a wildcard).
        if name is None:
            client = response_topic.removeprefix(self.topics.control_reply(""))
            return client != response_topic and names.HOST_RE.fullmatch(client) is not None
        return response_topic == self.topics.reply(name)

    async def _stale_state(self, topic: str, payload: bytes) -> None:
        """A retained state of a participant nobody knows any more: clear it."""
        prefix, suffix = self.topics.prefix + "/p/", "/state"
        if not (payload and topic.startswith(prefix) and topic.endswith(suffix)):
            return
        if self.participant_status(topic[len(prefix) : -len(suffix)]) is None:
            await self.announce.clear(topic)

    async def _dispatch(
        self, name: str | None, op: str, payload: bytes, *, will: bool
    ) -> tuple[bytes, str]:
        # Fragments travel raw both ways; everything else is a JSON body.
        if name is not None and op == ParticipantOp.FRAGMENT:
            return await self._fragment(name, payload)
        if name is not None and op == ParticipantOp.RETRIEVE:
            decode(EmptyRequest, payload)
            return await self._retrieve(name), DTB
        if name is not None and op == ParticipantOp.GONE:
            decode(EmptyRequest, payload)
            return _ok(op, await self._gone(name, will=will)), JSON
        handler = (CONTROL_OPS if name is None else PARTICIPANT_OPS).get(op)
        if handler is None:
            raise ProtocolError(f"unknown operation {op!r}")
        req = decode(REQUEST_MODELS.get(op, EmptyRequest), payload)
        return _ok(op, await handler(self, name or "", req)), JSON

    def _dump(self, name: str) -> dict[str, Any] | None:
        status = self.participant_status(name)
        return None if status is None else status.model_dump()

    # -- participant operations ----------------------------------------------

    async def _register(self, name: str, req: Any) -> dict[str, Any]:
        assert isinstance(req, RegisterRequest)
        changes = self.out.register(
            name,
            req.compatible,
            req.instance,
            freeze_after=req.freeze_after,
            restore_after=req.restore_after,
            now=self.now(),
        )
        await self._apply(changes)
        return {"participant": self._dump(name), "handover": self.handover_status().model_dump()}

    async def _fragment(self, name: str, blob: bytes) -> tuple[bytes, str]:
        limit = self.settings.max_fragment_size
        if len(blob) > limit:
            raise FragmentTooLarge(f"fragment of {len(blob)} bytes exceeds {limit}")
        # Refuse a participant that may not submit before spending a full check on its blob.
        p = self.out.submittable(name)
        info = validate_fragment(blob, compatible=p.compatible, instance=p.instance, max_size=limit)
        changes = self.out.submit(name, info.size, info.sha256_hex, now=self.now())
        await self._apply(changes, fragment=(name, blob, info.sha256_hex))
        handover = self.handover_status().model_dump()
        data = {"size": info.size, "sha256": info.sha256_hex, "handover": handover}
        return _ok(ParticipantOp.FRAGMENT, data), JSON

    async def _revise(self, name: str, req: Any) -> dict[str, Any]:
        await self._apply(self.out.revise(name, now=self.now()))
        return {"participant": self._dump(name)}

    async def _frozen(self, name: str, req: Any) -> dict[str, Any]:
        changes = self.out.frozen(name, now=self.now())
        await self._apply(changes)
        if changes.assemble:
            # The last participant's reply waits for the commit, so that its
            # acknowledgement means the payload is on disk, and says how it went.
            await self._assemble_and_commit()
        return {"participant": self._dump(name), "handover": self.handover_status().model_dump()}

    async def _fail(self, name: str, req: Any) -> dict[str, Any]:
        assert isinstance(req, FailRequest)
        await self._apply(self.out.fail(name, req.reason, now=self.now()))
        return {"participant": self._dump(name)}

    async def _gone(self, name: str, *, will: bool) -> dict[str, Any]:
        if self.inc is not None and name in self.inc.claims and name not in self.out.participants:
            return {}  # a restoring component that restarts will retrieve again
        self.out.participant(name)  # unknown: say so now
        if not will:
            # Said on purpose, with a reply expected: acknowledged means done.
            await self._apply(self.out.gone(name, now=self.now()))
            return {}
        # A broker that shuts down cleanly publishes every client's will, then
        # drops us too. So a will counts only if our own connection outlives
        # it by the grace period: a crashed participant's does, a broker
        # restart's does not.
        self._vanished[name] = (self.now() + self.settings.gone_grace, self.epoch())
        return {}

    async def _expire_gone(self, now: float, *, only: str | None = None) -> None:
        epoch = self.epoch()
        for name, (when, then) in list(self._vanished.items()):
            if only is not None and name != only:
                continue
            if epoch != then:
                log.info("ignoring the will of %s: the broker went away at the same time", name)
                del self._vanished[name]
            elif when <= now or only is not None:
                del self._vanished[name]
                if name in self.out.participants:
                    await self._apply(self.out.gone(name, now=now))

    def _incoming(self, name: str, what: str) -> Incoming:
        if self.inc is None:
            raise Busy(f"{name!r} cannot {what}: this host has no incoming payload")
        return self.inc

    async def _retrieve(self, name: str) -> bytes:
        inc = self._incoming(name, "retrieve")
        assert self.image is not None
        inc.claim(name)  # unknown-participant before anything else
        blob = self.image.retrieve(name)
        changes = inc.retrieve(name, now=self.now())
        await self._apply_incoming(changes)
        return blob

    async def _finish(self, name: str, req: Any) -> dict[str, Any]:
        changes = self._incoming(name, "finish").finish(name, now=self.now())
        await self._apply_incoming(changes)
        return {"participant": self._dump(name), "handover": self.handover_status().model_dump()}

    # -- operator operations -------------------------------------------------

    async def _begin(self, name: str, req: Any) -> dict[str, Any]:
        assert isinstance(req, BeginRequest)
        if self.inc is not None and self.inc.state is not HostRestoreState.RELEASED:
            raise Busy("cannot begin: the incoming payload is still being restored")
        now = self.now()
        changes = self.out.begin(
            str(uuid.uuid4()),
            deadline=now + (req.deadline or self.settings.handover_deadline),
            expect=req.expect,
            auto_freeze=req.auto_freeze,
            now=now,
        )
        leaving_restore = self.inc is not None
        with self.store.transaction():
            if self.inc is not None:
                self.store.set_meta("restored", self.inc.handover_id)
                self.store.clear_restore()
            self._persist(changes)
        if leaving_restore:
            self.inc = self.image = self.image_path = None
            await self.announce.daemon(self.daemon_status("online"))
        await self._announce(changes)
        return {"handover": self.handover_status().model_dump()}

    async def _freeze(self, name: str, req: Any) -> dict[str, Any]:
        assert isinstance(req, FreezeRequest)
        left_before = set(self.out.handover.left_out)
        await self._apply(self.out.freeze(force=req.force, now=self.now()))
        return {
            "handover": self.handover_status().model_dump(),
            "left_out": sorted(set(self.out.handover.left_out) - left_before),
        }

    async def _abort(self, name: str, req: Any) -> dict[str, Any]:
        assert isinstance(req, AbortRequest)
        await self._apply(self.out.abort(req.reason, now=self.now()))
        return {"handover": self.handover_status().model_dump()}

    async def _status(self, name: str, req: Any) -> dict[str, Any]:
        everyone = sorted(set(self.out.participants) | set(self.inc.claims if self.inc else ()))
        return {
            "daemon": self.daemon_status("online").model_dump(),
            "handover": self.handover_status().model_dump(),
            "participants": [self._dump(n) for n in everyone],
        }

    async def tick(self) -> None:
        """Deadlines: abort a late handover, release a late restore."""
        async with self.lock:
            now = self.now()
            await self._expire_gone(now)
            await self._apply(self.out.check_deadline(now=now))
            if self.inc is not None:
                changes = self.inc.check_deadline(now=now)
                if changes:
                    log.warning("restore deadline passed; unclaimed: %s", self.inc.unclaimed)
                    await self._apply_incoming(changes)
            # A burst that never drained still shows its state within a tick.
            await self.announce.flush(force=True)

    # -- the last step -------------------------------------------------------

    async def _assemble_and_commit(self) -> None:
        h = self.out.handover
        if h.state is HandoverState.FROZEN:
            self._persist(self.out.assembled())
        try:
            image, manifest = assembly.build(self.out, self.store, base=self.settings.payload_base)
        except KhodError as exc:
            log.error("assembly failed: %s", exc)
            await self._apply(self.out.abort(f"assembly failed: {exc}", now=self.now()))
            return
        # The operator's command may not hold the handover past its deadline.
        timeout = max(1.0, (h.deadline or 0) - self.now())
        try:
            info = await backend.commit(self.settings, image, manifest, timeout=timeout)
        except KhodError as exc:
            log.error("commit failed: %s", exc)
            await self._apply(self.out.abort(f"commit failed: {exc}", now=self.now()))
            return
        info["blackout_s"] = round(self.now() - (h.freeze_at or self.now()), 6)
        changes = self.out.committed(info, now=self.now())
        with self.store.transaction():
            self.store.set_meta("boot_id", boot_id())
            self._persist(changes)
        await self._announce(changes)
        log.info("handover %s committed: %s", h.id, info)


def _ok(op: str, data: dict[str, Any]) -> bytes:
    return encode(Reply(op=op, ok=True, data=data))


def _error(op: str, exc: KhodError) -> bytes:
    return encode(Reply(op=op, ok=False, error=ErrorBody(code=exc.code, message=str(exc))))


Handler = Callable[[Daemon, str, Any], Awaitable[dict[str, Any]]]
PARTICIPANT_OPS: dict[str, Handler] = {
    ParticipantOp.REGISTER: Daemon._register,
    ParticipantOp.REVISE: Daemon._revise,
    ParticipantOp.FROZEN: Daemon._frozen,
    ParticipantOp.FAIL: Daemon._fail,
    ParticipantOp.FINISH: Daemon._finish,
}
CONTROL_OPS: dict[str, Handler] = {
    ControlOp.BEGIN: Daemon._begin,
    ControlOp.FREEZE: Daemon._freeze,
    ControlOp.ABORT: Daemon._abort,
    ControlOp.STATUS: Daemon._status,
}
