"""`python -m shard_server.engine_profile [float32|float16]`: where `ShardEngine.search` spends its time.

200k synthetic vectors in one trained partition, reloaded from its snapshot so the exact vectors are
memory-mapped as in production; prints the engine's p50/p99 over 300 different queries (also with
distinct_products), the bare faiss scan,
the re-rank of 800 candidates (cache-hot rows) and a cProfile of the search path. About a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from shard_server import synthetic
from shard_server.blas import limit_numpy_blas_threads
from shard_server.config import ShardConfig
from shard_server.engine import ShardEngine
from shard_server.types import SearchQuery


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shard_server.engine_profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dtype", nargs="?", choices=("float32", "float16"), default="float32",
                        help="the exact vectors' type (default float32)")
    dtype = parser.parse_args(sys.argv[1:] if argv is None else argv).dtype
    limit_numpy_blas_threads(1)
    faiss.omp_set_num_threads(1)
    n = 200_000
    catalogue = synthetic.SyntheticCatalogue(dim=512, clusters=n // 100, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        config = ShardConfig(data_dir=Path(tmp), train_threads=2, vector_dtype=dtype)
        engine = ShardEngine(config)
        engine.load()
        for lo in range(0, n, 10_000):
            engine.upsert(catalogue.records(lo, lo + 10_000))
        engine.train_pending()
        engine.snapshot()
        engine.close()
        engine = ShardEngine(config)
        engine.load()
        queries = catalogue.queries(300)
        for q in queries[:50]:
            engine.search(SearchQuery(vector=q, top_k=10, nprobe=8))
        latencies = []
        for q in queries:
            t0 = time.perf_counter()
            engine.search(SearchQuery(vector=q, top_k=10, nprobe=8))
            latencies.append(time.perf_counter() - t0)
        print(f"vector_dtype {dtype}: ShardEngine.search p50 {np.percentile(latencies, 50) * 1e3:.2f} ms, "
              f"p99 {np.percentile(latencies, 99) * 1e3:.2f} ms")
        distinct = []
        for q in queries:
            t0 = time.perf_counter()
            engine.search(SearchQuery(vector=q, top_k=10, nprobe=8, distinct_products=True))
            distinct.append(time.perf_counter() - t0)
        # product ids here are row // 4 over rows scattered across clusters: the cost of collapsing, not of widening
        print(f"  with distinct_products: p50 {np.percentile(distinct, 50) * 1e3:.2f} ms, "
              f"p99 {np.percentile(distinct, 99) * 1e3:.2f} ms")
        partition = engine.partitions["default"]
        params = faiss.SearchParametersIVF(nprobe=8)
        scan = []
        for q in queries:
            t0 = time.perf_counter()
            partition.ivf.search(q[None, :], 800, params=params)
            scan.append(time.perf_counter() - t0)
        print(f"faiss IVF-PQ scan of 800 candidates p50 {np.median(scan) * 1e3:.2f} ms")
        _, labels = partition.ivf.search(queries[0][None, :], 800, params=params)
        rows = np.sort(labels[0][labels[0] >= 0])
        rerank = []
        for _ in range(300):
            t0 = time.perf_counter()
            partition.vectors.inner_products(rows, queries[0])
            rerank.append(time.perf_counter() - t0)
        print(f"re-rank of 800 cache-hot candidates p50 {np.median(rerank) * 1e3:.2f} ms")
        profile = cProfile.Profile()
        profile.enable()
        for q in queries:
            engine.search(SearchQuery(vector=q, top_k=10, nprobe=8))
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(12)
        engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
