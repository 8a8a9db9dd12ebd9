"""`python -m shard_server.small_partition [ROWS ...]`: exact scan vs IVF-PQ for small partitions.

Why a partition stays exact below ``ShardConfig.min_train_rows``: for each size, one partition of the 50k
benchmark's synthetic vectors (the same deterministic catalogue as `shard_server.compare`) is searched by exact
scan, then trained with the shard's derived list count (``nlist_for``: at most n/39 lists) and searched at a
few nprobe values; prints p50/p99 of ``Partition.search`` (in process, one thread) and recall@10 against brute
force. Half a minute for the default sizes on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np

from shard_server import synthetic
from shard_server.blas import limit_numpy_blas_threads
from shard_server.config import ShardConfig
from shard_server.partition import Partition
from shard_server.types import Filter

CATALOGUE_ROWS = 50_000
TOP_K = 10
DEFAULT_SIZES = (2_000, 5_000, 10_000, 12_500)
NPROBES = (1, 4, 16)


def measure(partition: Partition, queries: np.ndarray, truth: np.ndarray, nprobe: int) -> tuple[float, ...]:
    latencies, recalls = [], []
    for query, true_rows in zip(queries, truth, strict=True):
        t0 = time.perf_counter()
        hits = partition.search(query, TOP_K, Filter(), nprobe, False)
        latencies.append(time.perf_counter() - t0)
        recalls.append(len(set(hits.rows.tolist()) & set(true_rows.tolist())) / TOP_K)
    return np.percentile(latencies, 50) * 1e3, np.percentile(latencies, 99) * 1e3, float(np.mean(recalls))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shard_server.small_partition", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", type=int, nargs="*", help=f"partition sizes (default {list(DEFAULT_SIZES)})")
    sizes = parser.parse_args(sys.argv[1:] if argv is None else argv).rows or list(DEFAULT_SIZES)
    limit_numpy_blas_threads(1)
    faiss.omp_set_num_threads(1)
    catalogue = synthetic.SyntheticCatalogue(dim=512, clusters=CATALOGUE_ROWS // 100, seed=0)
    queries = catalogue.queries(300)
    for n in sizes:
        x = catalogue.vectors(0, n)
        truth = np.argsort(-(x @ queries.T), axis=0)[:TOP_K].T
        with tempfile.TemporaryDirectory() as tmp:
            derived = ShardConfig(data_dir=Path(tmp))
            nlist = derived.nlist_for(n)
            partition = Partition("probe", replace(derived, nlist=nlist))  # fixed nlist: trainable at any size
            ids = [synthetic.image_id(i) for i in range(n)]
            partition.append(ids, ids, x, catalogue.attributes(0, n))
            measure(partition, queries[:20], truth[:20], 1)  # warm-up
            print(f"{n:>7} rows  exact scan         p50 %.3f ms  p99 %.3f ms  recall@10 %.3f"
                  % measure(partition, queries, truth, 1), flush=True)
            t0 = time.perf_counter()
            partition.train_and_swap()
            train_s = time.perf_counter() - t0
            for nprobe in NPROBES:
                print(f"{n:>7} rows  IVF{nlist} nprobe {nprobe:<3} p50 %.3f ms  p99 %.3f ms  recall@10 %.3f"
                      % measure(partition, queries, truth, nprobe) + f"  (trained in {train_s:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
