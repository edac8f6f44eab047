"""The operations: one typed handler per request, applied to the core in the worker.

Each handler takes who asked (``Asked``: the batch, the participant's name,
whether it is a will) and its typed request, calls the pure core
(``Outgoing``, ``Incoming``), stages what changed for the batch, and returns
the data of its reply (or, for ``retrieve``, the raw fragment). ``khod.router``
maps topics to these handlers. Wills and their grace period, and the
replies held until the commit, live here too: both decide when a request
takes effect.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from khod.changes import Changes
from khod.commit import Committer
from khod.config import Settings
from khod.host import Host
from khod.persist import Persister
from khod.replies import Key, ok
from khod.restore import Incoming
from khod.worker import Batch
from khod_wire.errors import Busy, FragmentTooLarge
from khod_wire.fragment import validate_fragment
from khod_wire.protocol import (
    COMMITTING_STATES,
    JSON,
    PAST_FREEZE_STATES,
    AbortRequest,
    BeginRequest,
    EmptyRequest,
    FailRequest,
    FreezeRequest,
    HandoverState,
    HostRestoreState,
    ParticipantOp,
    ParticipantState,
    RegisterRequest,
    RestoreState,
)

log = logging.getLogger(__name__)

Data = dict[str, Any]


@dataclass
class Asked:
    """Who sent a request, and in which batch."""

    batch: Batch
    #: the participant; "" for the operator
    name: str
    #: no response topic: a will (for gone), nobody waits for a reply
    will: bool = False
    #: set by a handler whose reply must wait for the end of the commit
    hold: bool = False


class Ops:
    def __init__(
        self,
        settings: Settings,
        host: Host,
        persist: Persister,
        commit: Committer,
        bus_epoch: Callable[[], int],
    ) -> None:
        self.settings = settings
        self.host = host
        self.persist = persist
        self.commit = commit
        #: changes whenever the bus connection drops or comes back
        self.bus_epoch = bus_epoch
        #: participants whose will arrived: name -> (when it counts, bus epoch then)
        self.vanished: dict[str, tuple[float, int]] = {}
        #: replies held until the commit is over: (response topic, correlation, key, name)
        self._after_commit: list[tuple[str, bytes | None, Key | None, str]] = []

    def _stage(self, asked: Asked, changes: Changes) -> None:
        self.persist.stage(asked.batch, changes)

    def _abort_changes(self, batch: Batch, changes: Changes) -> None:
        """Stage changes that may abort the handover; an abort stops a commit under way."""
        if any(t.subject == "handover" and t.event == "abort" for t in changes.transitions):
            self.commit.cancel()
        self.persist.stage(batch, changes)

    def _both(self, name: str) -> Data:
        return {
            "participant": self.host.participant_dump(name),
            "handover": self.host.signal_dump(),
        }

    # -- participant operations ----------------------------------------------

    def register(self, asked: Asked, req: RegisterRequest) -> Data:
        changes = self.host.out.register(
            asked.name,
            req.compatible,
            req.instance,
            freeze_after=req.freeze_after,
            restore_after=req.restore_after,
            now=self.host.now(),
        )
        self._stage(asked, changes)
        return self._both(asked.name)

    def fragment(self, asked: Asked, blob: bytes) -> Data:
        name, host, limit = asked.name, self.host, self.settings.max_fragment_size
        if len(blob) > limit:
            raise FragmentTooLarge(f"fragment of {len(blob)} bytes exceeds {limit}")
        # Refuse a participant that may not submit before spending a full check on its blob.
        p = host.out.submittable(name)
        info = validate_fragment(blob, compatible=p.compatible, instance=p.instance, max_size=limit)
        changes = host.out.submit(name, info.size, info.sha256_hex, now=host.now())
        self._stage(asked, changes)
        host.fragments[name] = blob
        self.commit.prepare(name)
        sha = info.sha256_hex
        asked.batch.writes.append(lambda s: s.put_fragment(name, blob, sha))
        return {"size": info.size, "sha256": sha, **self._both(name)}

    def revise(self, asked: Asked, req: EmptyRequest) -> Data:
        self._stage(asked, self.host.out.revise(asked.name, now=self.host.now()))
        return {"participant": self.host.participant_dump(asked.name)}

    def frozen(self, asked: Asked, req: EmptyRequest) -> Data:
        out, name = self.host.out, asked.name
        h, p = out.handover, out.participants.get(name)
        if (
            p is not None
            and p.state is ParticipantState.FROZEN
            and out.is_member(name)
            and h.state in PAST_FREEZE_STATES
        ):
            # Said again (a retry across a restart of the daemon): the same outcome.
            asked.hold = h.state is not HandoverState.COMMITTED
        else:
            changes = out.frozen(name, now=self.host.now())
            self._stage(asked, changes)
            # The last frozen: its acknowledgement means the payload is
            # committed (or says why not), so it waits for the commit.
            asked.hold = changes.assemble
        return self._both(name)

    def hold(self, topic: str, correlation: bytes | None, key: Key | None, name: str) -> None:
        """Keep the reply to ``name``'s frozen until the commit is over."""
        self._after_commit.append((topic, correlation, key, name))

    def release_held_replies(self, batch: Batch) -> None:
        if not self._after_commit or self.host.out.handover.state in COMMITTING_STATES:
            return
        for topic, correlation, key, name in self._after_commit:
            body = ok(ParticipantOp.FROZEN, self._both(name))
            batch.replies.append((topic, body, JSON, correlation, key))
        self._after_commit.clear()

    def fail(self, asked: Asked, req: FailRequest) -> Data:
        out = self.host.out
        self._abort_changes(asked.batch, out.fail(asked.name, req.reason, now=self.host.now()))
        return {"participant": self.host.participant_dump(asked.name)}

    def gone(self, asked: Asked, req: EmptyRequest) -> Data:
        name, host = asked.name, self.host
        if host.inc is not None and name in host.inc.claims and name not in host.out.participants:
            return {}  # a restoring component that restarts will retrieve again
        host.out.participant(name)  # unknown: say so now
        if not asked.will:
            # Said on purpose, with a reply expected: acknowledged means done.
            self._abort_changes(asked.batch, host.out.gone(name, now=host.now()))
            return {}
        # A broker that shuts down cleanly publishes every client's will, then
        # drops us too. So a will counts only if our own connection outlives
        # it by the grace period: a crashed participant's does, a broker
        # restart's does not.
        self.vanished[name] = (host.now() + self.settings.gone_grace, self.bus_epoch())
        return {}

    def expire_gone(self, batch: Batch, now: float, *, only: str | None = None) -> None:
        epoch = self.bus_epoch()
        for name, (when, then) in list(self.vanished.items()):
            if only is not None and name != only:
                continue
            if epoch != then:
                log.info("ignoring the will of %s: the broker went away at the same time", name)
                del self.vanished[name]
            elif when <= now or only is not None:
                del self.vanished[name]
                if name in self.host.out.participants:
                    self._abort_changes(batch, self.host.out.gone(name, now=now))

    def _incoming(self, name: str, what: str) -> Incoming:
        if self.host.inc is None:
            raise Busy(f"{name!r} cannot {what}: this host has no incoming payload")
        return self.host.inc

    def retrieve(self, asked: Asked, req: EmptyRequest) -> bytes:
        name = asked.name
        inc = self._incoming(name, "retrieve")
        assert self.host.image is not None  # an Incoming always comes with its image
        claim = inc.claim(name)  # unknown-participant before anything else
        blob = self.host.image.retrieve(name)
        if claim.state is RestoreState.RETRIEVED:
            # Again (a restarted participant): the same bytes, while not released.
            inc.check_open(name, "retrieve its fragment")
        else:
            self._stage(asked, inc.retrieve(name, now=self.host.now()))
        return blob

    def finish(self, asked: Asked, req: EmptyRequest) -> Data:
        inc = self._incoming(asked.name, "finish")
        if inc.claim(asked.name).state is not RestoreState.FINISHED:
            self._stage(asked, inc.finish(asked.name, now=self.host.now()))
        # else already done (a retry across a restart, say): the same outcome.
        return self._both(asked.name)

    # -- operator operations -------------------------------------------------

    def begin(self, asked: Asked, req: BeginRequest) -> Data:
        host = self.host
        if host.inc is not None and host.inc.state is not HostRestoreState.RELEASED:
            raise Busy("cannot begin: the incoming payload is still being restored")
        now = host.now()
        changes = host.out.begin(
            str(uuid.uuid4()),
            deadline=now + (req.deadline or self.settings.handover_deadline),
            expect=req.expect,
            auto_freeze=req.auto_freeze,
            now=now,
        )
        batch = asked.batch
        if host.inc is not None:
            restored = host.inc.handover_id
            batch.writes.append(lambda s: s.set_meta("restored", restored))
            batch.writes.append(lambda s: s.clear_restore())
            host.inc = host.image = host.image_path = None
            batch.daemon = True
        self._stage(asked, changes)
        return {"handover": host.handover_status().model_dump()}

    def freeze(self, asked: Asked, req: FreezeRequest) -> Data:
        out = self.host.out
        left_before = set(out.handover.left_out)
        self._stage(asked, out.freeze(force=req.force, now=self.host.now()))
        return {
            "handover": self.host.handover_status().model_dump(),
            "left_out": sorted(set(out.handover.left_out) - left_before),
        }

    def abort(self, asked: Asked, req: AbortRequest) -> Data:
        self._abort_changes(asked.batch, self.host.out.abort(req.reason, now=self.host.now()))
        return {"handover": self.host.handover_status().model_dump()}

    def status(self, asked: Asked, req: EmptyRequest) -> Data:
        host = self.host
        everyone = sorted(set(host.out.participants) | set(host.inc.claims if host.inc else ()))
        return {
            "daemon": host.daemon_status("online").model_dump(),
            "handover": host.handover_status().model_dump(),
            "participants": [host.participant_dump(n) for n in everyone],
        }

    # -- time ----------------------------------------------------------------

    def deadlines(self, batch: Batch) -> None:
        """Abort a late handover, release a late restore, count the wills whose grace is over."""
        host = self.host
        now = host.now()
        self.expire_gone(batch, now)
        self._abort_changes(batch, host.out.check_deadline(now=now))
        if host.inc is not None:
            changes = host.inc.check_deadline(now=now)
            if changes:
                log.warning("restore deadline passed; unclaimed: %s", host.inc.unclaimed)
                self.persist.stage(batch, changes)
