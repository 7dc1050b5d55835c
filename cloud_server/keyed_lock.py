"""One lock per key, kept only while someone holds or waits for it.

The servicer builds a new job under the lock of its name, not under its own lock: two
sessions of one new job still get one Job, and every other job goes on meanwhile. Entries
are dropped when unused, so names made up by peers do not pile up.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator


class KeyedLocks:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[threading.Lock, list[int]]] = {}  # key -> (its lock, [holders + waiters])

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._lock:
            lock, users = self._entries.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._lock:
                users[0] -= 1
                if not users[0]:
                    del self._entries[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
