"""The daemon's request handling: bus -> lifecycle -> store -> payload.

Theory of operation
-------------------
The bus hands every message to :meth:`Daemon.handle`, which does what needs
no state (topic, retain flag, response topic, reply cache) and queues the
rest. One worker task drains the queue in **batches**: every queued request
is applied to the aggregates in order (``Outgoing`` always, ``Incoming``
after a kexec), and what the whole batch changed is made durable in **one**
store transaction, one fsync, in a worker thread, so that the event loop
keeps reading the next requests meanwhile. Only then are the retained
states published and the replies sent, in order. So nothing is acknowledged
before it is durable, and a burst of N requests costs one fsync, not N.

Every status carries a sequence number, stamped when its record changes and
persisted with it: a client never acts on a status older than one it saw.

The commit of the payload runs in a task of its own, outside the worker, so
that a slow ``exec`` command never stops requests (an abort, say) from being
served, nor the watchdog from being fed.

Bad input never escapes as an exception: every ``KhodError`` becomes an
error reply with its code; anything unexpected is logged and answered as
``internal``. A ``StoreError`` is the exception: the disk is the truth, and
a daemon that cannot write it must stop (systemd restarts it, and it
resumes from what is on disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from khod import __version__, assembly, backend
from khod.announce import Announcer, Publisher
from khod.config import Settings
from khod.handover import Changes, Outgoing, Participant
from khod.handover import Handover as HandoverRecord
from khod.lifecycle import HandoverState, HostRestoreState, ParticipantState, RestoreState
from khod.payload import PayloadImage
from khod.replies import Key, ReplyCache
from khod.restore import Claim, Incoming
from khod.status import (
    claim_status,
    incoming_signal,
    incoming_status,
    outgoing_signal,
    outgoing_status,
    participant_status,
)
from khod.store import Store
from khod_wire import identity
from khod_wire.errors import (
    Busy,
    ConfigError,
    FragmentTooLarge,
    KhodError,
    PayloadError,
    ProtocolError,
    StoreError,
)
from khod_wire.fragment import validate_fragment
from khod_wire.protocol import (
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
    HandoverSignal,
    HandoverStatus,
    ParticipantOp,
    ParticipantStatus,
    RegisterRequest,
    Reply,
    Request,
    Topics,
    check_correlation,
    decode,
    encode,
)
from khod_wire.transport import Publication

log = logging.getLogger(__name__)

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
#: Replies kept (in memory and on disk) to answer a re-sent request alike.
REPLIES_KEPT = 4096
#: A restarted daemon's sequence numbers start this far above the last one
#: persisted: statuses it published but had not persisted (the assembled
#: state, say) stay older than anything it publishes next.
SEQ_RESTART_GAP = 1 << 20
#: Handover states of the blackout (freeze signal to commit).
BLACKOUT = frozenset({HandoverState.FREEZING, HandoverState.FROZEN, HandoverState.ASSEMBLED})
#: Seconds the operator's undo command may take when a payload is withdrawn.
WITHDRAW_TIMEOUT = 60.0


def boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return "unknown"


@dataclass
class Batch:
    """What one batch of requests changed: written together, then announced."""

    writes: list[Callable[[Store], None]] = field(default_factory=list)
    participants: dict[str, None] = field(default_factory=dict)  # ordered set
    signal: bool = False
    daemon: bool = False
    replies: list[tuple[str, bytes, str, bytes | None, Key | None]] = field(default_factory=list)
    #: participants that sent a request in this batch (see Daemon._flush)
    asked: set[str] = field(default_factory=set)
    commit: bool = False
    done: list[asyncio.Future[None]] = field(default_factory=list)


Op = Callable[["Batch"], Awaitable[None] | None]


class Daemon:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        publisher: Publisher,
        *,
        clock: Callable[[], float] = time.time,
        epoch: Callable[[], int] = lambda: 0,
    ) -> None:
        self.settings = settings
        self.store = store
        self.now = clock
        #: changes whenever the bus connection drops or comes back
        self.bus_epoch = epoch
        self.topics = Topics(settings.host_id)
        self.announce = Announcer(publisher, self.topics)
        self.out = Outgoing(
            HandoverRecord.from_record(h) if (h := store.load_handover()) else None,
            (Participant.from_record(r) for r in store.load_participants().values()),
        )
        self.inc: Incoming | None = None
        self.image: PayloadImage | None = None
        self.image_path: Path | None = None
        self.started_at = clock()
        # Sequence numbers: persisted with every record they stamp; see SEQ_RESTART_GAP.
        self.epoch_id = store.get_meta("epoch") or uuid.uuid4().hex[:12]
        self.seq = int(store.get_meta("seq") or 0) + SEQ_RESTART_GAP
        with store.transaction():
            store.set_meta("epoch", self.epoch_id)
            store.set_meta("seq", str(self.seq))
        # The fragments of the running handover, validated and hashed on
        # arrival, so that assembly never reads or hashes them again.
        self.fragments: dict[str, bytes] = {}
        for p in self.out.participants.values():
            if p.fragment_sha256 is not None and (blob := store.get_fragment(p.name)):
                self.fragments[p.name] = blob
        self._replies = ReplyCache(max_entries=REPLIES_KEPT)
        for key, body, ctype in store.load_replies():
            self._replies.put(key, body, ctype)
        #: participants whose will arrived: name -> (when it counts, bus epoch then)
        self._vanished: dict[str, tuple[float, int]] = {}
        self._queue: deque[tuple[Op, asyncio.Future[None] | None]] = deque()
        self._wake = asyncio.Event()
        self._batch: Batch | None = None
        self._commit: asyncio.Task[None] | None = None
        #: replies held until the commit is over: (response topic, correlation, key, name)
        self._after_commit: list[tuple[str, bytes | None, Key | None, str]] = []
        self._hold_reply = False
        #: writes of a state announced before it is made durable (see assembled)
        self._carried: list[Callable[[Store], None]] = []
        #: participants whose own state waits for the end of the blackout
        self._held_states: set[str] = set()
        #: keys of requests queued or waiting for the commit, not answered yet
        self._inflight: set[Key] = set()
        self._progress_dirty = True

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
        inc.seq = self._next_seq()
        for c in inc.claims.values():
            c.seq = self._next_seq()
        self._new_boot(inc, detail=str(path))

    def _new_boot(self, inc: Incoming | None, *, detail: str) -> None:
        """Forget the old boot's components (they register anew) and its handover."""
        self.inc = inc
        with self.store.transaction():
            for name in list(self.out.participants):
                self.store.delete_participant(name)
                self.store.delete_fragment(name)
            self.out = Outgoing()
            self.out.handover.seq = self._next_seq()
            self.fragments.clear()
            self.store.save_handover(self.out.handover.to_record())
            if inc is None:
                self.store.clear_restore()
            else:
                self.store.save_restore(self._incoming_record())
            state = "failed" if inc is None else str(inc.state)
            self.store.record_transition("restore", "start", None, state, detail=detail)
            self.store.set_meta("seq", str(self.seq))

    async def resume(self) -> None:
        """Finish what a killed daemon left half-done: assembly and commit."""

        def step(batch: Batch) -> None:
            # A handover whose deadline passed while the daemon was down aborts.
            self._stage(self.out.check_deadline(now=self.now()))
            state = self.out.handover.state
            if state in (HandoverState.FROZEN, HandoverState.ASSEMBLED):
                log.info("resuming handover %s from %s", self.out.handover.id, state)
                batch.commit = True

        await self.call(step)

    # -- the worker ----------------------------------------------------------

    def submit(self, op: Op) -> asyncio.Future[None]:
        """Queue ``op`` for the worker; the future is done once its batch is announced."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((op, fut))
        self._wake.set()
        return fut

    async def call(self, op: Op) -> None:
        await self.submit(op)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Daemon]:
        """The worker, for as long as the block runs (``service`` runs it in its TaskGroup)."""
        task = asyncio.create_task(self.run(), name="worker")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def settled(self) -> None:
        """Until nothing is queued and no commit is under way."""
        while True:
            commit = self._commit
            if commit is not None and not commit.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({commit})
            await self.call(lambda batch: None)
            if self._commit is None or self._commit.done():
                return

    async def run(self) -> None:
        """The worker: apply what is queued, in batches, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = Batch()
                self._batch = batch
                try:
                    while self._queue:
                        op, fut = self._queue.popleft()
                        if fut is not None:
                            batch.done.append(fut)
                        result = op(batch)
                        if result is not None:
                            await result
                    self._release_held_replies(batch)
                    await self._flush(batch)
                except BaseException as exc:
                    for fut in batch.done:
                        if not fut.done():
                            fut.set_exception(exc)
                    raise
                finally:
                    self._batch = None
                for fut in batch.done:
                    if not fut.done():
                        fut.set_result(None)
                if batch.commit:
                    self._start_commit()

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _stage(self, changes: Changes) -> None:
        """Record what ``changes`` changed in the current batch (stamped, to write, to announce)."""
        batch = self._batch
        assert batch is not None, "changes outside of the worker"
        if not changes:
            return
        self._progress_dirty = True
        out = self.out
        if changes.handover:
            # A new state is a signal (a new number, a broadcast to everyone);
            # a participant joining a preparing handover is not.
            subjects = {t.subject for t in changes.transitions}
            if self.inc is not None and "restore" in subjects:
                self.inc.seq = self._next_seq()
                batch.signal = True
            elif "handover" in subjects:
                out.handover.seq = self._next_seq()
                batch.signal = True
            record = out.handover.to_record()
            batch.writes.append(lambda s: s.save_handover(record))
        for name in changes.participants:
            p = out.participants.get(name)
            if p is not None and name not in changes.removed:
                p.seq = self._next_seq()
                rec = p.to_record()
                batch.writes.append(lambda s, n=name, r=rec: s.save_participant(n, r))  # type: ignore[misc]
            if self.inc is not None and name in self.inc.claims:
                # Its state topic shows the claim (and its new registration, if any).
                self.inc.claims[name].seq = self._next_seq()
            batch.participants[name] = None
        for name in changes.removed:
            batch.writes.append(lambda s, n=name: s.delete_participant(n))  # type: ignore[misc]
            batch.participants[name] = None
        for name in changes.drop_fragments:
            self.fragments.pop(name, None)
            batch.writes.append(lambda s, n=name: s.delete_fragment(n))  # type: ignore[misc]
        for t in changes.transitions:
            batch.writes.append(
                lambda s, t=t: s.record_transition(  # type: ignore[misc]
                    t.subject, t.event, t.from_state, t.to_state, detail=t.detail
                )
            )
        if self.inc is not None and any(n in self.inc.claims for n in changes.participants):
            # Claims' sequence numbers are part of the incoming record.
            record = self._incoming_record()
            batch.writes.append(lambda s: s.save_restore(record))
        batch.commit |= changes.assemble

    async def _flush(self, batch: Batch) -> None:
        """Make the batch durable (one transaction, off the event loop), then announce it."""
        began = time.monotonic()
        for _, body, ctype, _, key in batch.replies:
            # Raw fragments are not kept on disk: retrieve is idempotent anyway.
            if key is not None and ctype != DTB:
                batch.writes.append(
                    lambda s, k=key, b=body, c=ctype: s.put_reply(k, b, c)  # type: ignore[misc]
                )
        if batch.writes:
            seq = str(self.seq)
            writes, self._carried = self._carried + batch.writes, []
            replies = any(key is not None for *_, key in batch.replies)

            def write() -> None:
                with self.store.transaction():
                    for w in writes:
                        w(self.store)
                    self.store.set_meta("seq", seq)
                    if replies:
                        self.store.forget_replies(keep=REPLIES_KEPT)

            try:
                await asyncio.to_thread(write)
            except StoreError:
                # The disk is the truth and it cannot be written: stop, and say
                # so, since a stop by exception disconnects cleanly (no will).
                log.critical("the store failed; stopping")
                await self.announce.daemon(self.daemon_status("offline"))
                raise
        for key, body, ctype in ((k, b, c) for _, b, c, _, k in batch.replies):
            if key is not None:
                self._replies.put(key, body, ctype)
                self._inflight.discard(key)
        # In order: the daemon, the signal, the states, then the replies that
        # caused them; sent together, acknowledged together.
        a = self.announce
        sends: list[Publication] = []
        if batch.daemon:
            sends.append(a.daemon_of(self.daemon_status("online")))
        # Inside the blackout, a participant's own new state (serialized,
        # frozen) is news to nobody on the critical path: its reply says it,
        # monitors see the counts on progress. Held until the commit or the
        # abort, it does not cost each participant one more message while the
        # others freeze. A change another caused (may_freeze, left out) is a
        # signal to that participant: it goes at once.
        blackout = self.inc is None and self.out.handover.state in BLACKOUT
        names = list(batch.participants)
        released: list[str] = []
        if blackout:
            held = batch.asked.intersection(names)
            self._held_states |= held
            names = [n for n in names if n not in held]
        else:
            released = [n for n in sorted(self._held_states) if n not in batch.participants]
            self._held_states.clear()
        # The states held through a commit go before it: whoever sees
        # "committed" sees every participant frozen.
        for name in released:
            sends.append(a.state_of(name, self.participant_status(name)))
        if batch.signal:
            sends.append(a.signal_of(self.handover_signal()))
        for name in names:
            sends.append(a.state_of(name, self.participant_status(name)))
        for topic, body, ctype, correlation, _ in batch.replies:
            sends.append(a.reply_of(topic, body, ctype, correlation))
        written = time.monotonic()
        await a.send(sends)
        log.debug(
            "batch: %d replies, %d writes durable in %.1f ms, %d publishes queued in %.1f ms (%s)",
            len(batch.replies),
            len(batch.writes),
            (written - began) * 1e3,
            len(sends),
            (time.monotonic() - written) * 1e3,
            self.out.handover.state,
        )

    # -- what is shown -------------------------------------------------------

    def daemon_status(self, state: Literal["online", "offline"]) -> DaemonStatus:
        return DaemonStatus(
            version=__version__,
            state=state,
            side="incoming" if self.inc is not None else "outgoing",
            pid=os.getpid(),
            since=self.started_at,
        )

    def handover_signal(self) -> HandoverSignal:
        if self.inc is not None:
            return incoming_signal(self.inc, epoch=self.epoch_id, now=self.now())
        return outgoing_signal(self.out, epoch=self.epoch_id, now=self.now())

    def handover_status(self) -> HandoverStatus:
        if self.inc is not None:
            return incoming_status(self.inc, epoch=self.epoch_id, now=self.now())
        return outgoing_status(self.out, epoch=self.epoch_id, now=self.now())

    def participant_status(self, name: str) -> ParticipantStatus | None:
        if self.inc is not None and name in self.inc.claims:
            return claim_status(
                self.inc, name, self.out.participants.get(name), epoch=self.epoch_id
            )
        if name not in self.out.participants:
            return None
        return participant_status(self.out, name, epoch=self.epoch_id)

    async def publish_all(self) -> None:
        """Everything retained, again: after each (re)connect."""

        def everything(batch: Batch) -> None:
            batch.daemon = batch.signal = True
            claims = set(self.inc.claims) if self.inc is not None else set()
            for name in sorted(set(self.out.participants) | claims):
                batch.participants[name] = None
            self._progress_dirty = True

        await self.call(everything)

    async def publish_offline(self) -> None:
        # Through the worker: a request in flight finishes (and is answered) first.
        async def offline(batch: Batch) -> None:
            await self.announce.daemon(self.daemon_status("offline"))

        await self.call(offline)

    async def publish_progress(self) -> None:
        """The detailed status for monitors, if it changed (called at a bounded rate)."""
        if self._progress_dirty:
            self._progress_dirty = False
            await self.announce.progress(self.handover_status())

    def _incoming_record(self) -> dict[str, Any]:
        assert self.inc is not None
        return {
            "handover_id": self.inc.handover_id,
            "image": str(self.image_path),
            "incoming": self.inc.to_record(),
        }

    # -- the request path ----------------------------------------------------

    async def handle(
        self,
        topic: str,
        payload: bytes,
        props: tuple[Any, ...],
        *,
        retain: bool = False,
    ) -> None:
        """One message from the bus. Never raises for bad input; never waits for the disk."""
        _, response_topic, correlation = props
        try:
            name, op = self.topics.parse_request(topic)
        except ProtocolError:
            self.submit(lambda batch: self._stale_state(topic, payload))
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
        if response_topic is not None and not await self._correlation_ok(
            op, response_topic, correlation
        ):
            return
        key = None
        if response_topic and correlation:
            key = self._replies.key(topic, payload, response_topic, correlation)
            cached = self._replies.get(key)
            if cached is not None:
                await self.announce.reply(response_topic, *cached, correlation)  # a replay
                return
            if key in self._inflight:
                return  # a replay of a request not answered yet: its reply will come
            self._inflight.add(key)

        async def execute(batch: Batch) -> None:
            self._hold_reply = False
            if name is not None:
                batch.asked.add(name)
            if name is None and op == ControlOp.ABORT and self._committed():
                body, ctype = await self._withdraw(payload)
            else:
                body, ctype = self._execute(name, op, payload, will=response_topic is None)
            if response_topic is None:
                return
            if self._hold_reply and name is not None:
                # The last frozen: its acknowledgement means the payload is
                # committed (or says why not), so it waits for the commit.
                self._after_commit.append((response_topic, correlation, key, name))
            else:
                batch.replies.append((response_topic, body, ctype, correlation, key))

        self._queue.append((execute, None))
        self._wake.set()

    def _execute(
        self, name: str | None, op: str, payload: bytes, *, will: bool
    ) -> tuple[bytes, str]:
        who = name or "operator"
        try:
            if name in self._vanished and op != ParticipantOp.GONE:
                # A restarted participant: its old connection's will comes first.
                self._expire_gone(self.now(), only=name)
            return self._dispatch(name, op, payload, will=will)
        except StoreError:
            raise
        except KhodError as exc:
            log.info("%s %s refused: %s", who, op, exc)
            return _error(op, exc), JSON
        except Exception as exc:  # the daemon never dies of one request
            log.exception("%s %s: internal error", who, op)
            err = Reply(op=op, ok=False, error=ErrorBody(code="internal", message=repr(exc)))
            return encode(err), JSON

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
            await self.announce.reply(response_topic, _error(op, exc), JSON, correlation)
            return False
        return True

    async def _stale_state(self, topic: str, payload: bytes) -> None:
        """A retained state of a participant nobody knows any more: clear it."""
        prefix, suffix = self.topics.prefix + "/p/", "/state"
        if not (payload and topic.startswith(prefix) and topic.endswith(suffix)):
            return
        if self.participant_status(topic[len(prefix) : -len(suffix)]) is None:
            await self.announce.clear(topic)

    def _dispatch(
        self, name: str | None, op: str, payload: bytes, *, will: bool
    ) -> tuple[bytes, str]:
        # Fragments travel raw both ways; everything else is a JSON body.
        if name is not None and op == ParticipantOp.FRAGMENT:
            return self._fragment(name, payload)
        if name is not None and op == ParticipantOp.RETRIEVE:
            decode(EmptyRequest, payload)
            return self._retrieve(name), DTB
        if name is not None and op == ParticipantOp.GONE:
            decode(EmptyRequest, payload)
            return _ok(op, self._gone(name, will=will)), JSON
        handler = (CONTROL_OPS if name is None else PARTICIPANT_OPS).get(op)
        if handler is None:
            raise ProtocolError(f"unknown operation {op!r}")
        req = decode(REQUEST_MODELS.get(op, EmptyRequest), payload)
        return _ok(op, handler(self, name or "", req)), JSON

    def _dump(self, name: str) -> dict[str, Any] | None:
        status = self.participant_status(name)
        return None if status is None else status.model_dump()

    def _signal(self) -> dict[str, Any]:
        # O(1): replies carry the compact signal, never the detailed status.
        return self.handover_signal().model_dump()

    # -- participant operations ----------------------------------------------

    def _register(self, name: str, req: Request) -> dict[str, Any]:
        assert isinstance(req, RegisterRequest)
        changes = self.out.register(
            name,
            req.compatible,
            req.instance,
            freeze_after=req.freeze_after,
            restore_after=req.restore_after,
            now=self.now(),
        )
        self._stage(changes)
        return {"participant": self._dump(name), "handover": self._signal()}

    def _fragment(self, name: str, blob: bytes) -> tuple[bytes, str]:
        limit = self.settings.max_fragment_size
        if len(blob) > limit:
            raise FragmentTooLarge(f"fragment of {len(blob)} bytes exceeds {limit}")
        # Refuse a participant that may not submit before spending a full check on its blob.
        p = self.out.submittable(name)
        info = validate_fragment(blob, compatible=p.compatible, instance=p.instance, max_size=limit)
        changes = self.out.submit(name, info.size, info.sha256_hex, now=self.now())
        self._stage(changes)
        self.fragments[name] = blob
        sha = info.sha256_hex
        assert self._batch is not None
        self._batch.writes.append(lambda s: s.put_fragment(name, blob, sha))
        data = {
            "size": info.size,
            "sha256": sha,
            "participant": self._dump(name),
            "handover": self._signal(),
        }
        return _ok(ParticipantOp.FRAGMENT, data), JSON

    def _revise(self, name: str, req: Request) -> dict[str, Any]:
        self._stage(self.out.revise(name, now=self.now()))
        return {"participant": self._dump(name)}

    def _frozen(self, name: str, req: Request) -> dict[str, Any]:
        h, p = self.out.handover, self.out.participants.get(name)
        if (
            p is not None
            and p.state is ParticipantState.FROZEN
            and self.out.is_member(name)
            and h.state in (HandoverState.FROZEN, HandoverState.ASSEMBLED, HandoverState.COMMITTED)
        ):
            # Said again (a retry across a restart of the daemon): the same outcome.
            self._hold_reply = h.state is not HandoverState.COMMITTED
        else:
            changes = self.out.frozen(name, now=self.now())
            self._stage(changes)
            self._hold_reply = changes.assemble
        return {"participant": self._dump(name), "handover": self._signal()}

    def _release_held_replies(self, batch: Batch) -> None:
        if not self._after_commit or self.out.handover.state in (
            HandoverState.FROZEN,
            HandoverState.ASSEMBLED,
        ):
            return
        for topic, correlation, key, name in self._after_commit:
            body = _ok(
                ParticipantOp.FROZEN, {"participant": self._dump(name), "handover": self._signal()}
            )
            batch.replies.append((topic, body, JSON, correlation, key))
        self._after_commit.clear()

    def _fail(self, name: str, req: Request) -> dict[str, Any]:
        assert isinstance(req, FailRequest)
        self._abort_changes(self.out.fail(name, req.reason, now=self.now()))
        return {"participant": self._dump(name)}

    def _gone(self, name: str, *, will: bool) -> dict[str, Any]:
        if self.inc is not None and name in self.inc.claims and name not in self.out.participants:
            return {}  # a restoring component that restarts will retrieve again
        self.out.participant(name)  # unknown: say so now
        if not will:
            # Said on purpose, with a reply expected: acknowledged means done.
            self._abort_changes(self.out.gone(name, now=self.now()))
            return {}
        # A broker that shuts down cleanly publishes every client's will, then
        # drops us too. So a will counts only if our own connection outlives
        # it by the grace period: a crashed participant's does, a broker
        # restart's does not.
        self._vanished[name] = (self.now() + self.settings.gone_grace, self.bus_epoch())
        return {}

    def _expire_gone(self, now: float, *, only: str | None = None) -> None:
        epoch = self.bus_epoch()
        for name, (when, then) in list(self._vanished.items()):
            if only is not None and name != only:
                continue
            if epoch != then:
                log.info("ignoring the will of %s: the broker went away at the same time", name)
                del self._vanished[name]
            elif when <= now or only is not None:
                del self._vanished[name]
                if name in self.out.participants:
                    self._abort_changes(self.out.gone(name, now=now))

    def _incoming(self, name: str, what: str) -> Incoming:
        if self.inc is None:
            raise Busy(f"{name!r} cannot {what}: this host has no incoming payload")
        return self.inc

    def _retrieve(self, name: str) -> bytes:
        inc = self._incoming(name, "retrieve")
        assert self.image is not None
        claim = inc.claim(name)  # unknown-participant before anything else
        blob = self.image.retrieve(name)
        if claim.state is RestoreState.RETRIEVED:
            # Again (a restarted participant): the same bytes, while not released.
            inc.check_open(name, "retrieve its fragment")
        else:
            self._stage(inc.retrieve(name, now=self.now()))
        return blob

    def _finish(self, name: str, req: Request) -> dict[str, Any]:
        inc = self._incoming(name, "finish")
        if inc.claim(name).state is RestoreState.FINISHED:
            # Already done (a retry across a restart, say): the same outcome.
            return {"participant": self._dump(name), "handover": self._signal()}
        self._stage(inc.finish(name, now=self.now()))
        return {"participant": self._dump(name), "handover": self._signal()}

    # -- operator operations -------------------------------------------------

    def _begin(self, name: str, req: Request) -> dict[str, Any]:
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
        batch = self._batch
        assert batch is not None
        if self.inc is not None:
            restored = self.inc.handover_id
            batch.writes.append(lambda s: s.set_meta("restored", restored))
            batch.writes.append(lambda s: s.clear_restore())
            self.inc = self.image = self.image_path = None
            batch.daemon = True
        self._stage(changes)
        return {"handover": self.handover_status().model_dump()}

    def _freeze(self, name: str, req: Request) -> dict[str, Any]:
        assert isinstance(req, FreezeRequest)
        left_before = set(self.out.handover.left_out)
        self._stage(self.out.freeze(force=req.force, now=self.now()))
        return {
            "handover": self.handover_status().model_dump(),
            "left_out": sorted(set(self.out.handover.left_out) - left_before),
        }

    def _abort(self, name: str, req: Request) -> dict[str, Any]:
        assert isinstance(req, AbortRequest)
        self._abort_changes(self.out.abort(req.reason, now=self.now()))
        return {"handover": self.handover_status().model_dump()}

    def _committed(self) -> bool:
        return self.out.handover.state is HandoverState.COMMITTED and self.inc is None

    async def _withdraw(self, payload: bytes) -> tuple[bytes, str]:
        """``abort`` once committed: take the payload back, then everyone thaws."""
        op = ControlOp.ABORT
        try:
            req = decode(AbortRequest, payload)
            assert isinstance(req, AbortRequest)
            # Undone first: if the kernel may still boot into the payload,
            # nobody may thaw (the handover stays committed).
            await backend.withdraw_committed(self.settings, timeout=WITHDRAW_TIMEOUT)
        except KhodError as exc:
            log.error("withdrawing the payload of %s failed: %s", self.out.handover.id, exc)
            return _error(op, exc), JSON
        log.warning("payload of handover %s withdrawn: %s", self.out.handover.id, req.reason)
        self._stage(self.out.abort(req.reason, now=self.now()))
        return _ok(op, {"handover": self.handover_status().model_dump()}), JSON

    def _abort_changes(self, changes: Changes) -> None:
        """Stage changes that may abort the handover; an abort stops a commit under way."""
        if any(t.subject == "handover" and t.event == "abort" for t in changes.transitions):
            self._cancel_commit()
        self._stage(changes)

    def _status(self, name: str, req: Request) -> dict[str, Any]:
        everyone = sorted(set(self.out.participants) | set(self.inc.claims if self.inc else ()))
        return {
            "daemon": self.daemon_status("online").model_dump(),
            "handover": self.handover_status().model_dump(),
            "participants": [self._dump(n) for n in everyone],
        }

    async def tick(self) -> None:
        """Deadlines: abort a late handover, release a late restore; then the progress."""

        def deadlines(batch: Batch) -> None:
            now = self.now()
            self._expire_gone(now)
            self._abort_changes(self.out.check_deadline(now=now))
            if self.inc is not None:
                changes = self.inc.check_deadline(now=now)
                if changes:
                    log.warning("restore deadline passed; unclaimed: %s", self.inc.unclaimed)
                    self._stage(changes)

        await self.call(deadlines)
        await self.publish_progress()

    # -- the last step -------------------------------------------------------

    def _start_commit(self) -> None:
        h = self.out.handover
        if h.state not in (HandoverState.FROZEN, HandoverState.ASSEMBLED):
            return
        if self._commit is not None and not self._commit.done():
            return
        self._commit = asyncio.create_task(self._assemble_and_commit(h.id), name="commit")

    def _cancel_commit(self) -> None:
        if self._commit is not None and not self._commit.done():
            log.warning("cancelling the commit of handover %s", self.out.handover.id)
            self._commit.cancel()

    async def _assemble_and_commit(self, handover_id: str | None) -> None:
        h = self.out.handover

        def assembled(batch: Batch) -> None:
            if h.state is HandoverState.FROZEN and h.id == handover_id:
                written = len(batch.writes)
                self._stage(self.out.assembled())
                # Announced now, written with the commit (or the abort): a
                # daemon killed meanwhile resumes from frozen, which assembles
                # again; one fsync less inside the blackout.
                self._carried += batch.writes[written:]
                del batch.writes[written:]

        await self.call(assembled)
        try:
            image, manifest = assembly.build(
                self.out, self.fragments, base=self.settings.payload_base
            )
        except KhodError as exc:
            log.error("assembly failed: %s", exc)
            await self._abort_for(handover_id, f"assembly failed: {exc}")
            return
        # The operator's command may not hold the handover past its deadline.
        timeout = max(1.0, (h.deadline or 0) - self.now())
        try:
            info = await backend.commit(self.settings, image, manifest, timeout=timeout)
        except KhodError as exc:
            log.error("commit failed: %s", exc)
            await self._abort_for(handover_id, f"commit failed: {exc}")
            return

        def committed(batch: Batch) -> None:
            if h.state is not HandoverState.ASSEMBLED or h.id != handover_id:
                # Aborted while the image was being written: it must not stay.
                backend.withdraw(self.settings.payload_path)
                return
            info["blackout_s"] = round(self.now() - (h.freeze_at or self.now()), 6)
            batch.writes.append(lambda s: s.set_meta("boot_id", boot_id()))
            self._stage(self.out.committed(info, now=self.now()))
            log.info("handover %s committed: %s", h.id, info)

        await self.call(committed)

    async def _abort_for(self, handover_id: str | None, reason: str) -> None:
        def abort(batch: Batch) -> None:
            h = self.out.handover
            if h.id == handover_id and h.state in (HandoverState.FROZEN, HandoverState.ASSEMBLED):
                self._stage(self.out.abort(reason, now=self.now()))

        await self.call(abort)


def _ok(op: str, data: dict[str, Any]) -> bytes:
    return encode(Reply(op=op, ok=True, data=data))


def _error(op: str, exc: KhodError) -> bytes:
    return encode(Reply(op=op, ok=False, error=ErrorBody(code=exc.code, message=str(exc))))


Handler = Callable[[Daemon, str, Request], dict[str, Any]]
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
