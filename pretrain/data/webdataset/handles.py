"""A pool of read-only shard file descriptors, shared by a process's reader threads."""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Sequence


class FileHandles:
    """Lazily opened read-only descriptors, at most ``capacity`` open, safe across reader threads.

    A descriptor in use by a ``pread`` is never closed under it: eviction closes only idle ones.
    Not pickled (each grain worker process opens its own).
    """

    def __init__(self, paths: Sequence[str], capacity: int):
        self._paths = paths
        self._capacity = capacity
        self._lock = threading.Lock()
        self._open: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._in_use: collections.Counter[int] = collections.Counter()

    def read(self, shard: int, offset: int, size: int) -> bytes:
        fd = self._acquire(shard)
        try:
            chunks = []
            while size > 0:
                chunk = os.pread(fd, size, offset)
                if not chunk:  # the shard shrank since it was indexed: return what is there
                    break
                chunks.append(chunk)
                offset += len(chunk)
                size -= len(chunk)
            return b"".join(chunks)
        finally:
            self._release(shard)

    def _acquire(self, shard: int) -> int:
        with self._lock:
            fd = self._open.get(shard)
            if fd is None:
                fd = os.open(self._paths[shard], os.O_RDONLY)
                self._open[shard] = fd
            self._open.move_to_end(shard)
            self._in_use[shard] += 1
            self._evict_idle()
            return fd

    def _release(self, shard: int) -> None:
        with self._lock:
            self._in_use[shard] -= 1
            if self._in_use[shard] == 0:
                del self._in_use[shard]
            self._evict_idle()

    def _evict_idle(self) -> None:
        for shard in list(self._open):
            if len(self._open) <= self._capacity:
                return
            if shard not in self._in_use:
                os.close(self._open.pop(shard))

    def close(self) -> None:
        with self._lock:
            for shard in [s for s in self._open if s not in self._in_use]:
                os.close(self._open.pop(shard))
