"""What ``khod run`` does with the ``luo`` backend around the daemon.

Kept out of ``khod.service`` so that the wiring there stays a few lines:
own ``/dev/liveupdate`` at start-up, take the payload the kernel handed over
(or preserve a committed one again after a restart), and FINISH the
retrieved session once the restore is released.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from khod import assembly
from khod.config import Settings
from khod.daemon import Daemon, boot_id
from khod.lifecycle import HandoverState, HostRestoreState
from khod.luo import LuoError
from khod.luo_handoff import LuoHandoff
from khod_wire.errors import ConfigError, KhodError

log = logging.getLogger(__name__)

TICK = 0.25


def open_luo(settings: Settings) -> LuoHandoff | None:
    """With backend "luo", own /dev/liveupdate for as long as khod runs.

    A missing device or one held by another agent is a ConfigError: ``khod
    run`` exits 2 with the reason, having changed nothing.
    """
    if settings.backend != "luo":
        return None
    try:
        return LuoHandoff(settings.host_id)
    except LuoError as exc:
        raise ConfigError(f"backend 'luo': {exc}") from None


def load_incoming(daemon: Daemon, handoff: LuoHandoff | None, restore: Path | None) -> None:
    """``Daemon.load_incoming``, given the image the kernel handed over, if any."""
    handed_over = None
    if handoff is not None:
        handed_over = handoff.receive(daemon.settings.payload_path)
    daemon.load_incoming(restore, handed_over=handed_over)
    if handoff is not None and handed_over is None:
        preserve_again(daemon, handoff)


def preserve_again(daemon: Daemon, handoff: LuoHandoff) -> None:
    """A khod restarted between commit and kexec preserves the same payload again.

    Its predecessor's session closed with it, and the kernel unpreserved the
    image; the fragments (loaded from the store) assemble to the same bytes.
    """
    h = daemon.out.handover
    if h.state is not HandoverState.COMMITTED or daemon.store.get_meta("boot_id") != boot_id():
        return
    try:
        image, _ = assembly.build(daemon.out, daemon.fragments, base=daemon.settings.payload_base)
        handoff.preserve(image)
    except KhodError as exc:
        log.error("handover %s is committed, but cannot be preserved again: %s", h.id, exc)
        return
    log.info("handover %s: payload preserved again in LUO session %s", h.id, handoff.name)


async def finish_when_released(daemon: Daemon, handoff: LuoHandoff) -> None:
    """FINISH the retrieved LUO session once the restore is released."""
    while handoff.incoming is not None:
        if daemon.inc is None or daemon.inc.state is HostRestoreState.RELEASED:
            handoff.finish()
            return
        await asyncio.sleep(TICK)
