"""`python -m shard_server.snapshot_probe --categories N`: how long a write waits for a snapshot.

A snapshot is taken of the partitions while no write is applied (writes after its log boundary wait); before
2026-12-06 the whole dump (about 5 files per partition, each fsynced) was written while they waited. This stores one
vector in each of N categories, starts a snapshot, issues a 1-record upsert 0.5 s into it and prints how long the
snapshot and the upsert took.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from shard_server.config import ShardConfig
from shard_server.engine import ShardEngine
from shard_server.types import Record


def run(data_dir: Path, categories: int, *, after_s: float = 0.5) -> dict:
    engine = ShardEngine(ShardConfig(data_dir=data_dir, dimension=8))
    engine.load()
    vectors = np.random.default_rng(0).standard_normal((categories, 8)).astype(np.float32)
    engine.upsert([Record(image_id=f"img-{i}", product_id="p", category=f"category-{i:05d}", vector=vectors[i])
                   for i in range(categories)])
    snapshot = threading.Thread(target=engine.snapshot)
    t0 = time.perf_counter()
    snapshot.start()
    time.sleep(after_s)
    t1 = time.perf_counter()
    engine.upsert([Record(image_id="late", product_id="p", category="category-00000", vector=vectors[0])])
    upsert_s = time.perf_counter() - t1
    snapshot.join()
    snapshot_s = time.perf_counter() - t0
    engine.close()
    return {"categories": categories, "snapshot_s": round(snapshot_s, 2), "upsert_issued_after_s": after_s,
            "upsert_s": round(upsert_s, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--categories", type=int, default=5_000)
    args = parser.parse_args(argv)
    if args.categories < 1:
        parser.error("--categories must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run(Path(tmp), args.categories)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
