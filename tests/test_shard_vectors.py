"""The shard's exact vectors: re-rank inner products read in place agree with gathering the rows."""

from __future__ import annotations

import numpy as np
import pytest

from shard_server.vectors import VectorStore, inner_products_by_rows, map_npy

DIM = 32


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_inner_products_of_mapped_and_appended_rows_match_the_gathered_rows(tmp_path, dtype):
    rng = np.random.default_rng(3)
    base = rng.standard_normal((100, DIM)).astype(dtype)
    np.save(tmp_path / "base.npy", base)
    store = VectorStore(DIM, map_npy(tmp_path / "base.npy"), dtype=dtype)
    store.append(rng.standard_normal((50, DIM)).astype(np.float32))
    query = rng.standard_normal(DIM).astype(np.float32)
    for rows in ([], [3], [0, 99], [100, 149], [5, 120, 17, 140, 99, 100], list(range(150))):
        rows = np.array(rows, dtype=np.int64)
        np.testing.assert_allclose(store.inner_products(rows, query), store.take(rows) @ query, rtol=1e-5,
                                   atol=1e-5)


def test_inner_products_by_rows_reads_strided_arrays_too():
    rng = np.random.default_rng(4)
    wide = rng.standard_normal((40, 2 * DIM)).astype(np.float32)
    vectors = wide[:, ::2]  # not C-contiguous: faiss cannot read it in place
    query = rng.standard_normal(DIM).astype(np.float32)
    rows = np.array([39, 0, 7], dtype=np.int64)
    np.testing.assert_allclose(inner_products_by_rows(vectors, rows, query), vectors[rows] @ query, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(inner_products_by_rows(np.ascontiguousarray(vectors), rows, query),
                               vectors[rows] @ query, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_frozen_tail_stays_put_while_rows_are_appended_and_is_rebased_on_its_file(tmp_path, dtype):
    """A snapshot froze views of the in-memory tail; a bulk write growing the tail then copied every row into a new
    array while the views kept the old one (twice the in-memory vectors, review). The tail is now frozen as a
    part of its own, new rows go to a new tail, and the snapshot's file replaces the frozen part."""
    rng = np.random.default_rng(5)
    np.save(tmp_path / "base.npy", rng.standard_normal((100, DIM)).astype(dtype))
    store = VectorStore(DIM, map_npy(tmp_path / "base.npy"), dtype=dtype)
    store.append(rng.standard_normal((50, DIM)).astype(np.float32))
    blocks = store.freeze()
    assert [len(b) for b in blocks] == [100, 50]
    before = store.take(np.arange(150))
    store.reserve(10_000)
    store.append(rng.standard_normal((3_000, DIM)).astype(np.float32))
    assert np.shares_memory(blocks[1], store._parts[1])  # not copied by the tail's growth
    rows = np.array([0, 99, 100, 149, 150, 3_149, 120, 5], dtype=np.int64)
    query = rng.standard_normal(DIM).astype(np.float32)
    np.testing.assert_allclose(store.inner_products(rows, query), store.take(rows) @ query, rtol=1e-5, atol=1e-5)
    tail_rows = store.take(np.arange(150, 3_150))
    np.save(tmp_path / "snapshot.npy", np.concatenate([np.asarray(b, dtype=store.dtype) for b in blocks]))
    store.rebase(map_npy(tmp_path / "snapshot.npy"))
    assert len(store) == 3_150 and len(store._parts) == 1
    np.testing.assert_array_equal(store.take(np.arange(150)), before)
    np.testing.assert_array_equal(store.take(np.arange(150, 3_150)), tail_rows)
    assert store.resident_nbytes == store._tail.nbytes
    with pytest.raises(IndexError):
        store.take(np.array([0, 3_150]))


def test_tails_frozen_by_failed_snapshots_are_one_part(tmp_path):
    """Each capture froze the tail as a part of its own and only a snapshot that was written merged them into its
    file: while snapshots failed (a full disk), parts piled up and every read walked them (400 parts: searches
    0.4 -> 2.3 ms, review)."""
    from shard_server.rwlock import ReadWriteLock

    rng = np.random.default_rng(6)
    np.save(tmp_path / "base.npy", rng.standard_normal((100, DIM)).astype(np.float32))
    store, lock = VectorStore(DIM, map_npy(tmp_path / "base.npy")), ReadWriteLock()
    added = []
    for _ in range(5):  # a write, then a snapshot whose files fail (frozen, never rebased)
        added.append(rng.standard_normal((10, DIM)).astype(np.float32))
        store.append(added[-1])
        store.freeze()
        store.merge_frozen(lock)  # what the engine does after a failed snapshot
    assert len(store._parts) == 2 and len(store) == 150
    np.testing.assert_array_equal(store.take(np.arange(100, 150)), np.concatenate(added))
    with pytest.raises(IndexError):
        store.take(np.array([-1, 0]))
