"""Exact vectors of one partition, row-aligned with its faiss ids, kept for re-ranking and exact scans.

Rows up to the last snapshot live in the snapshot's float16 ``.npy`` file, memory-mapped (the page cache holds
what is hot; it is not anonymous process memory); rows written since live in a growable in-memory tail.
"""

from __future__ import annotations

import numpy as np

from shard_server.columns import GrowableArray

STORAGE_DTYPE = np.float16


class VectorStore:
    def __init__(self, dim: int, base: np.ndarray | None = None):
        self.dim = dim
        self._base = base if base is not None else np.empty((0, dim), dtype=STORAGE_DTYPE)
        self._tail = GrowableArray(STORAGE_DTYPE, row_shape=(dim,))

    def __len__(self) -> int:
        return len(self._base) + len(self._tail)

    def append(self, vectors: np.ndarray) -> None:
        self._tail.extend(vectors.astype(STORAGE_DTYPE))

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 copies of the given rows (sorted or not)."""
        rows = np.asarray(rows, dtype=np.int64)
        nbase = len(self._base)
        if len(rows) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        if rows.max() < nbase:
            return self._base[rows].astype(np.float32)
        if rows.min() >= nbase:
            return self._tail.view[rows - nbase].astype(np.float32)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        in_base = rows < nbase
        out[in_base] = self._base[rows[in_base]]
        out[~in_base] = self._tail.view[rows[~in_base] - nbase]
        return out

    def slice(self, start: int, stop: int) -> np.ndarray:
        return self.take(np.arange(start, stop, dtype=np.int64))

    def chunks(self, chunk_rows: int = 65536):
        """(start, float16 block) over all rows, for streaming to disk without a full copy."""
        nbase = len(self._base)
        for start in range(0, nbase, chunk_rows):
            yield start, self._base[start : min(nbase, start + chunk_rows)]
        tail = self._tail.view
        for start in range(0, len(tail), chunk_rows):
            yield nbase + start, tail[start : start + chunk_rows]

    @property
    def resident_nbytes(self) -> int:
        """Anonymous memory held (the memory-mapped base is page cache, not counted)."""
        return self._tail.nbytes
