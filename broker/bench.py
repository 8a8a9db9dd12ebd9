"""Bulk-ingest throughput through a whole local stack, per broker ingest concurrency (a benchmark, no test):

    .venv/bin/python -m broker.bench --photos 256 --concurrency 1 4

Each concurrency gets a fresh stack (redis, Triton on CPU, 2 shards, broker); 32 photos warm Triton up first.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from broker.catalogue import default_data_dir, grocery_split, iter_items
from broker.client import SyncBrokerClient
from broker.stack import LocalStack, StackConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m broker.bench", description=__doc__)
    p.add_argument("--photos", type=int, default=256)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    p.add_argument("--data", type=Path, default=None)
    args = p.parse_args(argv)
    train = grocery_split(args.data or default_data_dir(), "train")
    files = train[:: max(1, len(train) // args.photos)][: args.photos]
    for concurrency in args.concurrency:
        with tempfile.TemporaryDirectory(prefix="imgsearch-bench-") as work:
            config = StackConfig(work_dir=Path(work), ingest_concurrency=concurrency)
            with LocalStack(config) as stack, SyncBrokerClient(stack.broker_address) as client:
                client.ingest_stream(iter_items(files[:32]), timeout_s=600)
                t0 = time.perf_counter()
                summary = client.ingest_stream(iter_items(files), timeout_s=3600)
                took = time.perf_counter() - t0
                print(
                    f"ingest concurrency {concurrency}: {summary.ingested} photos in {took:.1f}s "
                    f"= {summary.ingested / took:.1f} photos/s",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
