"""`python -m shard_server.filter_probe`: filtered recall@10 vs the widened probe count (1M benchmark data).

Builds one in-process ShardEngine over the 1M synthetic vectors of `shard_server.compare --vectors 1000000`
(same seed, 4,000 lists), then runs 100 queries with a 10 % price filter at several `filtered_nprobe_floor`
values. This is how the default floor was chosen (shard_server/config.py). About 6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from shard_server.blas import limit_numpy_blas_threads
from shard_server.compare import ground_truth, synthetic_data
from shard_server.config import ShardConfig
from shard_server.engine import ShardEngine
from shard_server.types import Condition, Filter, Range, Record, SearchQuery


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shard_server.filter_probe",
                                description=__doc__.split("\n")[0])
    p.add_argument("--vectors", type=int, default=1_000_000)
    p.add_argument("--selectivity", type=float, default=0.1)
    p.add_argument("--floors", default="16,32,64")
    a = p.parse_args(argv)
    limit_numpy_blas_threads(1)
    data = synthetic_data(n=a.vectors, dim=512, n_queries=200, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        config = ShardConfig(data_dir=Path(tmp), train_threads=2, snapshot_interval_s=1e9,
                             max_records_per_request=100_000)
        engine = ShardEngine(config)
        engine.load()
        for lo in range(0, data.n, 50_000):
            hi = min(data.n, lo + 50_000)
            engine.upsert([Record(image_id=str(i), product_id=str(i), category="c", vector=data.vectors[i],
                                  attributes={"price": float(data.prices[i])}) for i in range(lo, hi)])
        engine.train_pending()
        faiss.omp_set_num_threads(1)
        queries = data.queries[:100]
        truth = ground_truth(data, a.selectivity, queries=queries)
        flt = Filter(all_of=(Condition(field="price", predicate=Range(max=data.price_limit(a.selectivity))),))
        partition = engine.partitions["c"]
        for floor in (int(x) for x in a.floors.split(",")):
            partition.config = dataclasses.replace(partition.config, filtered_nprobe_floor=floor)
            found, latencies = [], []
            for q in queries:
                t0 = time.perf_counter()
                result = engine.search(SearchQuery(vector=q, top_k=10, filter=flt, nprobe=1))
                latencies.append(time.perf_counter() - t0)
                found.append({int(h.image_id) for h in result.hits})
            recall = sum(len(f & set(t.tolist())) for f, t in zip(found, truth)) / truth.size
            print(f"filtered_nprobe_floor {floor} ({partition.nlist} lists): recall@10 {recall:.3f}, "
                  f"p50 {np.median(latencies) * 1e3:.2f} ms")
        engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
