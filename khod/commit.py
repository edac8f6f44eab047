"""The last step: assemble the payload and commit it, outside the request path.

The commit runs in a task of its own, not in the worker, so that a slow
``exec`` command never stops requests (an abort, say) from being served, nor
the watchdog from being fed. It re-enters the worker once, to record what it
did (assembled and committed together, or the abort), checking that the
handover is still the one it started for. ``withdraw`` is the way back once
committed: the operator's ``abort`` takes the payload back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from khod import assembly, backend
from khod.boot import boot_id
from khod.config import Settings
from khod.host import Host
from khod.payload_layout import Links
from khod.persist import Persister
from khod.replies import ok, refused
from khod.worker import Batch, Worker
from khod_wire.errors import KhodError
from khod_wire.protocol import COMMITTING_STATES, JSON, AbortRequest, ControlOp, HandoverState

log = logging.getLogger(__name__)

#: Seconds the operator's undo command may take when a payload is withdrawn.
WITHDRAW_TIMEOUT = 60.0


class Committer:
    def __init__(self, settings: Settings, host: Host, persist: Persister, worker: Worker) -> None:
        self.settings = settings
        self.host = host
        self.persist = persist
        self.worker = worker
        self._task: asyncio.Task[None] | None = None
        #: link nodes built as fragments arrive (``prepare``), joined at assembly
        self.links = Links()

    def prepare(self, name: str) -> None:
        """``name``'s fragment arrived: build its link node now, not in the blackout."""
        p = self.host.out.participants.get(name)
        if p is not None:
            assembly.prepare(self.links, p, self.host.fragments)

    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def wait(self) -> None:
        """Until the commit under way, if any, is over (however it ends)."""
        task = self._task
        if task is not None and not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task})

    async def finish_describing(self, timeout: float = 10.0) -> None:
        """Before a clean stop: let the manifest of a committed payload be written."""
        if self.running() and self.host.out.handover.state is HandoverState.COMMITTED:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wait(), timeout)

    def start(self) -> None:
        h = self.host.out.handover
        if h.state not in COMMITTING_STATES or self.running():
            return
        self._task = asyncio.create_task(self._assemble_and_commit(h.id), name="commit")

    def cancel(self) -> None:
        if self.running():
            assert self._task is not None
            log.warning("cancelling the commit of handover %s", self.host.out.handover.id)
            self._task.cancel()

    async def withdraw(self, batch: Batch, req: AbortRequest) -> tuple[bytes, str]:
        """``abort`` once committed: take the payload back, then everyone thaws."""
        op, host = ControlOp.ABORT, self.host
        try:
            # Undone first: if the kernel may still boot into the payload,
            # nobody may thaw (the handover stays committed).
            await backend.withdraw_committed(self.settings, timeout=WITHDRAW_TIMEOUT)
        except KhodError as exc:
            log.error("withdrawing the payload of %s failed: %s", host.out.handover.id, exc)
            return refused(op, exc), JSON
        log.warning("payload of handover %s withdrawn: %s", host.out.handover.id, req.reason)
        self.persist.stage(batch, host.out.abort(req.reason, now=host.now()))
        return ok(op, {"handover": host.handover_status().model_dump()}), JSON

    async def _assemble_and_commit(self, handover_id: str | None) -> None:
        host = self.host
        h = host.out.handover
        try:
            image, manifest = assembly.build(
                host.out, host.fragments, base=self.settings.payload_base, links=self.links
            )
        except KhodError as exc:
            log.error("assembly failed: %s", exc)
            await self._abort_for(handover_id, f"assembly failed: {exc}")
            return
        # The operator's command may not hold the handover past its deadline.
        timeout = max(1.0, (h.deadline or 0) - host.now())
        try:
            info = await backend.commit(self.settings, image, manifest, timeout=timeout)
        except KhodError as exc:
            log.error("commit failed: %s", exc)
            await self._abort_for(handover_id, f"commit failed: {exc}")
            return

        def committed(batch: Batch) -> None:
            if h.state not in COMMITTING_STATES or h.id != handover_id:
                # Aborted while the image was being written: it must not stay.
                backend.withdraw(self.settings.payload_path)
                return
            info["blackout_s"] = round(host.now() - (h.freeze_at or host.now()), 6)
            batch.writes.append(lambda s: s.set_meta("boot_id", boot_id()))
            # Assembled and committed are recorded together, in one durable
            # step: one batch less inside the blackout. A daemon killed
            # before it resumes from frozen, which assembles again.
            if h.state is HandoverState.FROZEN:
                self.persist.stage(batch, host.out.assembled())
            self.persist.stage(batch, host.out.committed(info, now=host.now()))
            log.info("handover %s committed: %s", h.id, info)

        await self.worker.call(committed)
        await self._describe(handover_id, manifest)

    async def _describe(self, handover_id: str | None, manifest: dict[str, Any]) -> None:
        """The manifest beside the committed payload, after the blackout."""
        h = self.host.out.handover
        if h.state is not HandoverState.COMMITTED or h.id != handover_id:
            return
        try:
            await backend.describe(self.settings, manifest)
        except KhodError as exc:
            # The image is committed and alone authoritative; say what is missing.
            log.error("the manifest of committed handover %s was not written: %s", h.id, exc)
            return
        if h.state is not HandoverState.COMMITTED or h.id != handover_id:
            # Withdrawn meanwhile: no manifest may outlive its payload.
            backend.manifest_path(self.settings.payload_path).unlink(missing_ok=True)

    async def _abort_for(self, handover_id: str | None, reason: str) -> None:
        def abort(batch: Batch) -> None:
            h = self.host.out.handover
            if h.id == handover_id and h.state in COMMITTING_STATES:
                self.persist.stage(batch, self.host.out.abort(reason, now=self.host.now()))

        await self.worker.call(abort)
