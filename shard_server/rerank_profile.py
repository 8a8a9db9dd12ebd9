"""`python -m shard_server.rerank_profile [--vectors N]`: the cost of re-ranking a search's candidates.

A search re-ranks its top_k x rerank_factor PQ candidates (800) with exact inner products. This times the two
ways to compute them over N random 512-d float32 rows (1M: 2 GiB, far more than the CPU caches, as in a big
shard): gathering the rows into a copy and multiplying (numpy), and faiss reading them in place
(``shard_server.vectors.inner_products_by_rows``, what the shard uses). The two are alternated; medians of
2,000 searches each, with fresh random candidates for every search.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from shard_server.blas import limit_numpy_blas_threads
from shard_server.vectors import inner_products_by_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shard_server.rerank_profile", description=__doc__.split("\n")[0])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--candidates", type=int, default=800)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    limit_numpy_blas_threads(1)
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.vectors, 512), dtype=np.float32)
    query = rng.standard_normal(512, dtype=np.float32)
    ways = {"gather + matmul (numpy)": lambda rows: vectors[rows] @ query,
            "in place (faiss)": lambda rows: inner_products_by_rows(vectors, rows, query)}
    timings: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, way in ways.items():
            for _ in range(2000):
                rows = np.sort(rng.choice(args.vectors, args.candidates, replace=False))
                t0 = time.perf_counter()
                scores = way(rows)
                timings[name].append(time.perf_counter() - t0)
                np.testing.assert_allclose(scores, vectors[rows] @ query, rtol=1e-4, atol=1e-3)
    print(f"re-rank of {args.candidates} random rows of {args.vectors} x 512 float32, one thread:")
    for name, seconds in timings.items():
        print(f"  {name}: p50 {np.percentile(seconds, 50) * 1e3:.3f} ms, p99 {np.percentile(seconds, 99) * 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
