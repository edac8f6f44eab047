"""The daemon: the parts of the request path, wired together.

A message goes one way: ``khod.router`` (topic, response topic, reply
cache; a typed request on the queue) -> ``khod.worker`` (batches) ->
``khod.ops`` (one handler per operation, calling the pure core in
``khod.handover`` / ``khod.restore``) -> ``khod.persist`` (the batch's
changes, durable in one transaction) -> ``khod.publish`` (the retained
states and the replies, in order). ``khod.commit`` assembles and commits
outside the worker; ``khod.boot`` decides at start-up what to restore;
``khod.host`` holds the live state they share and the statuses it shows.

Every status carries a sequence number, stamped when its record changes and
persisted with it: a client never acts on a status older than one it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

from khod import boot
from khod.announce import Announcer, Publisher
from khod.boot import boot_id
from khod.commit import Committer
from khod.config import Settings
from khod.handover import Outgoing
from khod.host import Host
from khod.ops import Ops
from khod.payload import PayloadImage
from khod.persist import REPLIES_KEPT, Persister
from khod.publish import BatchPublisher
from khod.replies import ReplyCache
from khod.restore import Incoming
from khod.router import Router
from khod.store import Store
from khod.worker import Batch, Op, Worker
from khod_wire.errors import StoreError
from khod_wire.protocol import (
    DaemonStatus,
    HandoverSignal,
    HandoverStatus,
    ParticipantStatus,
    Topics,
)

__all__ = ["Daemon", "boot_id"]

log = logging.getLogger(__name__)


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
        self.topics = Topics(settings.host_id)
        self.announce = Announcer(publisher, self.topics)
        self.host = Host(store, clock)
        self.worker = Worker(self._flush)
        self.persist = Persister(self.host, store)
        self.publisher = BatchPublisher(self.host, self.announce)
        self.commit = Committer(settings, self.host, self.persist, self.worker)
        self.ops = Ops(settings, self.host, self.persist, self.commit, epoch)
        self._replies = ReplyCache(max_entries=REPLIES_KEPT)
        for key, body, ctype in store.load_replies():
            self._replies.put(key, body, ctype)
        self.router = Router(
            self.host, self.topics, self.announce, self.worker, self.ops, self.commit, self._replies
        )

    # -- the live state, as service.py, luo_service.py and tests read it ---

    @property
    def out(self) -> Outgoing:
        return self.host.out

    @property
    def inc(self) -> Incoming | None:
        return self.host.inc

    @property
    def image(self) -> PayloadImage | None:
        return self.host.image

    @property
    def fragments(self) -> dict[str, bytes]:
        return self.host.fragments

    def daemon_status(self, state: Literal["online", "offline"]) -> DaemonStatus:
        return self.host.daemon_status(state)

    def handover_signal(self) -> HandoverSignal:
        return self.host.handover_signal()

    def handover_status(self) -> HandoverStatus:
        return self.host.handover_status()

    def participant_status(self, name: str) -> ParticipantStatus | None:
        return self.host.participant_status(name)

    # -- start-up ------------------------------------------------------------

    def load_incoming(self, explicit: Path | None, *, handed_over: Path | None = None) -> None:
        """Decide whether this boot restores a payload, and load it (see khod.boot)."""
        boot.load_incoming(self.host, self.store, self.settings, explicit, handed_over=handed_over)

    async def resume(self) -> None:
        """Finish what a killed daemon left half-done: assembly and commit."""
        await self.call(lambda batch: boot.resume(self.host, self.persist, batch))

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
        await self.router.handle(topic, payload, response_topic, correlation, retain=retain)

    # -- the worker ----------------------------------------------------------

    def submit(self, op: Op) -> asyncio.Future[None]:
        """Queue ``op`` for the worker; the future is done once its batch is announced."""
        return self.worker.submit(op)

    async def call(self, op: Op) -> None:
        await self.worker.call(op)

    async def run(self) -> None:
        """The worker: apply what is queued, in batches, until cancelled."""
        await self.worker.run()

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
            await self.commit.wait()
            await self.call(lambda batch: None)
            if not self.commit.running():
                return

    async def _flush(self, batch: Batch) -> None:
        """Make the batch durable, then announce it."""
        self.ops.release_held_replies(batch)
        began = time.monotonic()
        try:
            await self.persist.write(batch)
        except StoreError:
            # The disk is the truth and it cannot be written: stop, and say
            # so, since a stop by exception disconnects cleanly (no will).
            log.critical("the store failed; stopping")
            await self.announce.daemon(self.host.daemon_status("offline"))
            raise
        self.router.answered(batch)
        written = time.monotonic()
        if batch.commit:
            # The last frozen is durable: the payload goes first, and this
            # batch's replies (the last one's is held) while its image is
            # written in a thread.
            self.commit.start()
            await asyncio.sleep(0)
        sent = await self.publisher.send(batch)
        log.debug(
            "batch: %d replies, %d writes durable in %.1f ms, %d publishes queued in %.1f ms (%s)",
            len(batch.replies),
            len(batch.writes),
            (written - began) * 1e3,
            sent,
            (time.monotonic() - written) * 1e3,
            self.host.out.handover.state,
        )

    # -- time and (re)connects -----------------------------------------------

    async def tick(self) -> None:
        """Deadlines: abort a late handover, release a late restore; then the progress."""
        await self.call(self.ops.deadlines)
        await self.publish_progress()

    async def publish_all(self) -> None:
        """Everything retained, again: after each (re)connect."""
        host = self.host

        def everything(batch: Batch) -> None:
            batch.daemon = batch.signal = True
            claims = set(host.inc.claims) if host.inc is not None else set()
            for name in sorted(set(host.out.participants) | claims):
                batch.participants[name] = None
            host.progress_dirty = True

        await self.call(everything)

    async def publish_offline(self) -> None:
        # Through the worker: a request in flight finishes (and is answered) first.
        async def offline(batch: Batch) -> None:
            await self.announce.daemon(self.host.daemon_status("offline"))

        await self.call(offline)

    async def publish_progress(self) -> None:
        """The detailed status for monitors, if it changed (called at a bounded rate)."""
        if self.host.progress_dirty:
            self.host.progress_dirty = False
            await self.announce.progress(self.host.handover_status())
