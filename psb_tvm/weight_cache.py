"""The weight cache of modules sampled at run time: one draw's weights kept for the next call.

A sampled module's call is ``weights(samples, seed)`` (sample, then pack the integer weights into
the kernels' layouts) followed by ``cached(inputs, samples, weights)``, the same integer network a
frozen module runs. Repeated calls at the same per-layer n and seed reuse the weights, so they cost
what a frozen call costs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from .errors import ConfigError

#: Default bound of one module's cache: the int16 weights of a ResNet-18 are 22 MiB a draw, so
#: this keeps about ten configurations.
DEFAULT_MAX_BYTES = 256 << 20


def tensor_bytes(tensor) -> int:
    """Bytes held by a TVM tensor (from its shape and dtype, without copying it)."""
    dtype = np.dtype(str(tensor.dtype))
    return int(np.prod([int(d) for d in tensor.shape], dtype=np.int64)) * dtype.itemsize


class WeightCache:
    """A least-recently-used map ``key -> list of tensors`` bounded in bytes; thread-safe.

    ``get(key, make)`` returns the entry, calling ``make()`` on a miss (outside the lock: two
    threads missing the same key both make it, and the first stored wins; the draws are identical).
    An entry larger than ``max_bytes`` is returned but not kept; ``max_bytes = 0`` disables the cache.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self._lock = threading.Lock()
        self._entries: OrderedDict = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self._max_bytes = 0
        self.max_bytes = max_bytes

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ConfigError(f"weight_cache_bytes (the weight cache's max_bytes) must be an int >= 0, got {value!r} "
                              f"({type(value).__name__})")
        with self._lock:
            self._max_bytes = int(value)
            self._evict()

    @property
    def enabled(self) -> bool:
        return self._max_bytes > 0

    def _evict(self) -> None:
        while self._entries and self._bytes > self._max_bytes:
            _, (_, size) = self._entries.popitem(last=False)
            self._bytes -= size

    def get(self, key, make):
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[0]
            self.misses += 1
        value = make()
        size = sum(tensor_bytes(t) for t in value)
        with self._lock:
            if key in self._entries:  # another thread stored it meanwhile
                self._entries.move_to_end(key)
                return self._entries[key][0]
            if 0 < size <= self._max_bytes:
                self._entries[key] = (value, size)
                self._bytes += size
                self._evict()
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> dict:
        """``{"entries", "bytes", "max_bytes", "hits", "misses"}``."""
        with self._lock:
            return {"entries": len(self._entries), "bytes": self._bytes, "max_bytes": self._max_bytes,
                    "hits": self.hits, "misses": self.misses}

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._entries
