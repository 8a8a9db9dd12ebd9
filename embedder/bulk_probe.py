"""`python -m embedder.bulk_probe`: do catalogue ingests hold up searches on the embedding model?

Starts a real Triton Inference Server on this machine with the default model, then embeds --photos grocery train
photos as ingests do (concurrent calls of 30 photos, 120 s deadline) alone and while --searchers clients each
embed one val photo every 0.2 s with a 1 s deadline (as searches do), once with the ingest sent as ordinary work
and once as bulk work (`Embedder.embed(..., bulk=True)`, what the broker sends for ingests; see
embedder.client.MicroBatcher). Prints the ingest's time and the searches' latency and errors. About two minutes
on 2 cores, Triton's start included.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np

from broker.catalogue import grocery_split
from embedder.client import TritonEmbedder
from embedder.model_files import default_model_path
from embedder.triton_repo import write_model_repository
from embedder.triton_server import start_triton

CHUNK = 30
SEARCH_EVERY_S = 0.2
SEARCH_TIMEOUT_S = 1.0


async def _ingest(embedder: TritonEmbedder, photos: list[bytes], bulk: bool) -> float:
    started = time.perf_counter()
    await asyncio.gather(*(embedder.embed(photos[i : i + CHUNK], timeout_s=120, bulk=bulk)
                           for i in range(0, len(photos), CHUNK)))
    return time.perf_counter() - started


async def _searcher(embedder, queries, stop: asyncio.Event, latencies: list[float], errors: list[str]) -> None:
    i = 0
    while not stop.is_set():
        started = time.perf_counter()
        try:
            await embedder.embed([queries[i % len(queries)]], timeout_s=SEARCH_TIMEOUT_S)
            latencies.append(time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001 - counted by type
            errors.append(type(exc).__name__)
        i += 1
        await asyncio.sleep(SEARCH_EVERY_S)


async def _probe(url: str, photos: list[bytes], queries: list[bytes], searchers: int) -> None:
    embedder = TritonEmbedder(url)
    try:
        await embedder.embed(photos[:8], timeout_s=120)  # warm-up
        for bulk in (False, True):
            print(f"ingest of {len(photos)} photos alone, bulk={bulk}: {await _ingest(embedder, photos, bulk):.1f} s")
        for bulk in (False, True):
            stop, latencies, errors = asyncio.Event(), [], []
            tasks = [asyncio.ensure_future(_searcher(embedder, queries, stop, latencies, errors))
                     for _ in range(searchers)]
            took = await _ingest(embedder, photos, bulk)
            stop.set()
            await asyncio.gather(*tasks)
            ms = np.array(latencies or [float("nan")]) * 1000
            counts = {name: errors.count(name) for name in sorted(set(errors))}
            print(f"ingest with {searchers} searching clients, bulk={bulk}: ingest {took:.1f} s; searches answered "
                  f"{len(latencies)}, p50 {np.percentile(ms, 50):.0f} ms, p99 {np.percentile(ms, 99):.0f} ms; "
                  f"errors {counts}")
    finally:
        await embedder.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedder.bulk_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--photos", type=int, default=240)
    parser.add_argument("--searchers", type=int, default=2)
    args = parser.parse_args(argv)
    train = grocery_split(args.data, "train")
    photos = [f.path.read_bytes() for f in train[:: max(1, len(train) // args.photos)][: args.photos]]
    queries = [f.path.read_bytes() for f in grocery_split(args.data, "val")[:50]]
    with tempfile.TemporaryDirectory() as tmp:
        repo = write_model_repository(Path(tmp) / "repo", model_path=default_model_path(), instance_kind="KIND_CPU",
                                      embedding_backend="python")
        server = start_triton(repo, startup_timeout_s=300)
        try:
            asyncio.run(_probe(server.grpc_url, photos, queries, args.searchers))
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
