"""Exact vectors of one partition, row-aligned with its faiss ids, kept for re-ranking and exact scans.

Rows up to the last snapshot live in the snapshot's ``.npy`` file, memory-mapped (the page cache holds what is
hot; it is not anonymous process memory); rows written since live in a growable in-memory tail. Stored as
float32 (default) or float16 (``ShardConfig.vector_dtype``): float16 halves the file and the page cache, but
numpy's float16 -> float32 conversion dominates the re-rank (800 candidates: 1.35 ms vs 0.12 ms as float32 on
the 2-core development box).
"""

from __future__ import annotations

import mmap
from pathlib import Path

import faiss
import numpy as np

from shard_server.columns import GrowableArray

STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}


def map_npy(path: Path) -> np.ndarray:
    """A read-only view of a ``.npy`` file, memory-mapped with its page tables populated up front.

    np.load(mmap_mode="r") maps lazily: every first touch of a page is a fault, and re-ranking 800 random rows
    of a 1 GB file then costs ~10 ms instead of ~1.5 ms until the whole file has been touched once.
    """
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
        offset = f.tell()
        count = int(np.prod(shape))
        if fortran_order or count == 0:
            return np.load(path, mmap_mode="r") if count else np.empty(shape, dtype=dtype)
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mapped = mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
    return np.frombuffer(mapped, dtype=dtype, count=count, offset=offset).reshape(shape)


def inner_products_by_rows(vectors: np.ndarray, rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``vectors[rows] @ query`` without the gathered copy: faiss reads the rows where they lie.
    ``vectors`` C-contiguous float32 (memory-mapped or not), ``rows`` int64 in range, ``query`` float32."""
    if not vectors.flags.c_contiguous:
        return vectors[rows] @ query
    out = np.empty(len(rows), dtype=np.float32)
    if len(rows):
        faiss.fvec_inner_products_by_idx(faiss.swig_ptr(out), faiss.swig_ptr(query), faiss.swig_ptr(vectors),
                                          faiss.swig_ptr(rows), vectors.shape[1], 1, len(rows))
    return out


class VectorStore:
    def __init__(self, dim: int, base: np.ndarray | None = None, *, dtype: str = "float32"):
        self.dim = dim
        self.dtype = STORAGE_DTYPES[dtype]
        # A snapshot written with the other dtype is read as it is; new rows and the next snapshot use `dtype`.
        self._base = base if base is not None else np.empty((0, dim), dtype=self.dtype)
        self._tail = GrowableArray(self.dtype, row_shape=(dim,))

    def __len__(self) -> int:
        return len(self._base) + len(self._tail)

    def append(self, vectors: np.ndarray) -> None:
        self._tail.extend(vectors.astype(self.dtype, copy=False))

    def reserve(self, extra_rows: int) -> None:
        self._tail.reserve(extra_rows)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 copies of the given rows (sorted or not)."""
        return self._per_block(rows, (self.dim,), lambda block, local: block[local].astype(np.float32, copy=False))

    def inner_products(self, rows: np.ndarray, query: np.ndarray) -> np.ndarray:
        """Inner products of the given rows with a float32 query: the re-rank of a search's candidates.

        float32 rows are read in place by faiss (``fvec_inner_products_by_idx``); gathering them into a copy
        first and multiplying took ~1.5x as long (800 rows of 1M: 0.29 vs 0.20 ms p50,
        ``python -m shard_server.rerank_profile``)."""
        if not self.all_float32:
            return self.take(rows) @ query
        query = np.ascontiguousarray(query, dtype=np.float32)
        return self._per_block(rows, (), lambda block, local: inner_products_by_rows(block, local, query))

    def _per_block(self, rows, row_shape: tuple[int, ...], compute) -> np.ndarray:
        """float32 ``compute(block, local_rows)`` over the memory-mapped base and the in-memory tail, in the
        order of ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        nbase = len(self._base)
        if len(rows) == 0:
            return np.empty((0, *row_shape), dtype=np.float32)
        if rows.max() < nbase:
            return compute(self._base, rows)
        if rows.min() >= nbase:
            return compute(self._tail.view, rows - nbase)
        out = np.empty((len(rows), *row_shape), dtype=np.float32)
        in_base = rows < nbase
        out[in_base] = compute(self._base, rows[in_base])
        out[~in_base] = compute(self._tail.view, rows[~in_base] - nbase)
        return out

    @property
    def all_float32(self) -> bool:
        return self._base.dtype == np.float32 and self.dtype == np.float32

    def scores(self, query: np.ndarray) -> np.ndarray:
        """Inner products of every row with a float32 query, in row order (an exact scan, in place)."""
        parts = [block @ query for block in (self._base, self._tail.view) if len(block)]
        if not parts:
            return np.empty(0, dtype=np.float32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def slice(self, start: int, stop: int) -> np.ndarray:
        return self.take(np.arange(start, stop, dtype=np.int64))

    def chunks(self, chunk_rows: int = 65536):
        """(start, block) over all rows, for streaming to disk without a full copy."""
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
