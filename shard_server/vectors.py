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
    """Rows in read-only parts (the snapshot's memory-mapped file; tails frozen by a snapshot's capture until its
    file is mapped in their place) followed by a growable in-memory tail."""

    def __init__(self, dim: int, base: np.ndarray | None = None, *, dtype: str = "float32"):
        self.dim = dim
        self.dtype = STORAGE_DTYPES[dtype]
        # A snapshot written with the other dtype is read as it is; new rows and the next snapshot use `dtype`.
        self._parts: list[np.ndarray] = [base] if base is not None and len(base) else []
        self._mapped = [True] * len(self._parts)  # page cache, not process memory
        self._tail = GrowableArray(self.dtype, row_shape=(dim,))
        self._parts_changed()

    def _parts_changed(self) -> None:
        # kept, not computed per read: the re-rank of every search reads them
        self._part_rows = sum(map(len, self._parts))
        self._all_float32 = self.dtype == np.float32 and all(part.dtype == np.float32 for part in self._parts)

    def __len__(self) -> int:
        return self._part_rows + len(self._tail)

    def append(self, vectors: np.ndarray) -> None:
        self._tail.extend(vectors.astype(self.dtype, copy=False))

    def reserve(self, extra_rows: int) -> None:
        self._tail.reserve(extra_rows)

    def freeze(self) -> list[np.ndarray]:
        """Every row, as read-only blocks, for a snapshot: the tail becomes a part and a new tail starts, so that
        rows appended while the snapshot is written do not copy the frozen ones when the tail grows (a captured
        view of the tail kept its old array alive: twice the in-memory vectors during a bulk write, review). The
        caller holds the partition's write lock."""
        if len(self._tail):
            self._parts.append(self._tail.view)
            self._mapped.append(False)
            self._tail = GrowableArray(self.dtype, row_shape=(self.dim,))
            self._parts_changed()
        return list(self._parts)

    def merge_frozen(self, lock) -> None:
        """After a snapshot failed: its frozen parts, and those of the snapshots that failed before it, made one,
        or they would pile up (and every read walk them) for as long as snapshots fail (a full disk: 400 parts,
        searches 0.4 -> 2.3 ms, review). Copied outside `lock` (the partition's), swapped in under its write lock;
        the caller holds the snapshot lock, so no part is frozen or mapped meanwhile."""
        with lock.read():
            frozen = [part for part, mapped in zip(self._parts, self._mapped) if not mapped]
        if len(frozen) < 2:
            return
        merged = np.concatenate(frozen)
        with lock.write():
            keep = len(self._parts) - len(frozen)  # the mapped file comes first
            self._parts[keep:] = [merged]
            self._mapped[keep:] = [False]
            self._parts_changed()

    def rebase(self, mapped: np.ndarray) -> None:
        """Read the first len(mapped) rows, the parts a `freeze` returned, from the snapshot file they were
        written to. The caller holds the partition's write lock."""
        covered, count = 0, 0
        for part in self._parts:
            if covered == len(mapped):
                break
            covered += len(part)
            count += 1
        if covered != len(mapped):  # pragma: no cover - the parts frozen for the snapshot are never split
            raise ValueError(f"{len(mapped)} mapped rows do not cover whole parts")
        self._parts[:count] = [mapped] if len(mapped) else []
        self._mapped[:count] = [True] if len(mapped) else []
        self._parts_changed()

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

    def _blocks(self) -> list[np.ndarray]:
        return [*self._parts, self._tail.view] if len(self._tail) else self._parts

    def _per_block(self, rows, row_shape: tuple[int, ...], compute) -> np.ndarray:
        """float32 ``compute(block, local_rows)`` over the parts and the tail, in the order of ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.empty((0, *row_shape), dtype=np.float32)
        blocks = self._blocks()
        if len(blocks) == 1:  # the common case: every row in the mapped snapshot file, or all in memory
            return compute(blocks[0], rows)
        first = len(blocks[0])
        lo, hi = int(rows.min()), int(rows.max())
        if lo < 0 or hi >= len(self):
            raise IndexError(f"rows {lo}..{hi} of {len(self)}")
        if hi < first:  # the next most common: every row in the file, new ones in the tail
            return compute(blocks[0], rows)
        if len(blocks) == 2:  # the file and the tail: no loop
            if lo >= first:
                return compute(blocks[1], rows - first)
            out = np.empty((len(rows), *row_shape), dtype=np.float32)
            in_first = rows < first
            out[in_first] = compute(blocks[0], rows[in_first])
            out[~in_first] = compute(blocks[1], rows[~in_first] - first)
            return out
        out = None
        start = 0
        for block in blocks:
            stop = start + len(block)
            if lo >= start and hi < stop:
                return compute(block, rows - start)
            inside = (rows >= start) & (rows < stop)
            if inside.any():
                if out is None:
                    out = np.empty((len(rows), *row_shape), dtype=np.float32)
                out[inside] = compute(block, rows[inside] - start)
            start = stop
        return out

    @property
    def all_float32(self) -> bool:
        return self._all_float32

    def scores(self, query: np.ndarray) -> np.ndarray:
        """Inner products of every row with a float32 query, in row order (an exact scan, in place)."""
        parts = [block @ query for block in self._blocks() if len(block)]
        if not parts:
            return np.empty(0, dtype=np.float32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def slice(self, start: int, stop: int) -> np.ndarray:
        return self.take(np.arange(start, stop, dtype=np.int64))

    def chunks(self, chunk_rows: int = 65536):
        """(start, block) over all rows, for streaming to disk without a full copy."""
        start = 0
        for block in self._blocks():
            for offset in range(0, len(block), chunk_rows):
                yield start + offset, block[offset : offset + chunk_rows]
            start += len(block)

    @property
    def resident_nbytes(self) -> int:
        """Anonymous memory held (the memory-mapped file is page cache, not counted)."""
        return self._tail.nbytes + sum(part.nbytes for part, mapped in zip(self._parts, self._mapped) if not mapped)
