"""The participant: one component's connection to khod, and its requests.

Theory of operation: a ``Participant`` owns one :class:`khod_wire.transport.Connection`
(its own reconnect loop) subscribed to the host's retained ``handover``
status and to its own retained ``state``. Every status goes through a
:class:`~khod_client._events.Tracker`, which decides what it means for this
participant (began, may freeze, cancelled); the waiting calls sleep until
the next status and ask the tracker again. Callbacks run one at a time in a
task of their own, never in the message loop, so a callback may itself call
``frozen()`` or any other request.

Requests use MQTT v5 request/response with the participant's reply topic;
the connection re-sends a request under the same correlation data until a
reply arrives, so a broker restart never loses a fragment (the daemon
answers a duplicate from its reply cache). The MQTT will is the ``gone``
request: if the process dies, the broker tells the daemon, which fails the
participant and aborts the handover it took part in.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from khod_client._events import (
    Began,
    Cancelled,
    Event,
    FragmentReceipt,
    HandoverCancelled,
    MayFreeze,
    Tracker,
)
from khod_wire import fragment, identity
from khod_wire.errors import KhodError, PayloadError, ProtocolError, RequestTimeout
from khod_wire.message import Message, Will
from khod_wire.protocol import (
    DTB,
    JSON,
    EmptyRequest,
    FailRequest,
    HandoverSignal,
    ParticipantOp,
    ParticipantStatus,
    RegisterRequest,
    Request,
    Topics,
    encode,
    load_status,
    parse_status,
    reply_data,
)
from khod_wire.transport import Connection
from khod_wire.urls import BrokerURL, read_password_file

log = logging.getLogger("khod_client")

#: Seconds a participant waits, once a restore is announced, for its own
#: claim to show before asking anyway (retained messages come at once).
CLAIM_GRACE = 2.0

T = TypeVar("T")
OnFreeze = Callable[[], Awaitable[None] | None]
OnCancel = Callable[[str], Awaitable[None] | None]


class Participant:
    """One component taking part in live updates.

    Use it as an async context manager: entering connects to the broker (and
    stays connected, reconnecting by itself), leaving disconnects cleanly
    (without the will: the daemon is not told that it vanished).

    Args:
      name: the participant's unique name on this host (a topic level and a
        payload node name, e.g. ``vm-7``).

    Keyword-only arguments:
      compatible: what its fragment contains, without the ``linux-kho,``
        prefix, e.g. ``cloud-hypervisor,vm-v1``.
      instance: which one of its kind (an integer or a short string).
      broker: ``mqtt://[user[:password]@]host[:port]`` or ``unix:///path``.
      host_id: the host's id in the topic tree (default: the short hostname,
        as the daemon's default).
      freeze_after: participants that must freeze before this one.
      restore_after: participants that must finish restoring before this one
        retrieves.
      request_timeout: seconds to wait for the broker on entry and for each
        reply (requests are re-sent across reconnects meanwhile).
      on_freeze: called (and awaited if it returns an awaitable) once per
        handover when this participant may freeze; it must then freeze and
        call :meth:`frozen`. The SDK never reports frozen by itself.
      on_cancel: called with the reason once per handover this participant
        took part in that is cancelled (aborted, replaced, or left out).
      username, password, password_file: the broker credentials (they
        override those of the URL). With the shipped broker config the
        username is the participant's name (its ACL confines it to its own
        topics) and the broker uses it as the client id. Prefer
        ``password_file`` (one line) to a password in the URL or code: it
        stays out of ``ps`` and logs.
      keepalive: seconds between MQTT keepalive pings. The broker fires the
        will (the daemon fails this participant) when nothing arrives for
        1.5 times this: a process that hangs (SIGSTOP, a deadlock of its
        event loop) is detected that fast.
      identifier: the MQTT client id. The default, ``khod-<host>-p-<name>``,
        is stable on purpose (docs/protocol.md, "Connecting"): when a
        participant restarts, the broker takes over the old session and
        publishes the old connection's will before any request of the new
        one, instead of seconds later. Two live processes must not share it.
        The shipped broker setup replaces it with the username (client ids
        are bound to users there, docs/protocol.md, "Client ids"); its
        ``khod-`` prefix is required there.

    Callbacks run one at a time, in order, in a task of the participant,
    outside of the message loop; an exception in one is logged.

    A refusal by the broker raises at once, not as a timeout:
    :class:`khod_client.NotAuthorized` for a wrong user or password or
    anything the ACL refuses (entering, or a request of a name that is not
    this user's), :class:`khod_client.BrokerRefused` for other refusals.
    """

    def __init__(
        self,
        name: str,
        *,
        compatible: str,
        instance: int | str,
        broker: str = "mqtt://127.0.0.1:1883",
        host_id: str | None = None,
        freeze_after: Sequence[str] = (),
        restore_after: Sequence[str] = (),
        request_timeout: float = 30.0,
        on_freeze: OnFreeze | None = None,
        on_cancel: OnCancel | None = None,
        identifier: str | None = None,
        username: str | None = None,
        password: str | None = None,
        password_file: str | os.PathLike[str] | None = None,
        keepalive: int = 10,
    ) -> None:
        # The daemon's own rules, so that a mistake shows here and not as a refusal later.
        self.name = identity.check_name(name)
        self.compatible = identity.check_compatible(compatible)
        self.instance = identity.check_instance(instance)
        self.host_id = identity.check_host(host_id or identity.default_host_id())
        self.freeze_after = tuple(identity.check_name(n) for n in freeze_after)
        self.restore_after = tuple(identity.check_name(n) for n in restore_after)
        self.request_timeout = request_timeout
        self.on_freeze = on_freeze
        self.on_cancel = on_cancel
        self.topics = Topics(self.host_id)
        self._tracker = Tracker(self.name)
        self._change = asyncio.Event()
        self._callbacks: asyncio.Queue[tuple[str, Callable[[], Awaitable[None] | None]]] = (
            asyncio.Queue()
        )
        self._tasks: list[asyncio.Task[None]] = []
        if password is not None and password_file is not None:
            raise ValueError("give password or password_file, not both")
        if password_file is not None:
            password = read_password_file(Path(password_file))
        self._conn = Connection(
            BrokerURL.parse(broker).with_credentials(username, password),
            keepalive=keepalive,
            identifier=identifier or f"khod-{self.host_id}-p-{self.name}",
            subscriptions=[self.topics.handover, self.topics.state(self.name)],
            on_message=self._on_message,
            will=Will(self.topics.request(self.name, ParticipantOp.GONE), b"{}", content_type=JSON),
        )
        self._conn.reply_topic = self.topics.reply(self.name)
        self._conn.on_connect = self._on_connect
        self._registered = False
        self._background: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        me = self._tracker.me
        state = me.state if me else "unknown"
        return f"<Participant {self.name!r} host={self.host_id!r} state={state}>"

    # -- lifetime ------------------------------------------------------------

    async def __aenter__(self) -> Participant:
        if self._tasks:
            raise RuntimeError(f"participant {self.name!r} is already connected")
        bus = asyncio.create_task(self._conn.run(), name=f"khod_client:{self.name}:bus")
        bus.add_done_callback(lambda _: self._changed())
        callbacks = asyncio.create_task(
            self._run_callbacks(), name=f"khod_client:{self.name}:callbacks"
        )
        self._tasks = [bus, callbacks]
        try:
            await self._conn.wait_connected(self.request_timeout)
            if self._conn.refusal is not None:
                # A subscription refused by the broker's ACL: this participant
                # would never see a signal. Say so now, not at a timeout.
                raise self._conn.refusal
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop()

    async def _stop(self) -> None:
        tasks, self._tasks = [*self._tasks, *self._background], []
        for t in tasks:
            t.cancel()
        # Cancelling the bus task ends the connection cleanly: a DISCONNECT, no will.
        await asyncio.gather(*tasks, return_exceptions=True)
        self._changed()

    def _check_running(self) -> None:
        if not self._tasks:
            raise RuntimeError(f"use `async with` on participant {self.name!r} first")
        bus = self._tasks[0]
        if bus.done():
            exc = None if bus.cancelled() else bus.exception()
            raise KhodError(f"participant {self.name!r}: the broker connection stopped: {exc!r}")

    async def _on_connect(self) -> None:
        # After a reconnect, register again (harmless when nothing changed): a
        # broker that went away may have delivered this participant's will, and
        # the daemon then forgot it or marked it failed.
        if self._registered and self._conn.connects > 1:
            task = asyncio.create_task(
                self._register_again(), name=f"khod_client:{self.name}:register"
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _register_again(self) -> None:
        try:
            await self.register()
        except KhodError as exc:
            log.warning("%s: registering again after a reconnect failed: %s", self.name, exc)

    # -- what the daemon broadcasts ------------------------------------------

    @property
    def handover(self) -> HandoverSignal | None:
        """The latest handover broadcast seen (retained topic or reply)."""
        return self._tracker.latest

    @property
    def status(self) -> ParticipantStatus | None:
        """The latest state of this participant seen (retained topic or reply)."""
        return self._tracker.me

    @property
    def handover_id(self) -> str | None:
        """The id of the handover this participant takes (or last took) part in."""
        return self._tracker.current

    async def _on_message(self, message: Message) -> None:
        topic = message.topic
        try:
            if topic == self.topics.handover:
                signal = parse_status(HandoverSignal, message.payload)
                if signal is not None:
                    self._events(self._tracker.observe(signal))
            elif topic == self.topics.state(self.name):
                state = parse_status(ParticipantStatus, message.payload)
                if state is not None:
                    self._events(self._tracker.observe_state(state))
        except KhodError as exc:
            log.warning("%s: ignoring a bad message on %s: %s", self.name, topic, exc)
        self._changed()

    def _observe_reply(self, data: dict[str, Any]) -> None:
        # Replies carry the same statuses as the topics; older ones are ignored.
        try:
            if isinstance(raw := data.get("handover"), dict):
                self._events(self._tracker.observe(load_status(HandoverSignal, raw)))
            if isinstance(raw := data.get("participant"), dict):
                self._events(self._tracker.observe_state(load_status(ParticipantStatus, raw)))
        except ProtocolError as exc:
            log.warning("%s: ignoring a status in a reply: %s", self.name, exc)
        self._changed()

    def _events(self, events: list[Event]) -> None:
        for e in events:
            if isinstance(e, Began):
                log.info("%s: taking part in handover %s", self.name, e.status.id)
            elif isinstance(e, MayFreeze):
                log.info("%s: may freeze in handover %s", self.name, e.status.id)
                if self.on_freeze is not None:
                    self._callbacks.put_nowait(("on_freeze", self.on_freeze))
            elif isinstance(e, Cancelled):
                log.info("%s: handover %s cancelled: %s", self.name, e.handover_id, e.reason)
                if self.on_cancel is not None:
                    self._callbacks.put_nowait(("on_cancel", partial(self.on_cancel, e.reason)))

    async def _run_callbacks(self) -> None:
        while True:
            what, call = await self._callbacks.get()
            try:
                result = call()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("%s: %s callback failed", self.name, what)

    def _changed(self) -> None:
        event, self._change = self._change, asyncio.Event()
        event.set()

    async def _wait(self, ready: Callable[[], T | None]) -> T:
        """Until ``ready()`` returns something other than None (it may raise)."""
        while True:
            self._check_running()
            change = self._change
            value = ready()
            if value is not None:
                return value
            await change.wait()

    async def wait_for_handover(
        self, predicate: Callable[[HandoverSignal], bool]
    ) -> HandoverSignal:
        """Until the latest handover broadcast satisfies ``predicate``; that broadcast."""

        def ready() -> HandoverSignal | None:
            s = self._tracker.latest
            return s if s is not None and predicate(s) else None

        return await self._wait(ready)

    async def wait_for_begin(self) -> HandoverSignal:
        """Until a handover that includes this participant is preparing or freezing."""
        return await self._wait(self._tracker.begun)

    async def wait_for_freeze(self) -> None:
        """Until this participant may freeze in the handover it takes part in.

        That is the handover it takes part in when called, or else the next
        one that includes it. Raises :class:`HandoverCancelled` if that
        handover is cancelled first (or already was).
        """
        bound: list[str] = []

        def ready() -> bool | None:
            if not bound and self._tracker.current is not None:
                bound.append(self._tracker.current)
            if not bound:
                return None
            hid = bound[0]
            if hid in self._tracker.cancelled:
                raise HandoverCancelled(self._tracker.cancelled[hid], hid)
            return True if self._tracker.freeze_reached(hid) else None

        await self._wait(ready)

    async def wait_for_cancel(self) -> str:
        """Until the handover this participant takes part in is cancelled; the reason.

        Bound like :meth:`wait_for_freeze`; returns at once if it already was.
        A committed handover is never cancelled: then this waits for the next.
        """
        bound: list[str] = []

        def ready() -> str | None:
            t = self._tracker
            if t.current is not None and (
                not bound or (bound[0] in t.committed and t.current != bound[0])
            ):
                bound[:] = [t.current]
            return t.cancelled.get(bound[0]) if bound else None

        return await self._wait(ready)

    # -- requests ------------------------------------------------------------

    async def _request(self, op: ParticipantOp, body: bytes, content_type: str) -> Message:
        self._check_running()
        return await self._conn.request(
            self.topics.request(self.name, op),
            body,
            content_type=content_type,
            timeout=self.request_timeout,
        )

    async def _call(self, op: ParticipantOp, req: Request) -> dict[str, Any]:
        message = await self._request(op, encode(req), JSON)
        data = reply_data(op, message.payload)
        self._observe_reply(data)
        return data

    async def register(self) -> dict[str, Any]:
        """Register with the daemon; the reply's data.

        It holds ``participant`` (this participant's state) and ``handover``
        (the host's). If a handover is preparing and this participant is
        expected (or no list was given), it joins it at once. Registering
        again is harmless; once registered, the participant registers again
        by itself after every reconnect.
        """
        data = await self._call(
            ParticipantOp.REGISTER,
            RegisterRequest(
                compatible=self.compatible,
                instance=self.instance,
                freeze_after=list(self.freeze_after),
                restore_after=list(self.restore_after),
            ),
        )
        self._registered = True
        return data

    def start_storage(self, *, size_hint: int = 1024) -> fragment.FragmentBuilder:
        """A builder for this participant's fragment (root compatible and instance written)."""
        return fragment.start_storage(self.compatible, self.instance, size_hint=size_hint)

    async def submit(self, fragment: bytes) -> FragmentReceipt:
        """Send the fragment (raw FDT bytes); the receipt once it is durable.

        May be called again until this participant reports frozen: the new
        fragment replaces the old one.
        """
        blob = bytes(fragment)
        message = await self._request(ParticipantOp.FRAGMENT, blob, DTB)
        data = reply_data(ParticipantOp.FRAGMENT, message.payload)
        receipt = FragmentReceipt.from_reply(data, fragment=blob)
        self._observe_reply(data)
        return receipt

    async def revise(self) -> None:
        """The state changed: the fragment sent is stale, a new one follows."""
        await self._call(ParticipantOp.REVISE, EmptyRequest())

    async def frozen(self) -> None:
        """Report that this participant is frozen (its fragment is final)."""
        await self._call(ParticipantOp.FROZEN, EmptyRequest())

    async def fail(self, reason: str) -> None:
        """Report a failure; a handover this participant takes part in aborts."""
        await self._call(ParticipantOp.FAIL, FailRequest(reason=reason))

    async def retrieve(self, *, timeout: float | None = None) -> bytes:
        """After a kexec: this participant's fragment from the incoming payload.

        Waits until the daemon restores and this participant may retrieve
        (participants it restores after have finished), then checks the
        bytes against the sha256 on its retained state. PayloadError on a
        mismatch, RemoteError if the daemon refuses. ``timeout``: seconds to
        wait for the daemon to offer the fragment (RequestTimeout after);
        None waits as long as it takes (a component may start first).
        """

        loop = asyncio.get_running_loop()
        seen_at: dict[str, float] = {}

        def ready() -> tuple[HandoverSignal, str | None] | None:
            s = self._tracker.latest
            if s is None or s.side != "incoming" or s.id is None:
                return None
            me = self._tracker.me
            if me is None or me.handover_id != s.id:
                # Its claim (own state) arrives with the broadcast; without one
                # after a moment, it has no fragment: let the daemon say so.
                if s.id not in seen_at:
                    seen_at[s.id] = loop.time()
                    loop.call_later(CLAIM_GRACE, self._changed)  # look again then
                if loop.time() - seen_at[s.id] < CLAIM_GRACE:
                    return None
                return s, None
            if me.may_retrieve is False and me.state not in ("retrieved", "finished"):
                return None  # it restores after someone who has not finished
            return s, me.fragment_sha256

        try:
            status, sha = await asyncio.wait_for(self._wait(ready), timeout)
        except TimeoutError:
            raise RequestTimeout(
                f"{self.name!r}: no incoming payload offered its fragment within {timeout:g}s"
            ) from None
        message = await self._request(ParticipantOp.RETRIEVE, encode(EmptyRequest()), JSON)
        content_type, body = message.content_type, message.payload
        if content_type != DTB:
            reply_data(ParticipantOp.RETRIEVE, body)  # raises RemoteError for an error
            raise ProtocolError(f"retrieve: expected {DTB}, got a {content_type} reply")
        got = hashlib.sha256(body).hexdigest()
        if sha is None or got != sha:
            raise PayloadError(
                f"retrieved fragment of {self.name!r} ({len(body)} bytes, sha256 {got}) does "
                f"not match its recorded sha256 {sha} in handover {status.id}"
            )
        return body

    async def finish(self) -> None:
        """After a kexec: this participant has restored; the payload may be released."""
        await self._call(ParticipantOp.FINISH, EmptyRequest())
