"""`python -m shard_server.compaction_probe`: a catalogue re-ingested again and again (to update its prices).

Each ingest of an image already held replaces its row: the old row is tombstoned, and before compaction it
stayed in the partition for good, so every exact search scored it and every snapshot wrote it. This ingests the
same images `--ingests` times into a real engine with its background threads running (training, compaction,
snapshots) and prints, after some of the ingests, the live and stored rows, the exact-search p50 and whether an
exact scan still runs on the event loop (below `exact_scan_max_rows`), then the size of a snapshot.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from shard_server.config import ShardConfig
from shard_server.engine import ShardEngine
from shard_server.partition import ExactScanTooLong
from shard_server.types import Record, SearchQuery


def _search_ms(engine: ShardEngine, query: np.ndarray, repeats: int = 20) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.search(SearchQuery(vector=query, top_k=10))
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def run(data_dir: Path, *, images: int, ingests: int, dim: int, settle_s: float) -> dict:
    engine = ShardEngine(ShardConfig(data_dir=data_dir, dimension=dim))
    engine.load()
    engine.start_background()
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((images, dim)).astype(np.float32)
    query = rng.standard_normal(dim).astype(np.float32)
    rounds = []
    try:
        for ingest in range(1, ingests + 1):
            for start in range(0, images, 2_000):
                engine.upsert([Record(image_id=f"img-{i}", product_id=f"p-{i}", category="all", vector=vectors[i],
                                      attributes={"price": float(ingest)}) for i in range(start, min(images, start + 2_000))])
            time.sleep(settle_s)  # the training thread's round (it wakes on writes)
            partition = engine.partitions["all"]
            try:
                engine.search(SearchQuery(vector=query, top_k=10), exact_rows_limit=engine.config.exact_scan_max_rows)
                on_loop = True
            except ExactScanTooLong:
                on_loop = False
            rounds.append({"ingest": ingest, "live_rows": partition.live_count, "rows": len(partition.image_ids),
                           "search_p50_ms": round(_search_ms(engine, query), 2), "exact_scan_on_event_loop": on_loop})
            print(json.dumps(rounds[-1]), flush=True)
        engine.snapshot()
        snapshot_bytes = sum(f.stat().st_size for f in (data_dir / "snapshots").rglob("*") if f.is_file())
    finally:
        engine.close()
    return {"images": images, "dim": dim, "rounds": rounds, "snapshot_bytes": snapshot_bytes,
            "live_vector_bytes": images * dim * 4}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4_000)
    parser.add_argument("--ingests", type=int, default=11)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--settle-s", type=float, default=1.0, help="wait after each ingest")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args(argv)
    if args.images < 1 or args.ingests < 1 or args.dim < 1 or args.settle_s < 0:
        parser.error("--images, --ingests and --dim must be at least 1, --settle-s at least 0")
    with tempfile.TemporaryDirectory() as tmp:
        figures = run(args.data_dir or Path(tmp), images=args.images, ingests=args.ingests, dim=args.dim,
                      settle_s=args.settle_s)
    print(json.dumps({k: v for k, v in figures.items() if k != "rounds"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
