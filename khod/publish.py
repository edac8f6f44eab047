"""What a durable batch announces, and in which order.

In order: the daemon, the signal, the states, then the replies that caused
them; sent together, acknowledged together. The states held through a
blackout come last, once the outcome is on its way. Inside the blackout (freeze
signal to commit) a participant's own new state is held back until the
commit or the abort: see ``BatchPublisher.send``.
"""

from __future__ import annotations

import asyncio

from khod.announce import Announcer
from khod.host import Host
from khod.worker import Batch
from khod_wire.protocol import BLACKOUT_STATES
from khod_wire.transport import Publication


class BatchPublisher:
    def __init__(self, host: Host, announce: Announcer) -> None:
        self.host = host
        self.announce = announce
        #: participants whose own state waits for the end of the blackout
        self._held_states: set[str] = set()

    async def send(self, batch: Batch) -> int:
        """Publish what ``batch`` changed and its replies; how many messages."""
        host, a = self.host, self.announce
        sends: list[Publication] = []
        if batch.daemon:
            sends.append(a.daemon_of(host.daemon_status("online")))
        # Inside the blackout, a participant's own new state (serialized,
        # frozen) is news to nobody on the critical path: its reply says it,
        # monitors see the counts on progress. Held until the commit or the
        # abort, it does not cost each participant one more message while the
        # others freeze. A change another caused (may_freeze, left out) is a
        # signal to that participant: it goes at once.
        blackout = host.inc is None and host.out.handover.state in BLACKOUT_STATES
        names = list(batch.participants)
        released: list[str] = []
        if blackout:
            held = batch.asked.intersection(names)
            self._held_states |= held
            names = [n for n in names if n not in held]
        else:
            released = [n for n in sorted(self._held_states) if n not in batch.participants]
            self._held_states.clear()
        if batch.signal:
            sends.append(a.signal_of(host.handover_signal()))
        for name in names:
            sends.append(a.state_of(name, host.participant_status(name)))
        for topic, body, ctype, correlation, _ in batch.replies:
            sends.append(a.reply_of(topic, body, ctype, correlation))
        await a.send(sends)
        if not released:
            return len(sends)
        # The states held through the blackout follow its outcome, once that
        # is on its way (the client writes what is queued at the next turn of
        # the loop): the outcome is not kept waiting while N more messages
        # are built. A committed handover holds every member frozen, whatever
        # a state topic still shows.
        await asyncio.sleep(0)
        await a.send([a.state_of(name, host.participant_status(name)) for name in released])
        return len(sends) + len(released)
