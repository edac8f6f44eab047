"""The last step of a handover: link the fragments into a payload.

Separate from the daemon so that the step can be read (and tested) on its
own. It runs inside the blackout, so it only links: the fragments were
validated and hashed when they arrived, and are held in memory since then;
nothing here parses, checks or hashes a fragment again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from khod.handover import Outgoing
from khod.payload_layout import PayloadEntry, layout
from khod_wire.errors import PayloadError


def _entries(out: Outgoing, fragments: Mapping[str, bytes]) -> list[PayloadEntry]:
    """The payload's entries in freeze order; PayloadError if a fragment is missing."""
    result = []
    for p in out.payload_order():
        blob = fragments.get(p.name)
        if blob is None or p.fragment_sha256 is None:
            raise PayloadError(f"fragment of {p.name!r} is missing")
        sha = bytes.fromhex(p.fragment_sha256)
        result.append(PayloadEntry(p.name, p.compatible, p.instance, blob, sha, p.restore_after))
    return result


def build(
    out: Outgoing, fragments: Mapping[str, bytes], *, base: int
) -> tuple[bytes, dict[str, Any]]:
    """The payload image of ``out``'s handover and its manifest."""
    handover_id = out.handover.id
    if handover_id is None:
        raise PayloadError("no handover to assemble")
    items = _entries(out, fragments)
    done = layout(handover_id, items, base=base)
    return done.image, done.manifest(handover_id, items, base=base)
