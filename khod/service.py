"""``khod run``: wiring of config, store, bus and daemon into one process.

Everything runs in one asyncio TaskGroup with named tasks: ``bus`` (the
broker connection and its reconnect loop) and ``deadlines`` (handover and
restore deadlines, systemd STATUS and WATCHDOG=1 when asked for).
SIGTERM/SIGINT stop it cleanly: the state stays on disk and the retained
daemon topic says offline. A crash says offline too, through the
broker-held will.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import sys
from pathlib import Path
from typing import IO

from khod import __version__, backend, luo_service, sdnotify
from khod.atomicfile import remove_stale_temps
from khod.config import Settings, load_settings
from khod.daemon import Daemon
from khod.luo_handoff import LuoHandoff
from khod.store import Store
from khod_wire.errors import ConfigError, KhodError
from khod_wire.message import Message, Will
from khod_wire.protocol import JSON, DaemonStatus, Topics, encode
from khod_wire.transport import Connection

log = logging.getLogger("khod")

TICK = 0.25
SESSION_EXPIRY = 3600
#: Received requests waiting for the daemon, in bytes: under a flood the rest
#: is dropped (and re-sent by its sender) instead of growing the daemon's
#: memory. Far more than the largest request (a 1 MiB fragment), and enough
#: for a burst of ~3,800 small requests (~8.5 KiB each as accounted, mostly
#: paho's objects), e.g. every participant of a large host freezing at once.
MAX_INBOUND_BYTES = 32 * 1024 * 1024


def setup_logging() -> None:
    level = os.environ.get("KHOD_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s khod %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def lock_state_dir(state_dir: Path) -> IO[bytes]:
    """One daemon per state directory: two would both write the same store."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    f = (state_dir / "khod.lock").open("ab")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConfigError(f"another khod is running on state directory {state_dir}") from None
    return f


async def serve(settings: Settings, *, restore: Path | None = None) -> int:
    lock = lock_state_dir(settings.state_dir)
    # A daemon killed while writing the payload or its manifest leaves its
    # temporary file behind; nobody else writes them, and we hold the lock.
    for path in remove_stale_temps(
        [settings.payload_path, backend.manifest_path(settings.payload_path)]
    ):
        log.info("removed %s, left by an interrupted write", path)
    try:
        handoff = luo_service.open_luo(settings)
    except BaseException:
        lock.close()
        raise
    store = Store(settings.state_dir)
    backend.use_luo(handoff)
    try:
        return await _serve(settings, store, restore, handoff)
    finally:
        backend.use_luo(None)
        if handoff is not None:
            handoff.close()
        store.close()
        lock.close()


async def _serve(
    settings: Settings, store: Store, restore: Path | None, handoff: LuoHandoff | None
) -> int:
    topics = Topics(settings.host_id)
    offline = encode(DaemonStatus(version=__version__, state="offline"))
    url = settings.broker_url
    conn = Connection(
        url,
        identifier=f"khod-{settings.host_id}",
        subscriptions=[
            topics.all_participant_requests,
            topics.all_control_requests,
            topics.participant_states,
        ],
        no_local=True,
        # A retained request must be recognisable as such to be ignored.
        retain_as_published=True,
        max_inbound_bytes=MAX_INBOUND_BYTES,
        # Requests and wills sent while the daemon restarts wait for it.
        session_expiry=SESSION_EXPIRY,
        will=Will(topics.daemon, offline, retain=True, content_type=JSON),
    )
    daemon = Daemon(
        settings,
        store,
        conn,
        # Changes whenever the connection drops or comes back.
        epoch=lambda: conn.connects if conn.connected else -1,
    )
    luo_service.load_incoming(daemon, handoff, restore)

    async def on_message(m: Message) -> None:
        props = (m.content_type, m.response_topic, m.correlation)
        await daemon.handle(m.topic, m.payload, props, retain=m.retain)

    conn.on_message = on_message
    conn.on_connect = daemon.publish_all

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async with asyncio.TaskGroup() as tg:
        tasks = [
            tg.create_task(daemon.run(), name="worker"),
            tg.create_task(conn.run(), name="bus"),
            tg.create_task(_deadlines(daemon), name="deadlines"),
        ]
        if handoff is not None:
            finish = luo_service.finish_when_released(daemon, handoff)
            tasks.append(tg.create_task(finish, name="luo"))
        await daemon.resume()
        with contextlib.suppress(KhodError):
            await conn.wait_connected(30)
        sdnotify.notify("READY=1", f"STATUS=khod {__version__} on {url}")
        log.info(
            "khod %s running: host %s, broker %s, state %s",
            __version__,
            settings.host_id,
            url,
            settings.state_dir,
        )
        await stop.wait()
        sdnotify.notify("STOPPING=1")
        log.info("stopping")
        await daemon.commit.finish_describing()
        # Said explicitly: a clean disconnect does not fire the will.
        await daemon.publish_offline()
        for t in tasks:
            t.cancel()
    return 0


async def _deadlines(daemon: Daemon) -> None:
    """Deadlines, the progress topic, systemd STATUS, and the watchdog.

    The watchdog is fed from here, after a tick that went through the
    daemon's worker: a daemon wedged inside a request stops feeding it and
    systemd restarts it. A commit runs beside the worker (an exec command
    may take minutes), so a healthy commit never starves the watchdog.
    """
    last = ""
    watchdog = sdnotify.watchdog_interval() is not None
    while True:
        await daemon.tick()
        if watchdog:
            sdnotify.notify("WATCHDOG=1")
        status = daemon.handover_signal()
        line = f"STATUS=handover {status.id or '-'}: {status.state}"
        if line != last:
            sdnotify.notify(line)
            last = line
        await asyncio.sleep(TICK)


def main(config: Path | None, *, restore: Path | None = None) -> int:
    setup_logging()
    try:
        settings = load_settings(config)
        backend.check_backend(settings)
    except ConfigError as exc:
        print(f"khod: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(settings, restore=restore))
    except ConfigError as exc:
        print(f"khod: {exc}", file=sys.stderr)
        return 2
    except KhodError as exc:
        print(f"khod: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:  # from inside the TaskGroup (e.g. the store failed)
        ours = group.subgroup(lambda e: isinstance(e, KhodError))
        if ours is None:
            raise
        for err in _leaves(ours):
            print(f"khod: {err}", file=sys.stderr)
        return 1


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    return [
        leaf
        for e in group.exceptions
        for leaf in (_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    ]
