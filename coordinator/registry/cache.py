"""Registry answers kept as encoded JSON, valid while the registry generation stands.

Researchers ask the same searches again and again (the first page of
everything, a site, a modality, a label; the UI's landing views), and each one
costs milliseconds of SQL and serialisation in the server's one process. An
answer is kept under the registry generation read before it was computed
(``registry_generation.value``, bumped by database triggers on every write to
exams, series, instances, labels, clinical values and site names, whichever
process writes; migration 0004) and served only to a request that read the
same generation.

Why an answer can never be older than the registry a request sees: the
generation is read before the answer is computed, so an answer holds at least
the writes that generation counts; a request that reads a newer generation
misses and computes again. The cache holds one generation at a time: seeing
another one (a write, a race at a write, a restored database) empties it.

Bounded in bytes (least recently used out first); answers larger than a
sixteenth of the bound are not kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

from sqlalchemy import Connection, text

_GENERATION = text("SELECT value FROM registry_generation WHERE id = 1")


def generation(connection: Connection) -> int:
    """The registry generation now (one primary-key read)."""
    return int(connection.execute(_GENERATION).scalar() or 0)


class ResponseCache:
    """Encoded answers of one registry generation, at most ``max_bytes`` of them."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f'Argument "max_bytes" must be 0 or more, not {max_bytes}.')
        self.max_bytes = max_bytes
        self.max_entry = max_bytes // 16
        self._lock = threading.Lock()
        self._generation: int | None = None
        self._entries: OrderedDict[Hashable, bytes] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def _adopt(self, generation: int) -> bool:
        """Hold ``generation`` from now on (emptying the cache); whether it changed."""
        if generation == self._generation:
            return False
        self._generation = generation
        self._entries.clear()
        self._bytes = 0
        return True

    def get(self, generation: int, key: Hashable) -> bytes | None:
        """The answer kept for ``key`` at ``generation``, or None (counted as a miss)."""
        with self._lock:
            body = None if self._adopt(generation) else self._entries.get(key)
            if body is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return body

    def put(self, generation: int, key: Hashable, body: bytes) -> None:
        """Keep ``body`` for ``key`` at ``generation`` (unless too large for the bound)."""
        if not self.enabled or len(body) > self.max_entry:
            return
        with self._lock:
            self._adopt(generation)
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._entries[key] = body
            self._bytes += len(body)
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= len(evicted)

    @property
    def size(self) -> tuple[int, int]:
        """(answers, bytes) held now."""
        with self._lock:
            return len(self._entries), self._bytes
