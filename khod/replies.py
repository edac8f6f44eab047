"""Exactly one answer per request: reply bodies, and the daemon's cache of recent replies.

A client re-sends a request with the same correlation data until it hears
a reply (across broker restarts, for instance). The daemon answers such a
replay from this cache instead of acting twice. The key covers the request
topic and a digest of its body too: a client that reuses correlation data
for a *different* request gets that request executed, not someone else's
answer.

Bounded by count and by bytes, and the bytes are everything an entry keeps:
the reply, its key (a 32-byte digest of the topics, correlation data and
body: what the client sent is not kept) and a fixed allowance for the Python
objects around them. The daemon also refuses correlation data longer than
``MAX_CORRELATION_DATA``, so that what it digests stays small.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

from khod_wire.errors import KhodError
from khod_wire.protocol import ErrorBody, Reply, encode

#: A digest of the request topic, response topic, correlation data and body:
#: fixed-size whatever the request, and the same in memory and in the store.
Key = bytes

#: What one entry costs beyond the bytes of its reply and key: the headers of
#: two str, three bytes and an int, the key and value tuples (~360 bytes by
#: sys.getsizeof) and the OrderedDict's share (~170 bytes per entry measured
#: with tracemalloc), rounded up, on CPython 3.11-3.13.
ENTRY_OVERHEAD = 640


def entry_size(key: Key, reply: bytes) -> int:
    """The bytes one cache entry accounts for."""
    return ENTRY_OVERHEAD + len(key) + len(reply)


class ReplyCache:
    def __init__(self, *, max_entries: int = 4096, max_bytes: int = 16 * 1024 * 1024) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Key, tuple[bytes, str, int]] = OrderedDict()
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
        entry = self._entries.get(key)
        return None if entry is None else entry[:2]

    def put(self, key: Key, reply: bytes, content_type: str) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[2]
        size = entry_size(key, reply)
        if size > self.max_bytes:
            return  # it would evict everything else and still not fit
        self._entries[key] = (reply, content_type, size)
        self._bytes += size
        while self._entries and (
            len(self._entries) > self.max_entries or self._bytes > self.max_bytes
        ):
            _, (_, _, evicted) = self._entries.popitem(last=False)
            self._bytes -= evicted

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        """Bytes accounted for, keys and overhead included: at most ``max_bytes``."""
        return self._bytes


def ok(op: str, data: dict[str, Any]) -> bytes:
    """The body of a successful reply to ``op``."""
    return encode(Reply(op=op, ok=True, data=data))


def refused(op: str, exc: KhodError) -> bytes:
    """The body of an error reply: the error's stable code and its message."""
    return encode(Reply(op=op, ok=False, error=ErrorBody(code=exc.code, message=str(exc))))


def internal(op: str, exc: Exception) -> bytes:
    """The body of the reply to a request that failed unexpectedly."""
    return encode(Reply(op=op, ok=False, error=ErrorBody(code="internal", message=repr(exc))))
