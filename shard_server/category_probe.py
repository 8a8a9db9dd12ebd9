"""`python -m shard_server.category_probe [CATEGORIES ...]`: what a search over every category costs as a shard
holds more of them.

Each category is a partition with its own index, and a search without categories searches each one. For each
count, the same 20,000 synthetic vectors (512-d) are spread evenly over that many categories of one in-process
ShardEngine (small partitions stay exact, as in a real shard), and 200 queries search every category, then one;
prints p50/p99 of ``ShardEngine.search`` (one thread). Keep categories coarse where searches span them all, and put
fine ones (a leaf category, a brand) in a filterable attribute instead.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from shard_server import synthetic
from shard_server.blas import limit_numpy_blas_threads
from shard_server.config import ShardConfig
from shard_server.engine import ShardEngine
from shard_server.types import SearchQuery

ROWS = 20_000
QUERIES = 200
DEFAULT_COUNTS = (1, 10, 100, 1_000, 2_000)


def percentiles_ms(engine: ShardEngine, queries: np.ndarray, categories: tuple[str, ...]) -> tuple[float, float]:
    latencies = []
    for query in queries:
        t0 = time.perf_counter()
        engine.search(SearchQuery(vector=query, top_k=10, categories=categories))
        latencies.append(time.perf_counter() - t0)
    return float(np.percentile(latencies, 50) * 1e3), float(np.percentile(latencies, 99) * 1e3)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m shard_server.category_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("categories", type=int, nargs="*", help=f"category counts (default {DEFAULT_COUNTS})")
    counts = tuple(parser.parse_args(argv).categories) or DEFAULT_COUNTS
    limit_numpy_blas_threads(1)
    catalogue = synthetic.SyntheticCatalogue(dim=512, clusters=200, seed=3)
    queries = catalogue.queries(QUERIES)
    print(f"{ROWS} vectors, {QUERIES} queries, top 10, in process, one thread")
    print("| categories | vectors each | every category p50 / p99 ms | one category p50 / p99 ms |")
    print("|---:|---:|---|---|")
    for count in counts:
        with tempfile.TemporaryDirectory() as tmp:
            engine = ShardEngine(ShardConfig(data_dir=Path(tmp), dimension=512, min_train_rows=10 * ROWS))
            engine.load()
            per = ROWS // count
            records = [r for c in range(count)
                       for r in catalogue.records(c * per, (c + 1) * per, category=f"category-{c:05d}")]
            for start in range(0, len(records), 5_000):
                engine.upsert(records[start:start + 5_000])
            every = percentiles_ms(engine, queries, ())
            one = percentiles_ms(engine, queries, ("category-00000",))
            print(f"| {count} | {per} | {every[0]:.2f} / {every[1]:.2f} | {one[0]:.2f} / {one[1]:.2f} |", flush=True)
            engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
