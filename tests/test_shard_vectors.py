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
