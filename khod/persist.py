"""Persisting: what the core changed becomes store writes, made durable per batch.

``stage`` maps one ``Changes`` to the writes of the current batch, stamping
every record it touches with a new sequence number; ``write`` makes a whole
batch durable in **one** transaction, one fsync, in a worker thread, so that
the event loop keeps reading the next requests meanwhile. The replies of
the batch are written with it, so that a replay after a restart is
answered alike.
"""

from __future__ import annotations

import asyncio

from khod.changes import Changes
from khod.host import Host
from khod.store import Store
from khod.worker import Batch
from khod_wire.protocol import DTB, QUIET_STATES

#: Replies kept (in memory and on disk) to answer a re-sent request alike.
REPLIES_KEPT = 4096


class Persister:
    def __init__(self, host: Host, store: Store) -> None:
        self.host = host
        self.store = store

    def stage(self, batch: Batch, changes: Changes) -> None:
        """Record what ``changes`` changed in ``batch`` (stamped, to write, to announce)."""
        if not changes:
            return
        host = self.host
        host.progress_dirty = True
        out, inc = host.out, host.inc
        if changes.handover:
            # A new state is a signal (a new number, a broadcast to everyone);
            # a participant joining a preparing handover is not.
            subjects = {t.subject for t in changes.transitions}
            if inc is not None and "restore" in subjects:
                inc.seq = host.next_seq()
                batch.signal = True
            elif "handover" in subjects:
                out.handover.seq = host.next_seq()
                # frozen and assembled are the daemon's own steps: nobody acts
                # on them (progress shows them), so the broadcast to every
                # participant waits for the outcome.
                batch.signal |= out.handover.state not in QUIET_STATES
            record = out.handover.to_record()
            batch.writes.append(lambda s: s.save_handover(record))
        for name in changes.participants:
            p = out.participants.get(name)
            if p is not None and name not in changes.removed:
                p.seq = host.next_seq()
                rec = p.to_record()
                batch.writes.append(lambda s, n=name, r=rec: s.save_participant(n, r))  # type: ignore[misc]
            if inc is not None and name in inc.claims:
                # Its state topic shows the claim (and its new registration, if any).
                inc.claims[name].seq = host.next_seq()
            batch.participants[name] = None
        for name in changes.removed:
            batch.writes.append(lambda s, n=name: s.delete_participant(n))  # type: ignore[misc]
            batch.participants[name] = None
        for name in changes.drop_fragments:
            host.fragments.pop(name, None)
            batch.writes.append(lambda s, n=name: s.delete_fragment(n))  # type: ignore[misc]
        for t in changes.transitions:
            batch.writes.append(
                lambda s, t=t: s.record_transition(  # type: ignore[misc]
                    t.subject, t.event, t.from_state, t.to_state, detail=t.detail
                )
            )
        if inc is not None and any(n in inc.claims for n in changes.participants):
            # Claims' sequence numbers are part of the incoming record.
            record = host.incoming_record()
            batch.writes.append(lambda s: s.save_restore(record))
        batch.commit |= changes.assemble

    async def write(self, batch: Batch) -> None:
        """Make the batch durable: one transaction, off the event loop (StoreError if not)."""
        for _, body, ctype, _, key in batch.replies:
            # Raw fragments are not kept on disk: retrieve is idempotent anyway.
            if key is not None and ctype != DTB:
                batch.writes.append(
                    lambda s, k=key, b=body, c=ctype: s.put_reply(k, b, c)  # type: ignore[misc]
                )
        if not batch.writes:
            return
        seq = str(self.host.seq)
        writes = batch.writes
        replies = any(key is not None for *_, key in batch.replies)
        store = self.store

        def write() -> None:
            with store.transaction():
                for w in writes:
                    w(store)
                store.set_meta("seq", seq)
                if replies:
                    store.forget_replies(keep=REPLIES_KEPT)

        await asyncio.to_thread(write)
