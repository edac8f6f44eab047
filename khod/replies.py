"""Exactly one answer per request: the daemon's cache of recent replies.

A client re-sends a request with the same correlation data until it hears
a reply (across broker restarts, for instance). The daemon answers such a
replay from this cache instead of acting twice. The key covers the request
topic and a digest of its body too: a client that reuses correlation data
for a *different* request gets that request executed, not someone else's
answer. Bounded by count and by bytes, since replies may carry fragments.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

#: A digest of the request topic, response topic, correlation data and body:
#: fixed-size whatever the request, and the same in memory and in the store.
Key = bytes


class ReplyCache:
    def __init__(self, *, max_entries: int = 4096, max_bytes: int = 16 * 1024 * 1024) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Key, tuple[bytes, str]] = OrderedDict()
        self._bytes = 0

    @staticmethod
    def key(topic: str, body: bytes, response_topic: str, correlation: bytes) -> Key:
        h = hashlib.sha256()
        for part in (topic.encode(), response_topic.encode(), correlation):
            # Length-prefixed, so that no two different requests hash alike.
            h.update(len(part).to_bytes(4, "big"))
            h.update(part)
        h.update(hashlib.sha256(body).digest())
        return h.digest()

    def get(self, key: Key) -> tuple[bytes, str] | None:
        return self._entries.get(key)

    def put(self, key: Key, reply: bytes, content_type: str) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old[0])
        self._entries[key] = (reply, content_type)
        self._bytes += len(reply)
        while self._entries and (
            len(self._entries) > self.max_entries or self._bytes > self.max_bytes
        ):
            _, (evicted, _) = self._entries.popitem(last=False)
            self._bytes -= len(evicted)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        return self._bytes
