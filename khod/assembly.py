"""The last step of a handover: link the stored fragments into a payload.

Separate from the daemon so that the step can be read (and tested) on its
own: collect the fragments in freeze order, assemble, read the result back
(a payload that would not restore is never committed), describe it.
"""

from __future__ import annotations

from typing import Any

from khod.errors import PayloadError, StoreError
from khod.handover import Outgoing
from khod.payload import PayloadEntry, PayloadImage, assemble
from khod.store import Store


def entries(out: Outgoing, store: Store) -> list[PayloadEntry]:
    """The payload's entries in freeze order; PayloadError if a fragment is unusable."""
    result = []
    for p in out.payload_order():
        try:
            blob = store.get_fragment(p.name)
        except StoreError as exc:  # e.g. its checksum no longer matches
            raise PayloadError(f"fragment of {p.name!r}: {exc}") from None
        if blob is None or p.fragment_sha256 is None:
            raise PayloadError(f"fragment of {p.name!r} is missing from the store")
        sha = bytes.fromhex(p.fragment_sha256)
        result.append(PayloadEntry(p.name, p.compatible, p.instance, blob, sha, p.restore_after))
    return result


def build(out: Outgoing, store: Store, *, base: int) -> tuple[bytes, dict[str, Any]]:
    """The payload image of ``out``'s handover and its manifest."""
    handover_id = out.handover.id
    if handover_id is None:
        raise PayloadError("no handover to assemble")
    image = assemble(handover_id, entries(out, store), base=base)
    return image, PayloadImage.parse(image, base=base).manifest()
