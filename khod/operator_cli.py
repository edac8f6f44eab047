"""The operator commands: ``khod begin|freeze|abort|status|monitor``.

Each command is one MQTT v5 request to ``khod/v1/<host>/ctl/req/<op>``,
answered on a reply topic of this process's own (``ctl/reply/<client id>``),
except ``monitor``, which only reads the retained topics. The parsing of the
command line is ``khod.cli``'s; what ``monitor`` shows is ``khod.monitor``'s.

Exit status, for scripts: 0 done, 1 the daemon refused (its error code and
message on stderr), the broker refused (``not authorized``: a wrong user or
password, or the ACL refused a publish or subscription; said at once, not
after ``--timeout``) or a monitored handover aborted, 2 bad configuration or
arguments, 3 no answer (no broker, or no daemon serving the host) within
``--timeout``, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.live import Live

from khod.config import Settings, load_settings
from khod.monitor import (
    MonitorState,
    fmt_seconds,
    parse,
    parse_obj,
    participants_table,
    status_header,
)
from khod_wire.errors import (
    BrokerRefused,
    ConfigError,
    NotAuthorized,
    ProtocolError,
    RemoteError,
    RequestTimeout,
)
from khod_wire.message import Message
from khod_wire.protocol import (
    JSON,
    AbortRequest,
    BeginRequest,
    ControlOp,
    DaemonStatus,
    EmptyRequest,
    FreezeRequest,
    HandoverStatus,
    ParticipantStatus,
    Reply,
    Request,
    Topics,
    encode,
    reply_data,
)
from khod_wire.transport import Connection, client_id

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_NO_ANSWER, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
#: ``monitor --once``: the broker sends retained messages right after the
#: subscription; this long without a new one means the snapshot is complete.
ONCE_QUIET, ONCE_MAX = 0.25, 1.0
REFRESH = 0.25


class Failed(Exception):
    """Ends a command with a message on stderr and an exit status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def main(args: argparse.Namespace) -> int:
    # The connection's log lines (a refusal, a reconnect) would repeat on
    # stderr what this command says itself, once, with its exit status.
    for name in ("khod", "khod_wire"):
        logging.getLogger(name).addHandler(logging.NullHandler())
    try:
        settings = load_settings(
            args.config,
            broker=args.broker,
            host_id=args.host_id,
            broker_username=args.broker_username,
            broker_password_file=args.broker_password_file,
        )
        if args.timeout <= 0:
            raise ConfigError(f"--timeout must be positive, not {args.timeout:g}")
        body = _request_body(args)
    except ConfigError as exc:
        return _fail(EXIT_USAGE, str(exc))
    try:
        if args.command == "monitor":
            return asyncio.run(monitor(args, settings))
        assert body is not None
        reply = asyncio.run(request(settings, ControlOp(args.command), body, args.timeout))
        _print_reply(args, settings, reply)
        return EXIT_OK
    except Failed as exc:
        return _fail(exc.status, str(exc))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _console() -> Console:
    # No markup: abort reasons and errors are other people's text.
    console = Console(highlight=False, markup=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # A pipe or a log: 80 columns would fold the table and the ids that
        # scripts grep for; a long line is the lesser evil.
        console.width = 200
    return console


def _fail(status: int, message: str) -> int:
    print(f"khod: {message}", file=sys.stderr)
    return status


def _request_body(args: argparse.Namespace) -> Request | None:
    """The request of a control command, checked before anything is sent."""
    try:
        match args.command:
            case "begin":
                return BeginRequest(
                    deadline=args.deadline,
                    expect=args.expect,
                    auto_freeze=not args.no_auto_freeze,
                )
            case "freeze":
                return FreezeRequest(force=args.force)
            case "abort":
                return AbortRequest(reason=args.reason)
            case "status":
                return EmptyRequest()
    except ValidationError as exc:
        details = "; ".join(f"--{'-'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid {args.command} arguments: {details}") from None
    return None


# -- requests -------------------------------------------------------------------


async def request(settings: Settings, op: ControlOp, body: Request, timeout: float) -> Reply:
    """Send one control request and return the daemon's successful reply.

    Raises Failed: 3 when nobody answers in time, 1 when the daemon refuses.
    """
    topics = Topics(settings.host_id)
    ident = client_id("khod-ctl")
    daemon: list[DaemonStatus] = []

    async def on_message(m: Message) -> None:
        # Only to say more than "no answer" when the daemon is known offline.
        d = parse(DaemonStatus, m.payload)
        if d is not None:
            daemon[:] = [d]

    conn = Connection(
        settings.broker_url, identifier=ident, subscriptions=[topics.daemon], on_message=on_message
    )
    conn.reply_topic = topics.control_reply(ident)
    bus = asyncio.create_task(conn.run(), name="bus")
    try:
        message = await conn.request(
            topics.control(op), encode(body), content_type=JSON, timeout=timeout
        )
    except RequestTimeout:
        raise Failed(EXIT_NO_ANSWER, _no_answer(settings, conn, timeout, daemon)) from None
    except BrokerRefused as exc:
        raise Failed(EXIT_REFUSED, _refused(exc)) from None
    finally:
        bus.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await bus
    try:
        data = reply_data(op, message.payload)
    except RemoteError as exc:
        raise Failed(EXIT_REFUSED, str(exc)) from None
    except ProtocolError as exc:
        raise Failed(EXIT_REFUSED, f"malformed reply from the daemon: {exc}") from None
    return Reply(op=op, ok=True, data=data)


def _refused(exc: BrokerRefused) -> str:
    if isinstance(exc, NotAuthorized):
        return (
            f"{exc}; check --broker-username and --broker-password-file (operator tools "
            "log in as a user the broker lets write ctl/req, `operator` in the shipped setup)"
        )
    return str(exc)


def _no_answer(
    settings: Settings, conn: Connection, timeout: float, daemon: list[DaemonStatus]
) -> str:
    url, host = settings.broker_url, settings.host_id
    if conn.connects == 0:
        return f"cannot reach the broker at {url} within {timeout:g}s"
    msg = (
        f"no answer from the daemon on host {host} at {url} within {timeout:g}s "
        "(is `khod run` running?)"
    )
    if daemon and daemon[0].state == "offline":
        msg += "; its last status says offline"
    elif not daemon:
        msg += f"; no khod has ever announced itself for host {host!r} on this broker"
    return msg


# -- output of the control commands ------------------------------------------------


def _print_reply(args: argparse.Namespace, settings: Settings, reply: Reply) -> None:
    data = reply.data
    if args.command == "status" and args.json:
        # Stable for scripts: the daemon's reply data, as is, keys sorted.
        print(json.dumps(data, indent=2, sort_keys=True))
        return
    console = _console()
    h = parse_obj(HandoverStatus, data.get("handover"))
    if h is None:
        raise Failed(EXIT_REFUSED, "malformed reply from the daemon: no handover status")
    if args.command == "begin":
        _print_begin(console, h)
    elif args.command == "freeze":
        left = [str(n) for n in data.get("left_out", [])]
        console.print(f"handover {h.id}: {h.state}")
        console.print("left out: " + (", ".join(left) if left else "nobody"))
    elif args.command == "abort":
        console.print(f"handover {h.id}: aborted ({h.abort_reason}); now {h.state}")
    else:
        _print_status(console, settings, h, data.get("participants", []))


def _print_begin(console: Console, h: HandoverStatus) -> None:
    console.print(f"handover {h.id}: {h.state}")
    n = len(h.expected)
    console.print(
        f"expecting {n} participant{'' if n == 1 else 's'}: " + (", ".join(h.expected) or "-")
    )
    if h.deadline is not None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.deadline))
        console.print(f"deadline: {stamp} (in {fmt_seconds(max(h.deadline - time.time(), 0))})")
    if h.state == "freezing":
        console.print("every participant was already serialized: freezing now")


def _print_status(console: Console, settings: Settings, h: HandoverStatus, raw: list[Any]) -> None:
    parts = [p for p in (parse_obj(ParticipantStatus, r) for r in raw) if p is not None]
    console.print(status_header(settings.host_id, h, len(parts)))
    # The same notion of "outstanding" as the monitor's, in every state.
    view = MonitorState(settings.host_id)
    view.handover, view.participants = h, {p.name: p for p in parts}
    waiting = view.outstanding()
    if waiting:
        console.print("waiting for: " + ", ".join(waiting))
    if h.left_out:
        console.print("left out: " + ", ".join(h.left_out))
    if h.unclaimed:
        console.print("unclaimed fragments: " + ", ".join(h.unclaimed))
    if parts:
        console.print(participants_table(parts))
    else:
        console.print("no participant registered")


# -- monitor ----------------------------------------------------------------------


async def monitor(args: argparse.Namespace, settings: Settings) -> int:
    topics = Topics(settings.host_id)
    state = MonitorState(settings.host_id)
    changed = asyncio.Event()

    async def on_message(m: Message) -> None:
        state.ingest(m.topic, m.payload)
        changed.set()

    async def on_connect() -> None:
        state.forget()  # the broker re-sends every retained state now
        state.connected = True
        changed.set()

    conn = Connection(
        settings.broker_url,
        identifier=client_id("khod-mon"),
        subscriptions=[topics.daemon, topics.handover, topics.progress, topics.participant_states],
        on_message=on_message,
        on_connect=on_connect,
    )
    bus = asyncio.create_task(conn.run(), name="bus")
    try:
        if args.once:
            return await _once(conn, state, changed, args.timeout)
        console = _console()
        view = _live if console.is_terminal else _lines
        return await view(console, conn, state, changed, exit_when_done=args.exit_when_done)
    finally:
        bus.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await bus


async def _once(
    conn: Connection, state: MonitorState, changed: asyncio.Event, timeout: float
) -> int:
    try:
        await conn.wait_connected(timeout)
    except RequestTimeout:
        raise Failed(
            EXIT_NO_ANSWER, f"cannot reach the broker at {conn.url} within {timeout:g}s"
        ) from None
    except BrokerRefused as exc:
        raise Failed(EXIT_REFUSED, _refused(exc)) from None
    if conn.refusal is not None:
        raise Failed(EXIT_REFUSED, _refused(conn.refusal))
    loop = asyncio.get_running_loop()
    end = loop.time() + ONCE_MAX
    while (left := end - loop.time()) > 0:
        changed.clear()
        try:
            await asyncio.wait_for(changed.wait(), min(ONCE_QUIET, left))
        except TimeoutError:
            if state.handover is not None and state.daemon is not None:
                break
    _console().print(state.render(max_rows=1000))
    return EXIT_OK


def _exit_status(done: str | None) -> int | None:
    return None if done is None else EXIT_REFUSED if done == "aborted" else EXIT_OK


async def _tick(conn: Connection, state: MonitorState, changed: asyncio.Event) -> bool:
    """Until something changes (True), or REFRESH passes: the clocks on screen run."""
    if conn.refusal is not None:
        raise Failed(EXIT_REFUSED, _refused(conn.refusal))
    changed.clear()
    try:
        await asyncio.wait_for(changed.wait(), REFRESH)
    except TimeoutError:
        return False
    finally:
        if state.connected is not None:
            state.connected = conn.connected
    return True


async def _live(
    console: Console,
    conn: Connection,
    state: MonitorState,
    changed: asyncio.Event,
    *,
    exit_when_done: bool,
) -> int:
    # Refreshed from this loop only: rich's own refresh thread would render
    # while messages are being ingested.
    with Live(state.render(), console=console, auto_refresh=False) as live:
        while True:
            await _tick(conn, state, changed)
            live.update(state.render(max_rows=max(console.height - 14, 5)), refresh=True)
            status = _exit_status(state.done) if exit_when_done else None
            if status is not None:
                return status


async def _lines(
    console: Console,
    conn: Connection,
    state: MonitorState,
    changed: asyncio.Event,
    *,
    exit_when_done: bool,
) -> int:
    """Not a terminal (a log, a pipe): one summary line per change, no redraws."""
    last, loop = "", asyncio.get_running_loop()
    connected_at: float | None = None
    while True:
        moved = await _tick(conn, state, changed)
        if state.connected is None:
            continue
        # The retained states arrive in a burst after the subscription: the
        # first line waits for the burst to end, as ``--once`` does.
        connected_at = connected_at or loop.time()
        if not last and moved and loop.time() - connected_at < ONCE_MAX:
            continue
        status = _exit_status(state.done) if exit_when_done else None
        line = state.summary(clocks=status is not None)
        if line != last:
            print(line, flush=True)
            last = line
        if status is not None:
            return status
