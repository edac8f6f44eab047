"""Start-up: what this boot restores from disk, and what a killed daemon left half-done.

``load_incoming`` decides whether this boot is the far side of a kexec (an
incoming payload to hand back) or not; ``resume`` finishes a handover that
a killed daemon left between frozen and committed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from khod.config import Settings
from khod.handover import Outgoing
from khod.host import Host
from khod.payload import PayloadImage
from khod.persist import Persister
from khod.restore import Claim, Incoming
from khod.store import Store
from khod.worker import Batch
from khod_wire.errors import ConfigError, PayloadError
from khod_wire.protocol import COMMITTING_STATES, HandoverState

log = logging.getLogger(__name__)

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return "unknown"


def load_incoming(
    host: Host,
    store: Store,
    settings: Settings,
    explicit: Path | None,
    *,
    handed_over: Path | None = None,
) -> None:
    """Decide whether this boot restores a payload, and load it.

    With ``--restore`` a bad image is a ConfigError (the operator asked
    for it). Found by itself after a kexec (``handed_over``: the image
    the kernel carried, e.g. retrieved from a LUO session), a missing or
    corrupt image is logged and recorded, and the daemon starts on the
    outgoing side: a host must never be stuck unable to begin its next
    handover.
    """
    rec = store.load_restore()
    h = host.out.handover
    path = explicit or (Path(rec["image"]) if rec is not None else None) or handed_over
    if path is None and h.state is HandoverState.COMMITTED:
        if store.get_meta("boot_id") == boot_id():
            return  # the same boot: the kexec has not happened yet
        path = settings.payload_path
    if path is None:
        return
    try:
        host.image = PayloadImage.from_file(path, base=settings.payload_base)
    except (OSError, PayloadError) as exc:
        what = exc.strerror if isinstance(exc, OSError) else str(exc)
        if explicit is not None:
            raise ConfigError(f"cannot restore {path}: {what}") from None
        log.error("incoming payload %s unusable, not restoring: %s", path, what)
        _new_boot(host, store, None, detail=f"{path}: {what}")
        return
    host.image_path = path
    image = host.image
    if rec is not None and rec["handover_id"] == image.handover_id:
        host.inc = Incoming.from_record(rec["incoming"])
        return
    if store.get_meta("restored") == image.handover_id:
        # e.g. a unit that still says --restore after the restore is over:
        # restoring again would wipe the registrations of this boot.
        log.warning("%s was already restored on this host; not restoring it again", path)
        host.image = host.image_path = None
        return
    now = host.now()
    claims = [
        Claim(e.name, e.compatible, e.instance, e.size, e.sha256.hex(), e.restore_after)
        for e in image.entries
    ]
    inc = Incoming.start(
        image.handover_id, claims, deadline=now + settings.restore_deadline, now=now
    )
    inc.seq = host.next_seq()
    for c in inc.claims.values():
        c.seq = host.next_seq()
    _new_boot(host, store, inc, detail=str(path))


def _new_boot(host: Host, store: Store, inc: Incoming | None, *, detail: str) -> None:
    """Forget the old boot's components (they register anew) and its handover."""
    host.inc = inc
    with store.transaction():
        for name in list(host.out.participants):
            store.delete_participant(name)
            store.delete_fragment(name)
        host.out = Outgoing()
        host.out.handover.seq = host.next_seq()
        host.fragments.clear()
        store.save_handover(host.out.handover.to_record())
        if inc is None:
            store.clear_restore()
        else:
            store.save_restore(host.incoming_record())
        state = "failed" if inc is None else str(inc.state)
        store.record_transition("restore", "start", None, state, detail=detail)
        store.set_meta("seq", str(host.seq))


def resume(host: Host, persist: Persister, batch: Batch) -> None:
    """Finish what a killed daemon left half-done: the commit follows the batch."""
    # A handover whose deadline passed while the daemon was down aborts.
    persist.stage(batch, host.out.check_deadline(now=host.now()))
    state = host.out.handover.state
    if state in COMMITTING_STATES:
        log.info("resuming handover %s from %s", host.out.handover.id, state)
        batch.commit = True
