"""The last step of a handover: link the fragments into a payload.

Separate from the daemon so that the step can be read (and tested) on its
own. It runs inside the blackout, so it only links: the fragments were
validated and hashed when they arrived, and are held in memory since then;
nothing here parses, checks or hashes a fragment again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from khod.handover import Outgoing
from khod.payload_layout import Links, PayloadEntry, layout
from khod.records import Participant
from khod_wire.errors import PayloadError


def entry(p: Participant, fragments: Mapping[str, bytes]) -> PayloadEntry:
    """``p``'s entry in the payload; PayloadError if its fragment is missing."""
    blob = fragments.get(p.name)
    if blob is None or p.fragment_sha256 is None:
        raise PayloadError(f"fragment of {p.name!r} is missing")
    sha = bytes.fromhex(p.fragment_sha256)
    return PayloadEntry(p.name, p.compatible, p.instance, blob, sha, p.restore_after)


def prepare(links: Links, p: Participant, fragments: Mapping[str, bytes]) -> None:
    """Build ``p``'s link node as its fragment arrives, so that assembly only joins."""
    # A participant that cannot be linked is refused at assembly, where the
    # handover aborts with the reason; nothing to say before.
    with contextlib.suppress(PayloadError):
        links.prepare(entry(p, fragments))


def build(
    out: Outgoing, fragments: Mapping[str, bytes], *, base: int, links: Links | None = None
) -> tuple[bytes, dict[str, Any]]:
    """The payload image of ``out``'s handover (entries in freeze order) and its manifest."""
    handover_id = out.handover.id
    if handover_id is None:
        raise PayloadError("no handover to assemble")
    items = [entry(p, fragments) for p in out.payload_order()]
    done = layout(handover_id, items, base=base, links=links)
    return done.image, done.manifest(handover_id, items, base=base)
