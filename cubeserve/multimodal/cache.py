"""A thread-safe LRU bounded by the byte size of its values, shared by the media caches:
decoded media in the frontend processor and encoded media in the engine's encode stage."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteBoundedLRU(Generic[K, V]):
    """Least-recently-used entries are evicted once the values' bytes exceed the capacity.

    A value larger than the whole capacity is not stored (a capacity of 0 disables the cache).
    ``hits`` / ``queries`` count ``get`` calls.
    """

    def __init__(self, capacity_bytes: int, nbytes: Callable[[V], int]) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"cache capacity must be >= 0 bytes, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._nbytes = nbytes
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.used_bytes = 0
        self.hits = 0
        self.queries = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        with self._lock:
            self.queries += 1
            entry = self._entries.get(key)
            if entry is None:
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: K, value: V) -> None:
        size = self._nbytes(value)
        if size > self.capacity_bytes:
            return
        with self._lock:
            replaced = self._entries.pop(key, None)
            if replaced is not None:
                self.used_bytes -= replaced[1]
            self._entries[key] = (value, size)
            self.used_bytes += size
            while self.used_bytes > self.capacity_bytes:
                _, (_, evicted_size) = self._entries.popitem(last=False)
                self.used_bytes -= evicted_size
