"""`python -m shard_server.hop_floor`: what one Python gRPC hop costs with no search behind it.

A separate process serves the real ``ShardService.Search`` method (same generated code, same grpc.aio server
options and interceptor as the shard) but answers every request with a canned response of ten hits with four
attributes each, the size of a real top-10; the client sends real 512-d search requests through
``ShardClient`` and times them. The latency it reports is the floor under every gRPC engine of the comparison:
the shard costs at least one such hop, the broker two, whatever the search itself costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

import numpy as np
from imgsearch.serving import EVENT_LOOPS, ServerOptions, run_event_loop, start_grpc_service
from imgsearch.v1 import shard_pb2_grpc

from shard_server import convert
from shard_server.client import ShardClient
from shard_server.types import Hit, SearchQuery, SearchResult

TOP_K = 10


def canned_result() -> SearchResult:
    return SearchResult(
        hits=tuple(
            Hit(image_id=f"img-{i:08d}", product_id=f"product-{i:07d}", category="all", score=0.9 - 0.01 * i,
                attributes={"brand": "brand-07", "colour": "colour-3", "price": 12.5 + i, "in_stock": True})
            for i in range(TOP_K)
        ),
        candidates_scanned=800,
    )


class EchoShard(shard_pb2_grpc.ShardServiceServicer):
    """Parses the request like the shard, does no search, returns the canned top-10."""

    def __init__(self) -> None:
        self._response = convert.result_to_proto(canned_result())

    async def Search(self, request, context):
        convert.query_from_proto(request)
        return self._response


async def _serve(event_loop: str) -> None:
    def register(server):
        shard_pb2_grpc.add_ShardServiceServicer_to_server(EchoShard(), server)
        return ["imgsearch.v1.ShardService"]

    service = await start_grpc_service(ServerOptions(host="127.0.0.1", port=0, event_loop=event_loop), register, component="hop-floor")
    await service.set_serving(True)
    print(service.port, flush=True)
    await service.server.wait_for_termination()


async def measure(address: str, *, queries: int, concurrency: int, dim: int = 512) -> dict:
    """Closed-loop workers sending `queries` searches in all: p50/p99 latency (ms) and searches/s."""
    vectors = np.random.default_rng(0).standard_normal((64, dim)).astype(np.float32)
    async with ShardClient(address) as client:
        for v in vectors:  # connect and warm up
            await client.search(SearchQuery(vector=v, top_k=TOP_K), timeout_s=10)
        latencies: list[float] = []
        remaining = iter(range(queries))

        async def worker() -> None:
            for i in remaining:
                t0 = time.perf_counter()
                await client.search(SearchQuery(vector=vectors[i % len(vectors)], top_k=TOP_K), timeout_s=10)
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1e3
    return {"concurrency": concurrency, "queries": queries, "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3), "qps": round(queries / wall, 1)}


class EchoShardProcess:
    """The echo server in its own process (a hop between processes, as in the comparison)."""

    def __init__(self, event_loop: str = "uvloop") -> None:
        self.event_loop = event_loop

    def __enter__(self) -> str:
        self.proc = subprocess.Popen([sys.executable, "-m", "shard_server.hop_floor", "--serve",
                                      "--event-loop", self.event_loop], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.isdigit():
            self.proc.kill()
            raise RuntimeError(f"echo shard did not start (got {line!r})")
        return f"127.0.0.1:{line}"

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait()


async def hop_floor(*, queries: int, concurrencies: tuple[int, ...], event_loop: str = "uvloop") -> list[dict]:
    """The echo server on `event_loop` (the shard's default unless told otherwise), measured from this loop."""
    with EchoShardProcess(event_loop) as address:
        return [await measure(address, queries=queries, concurrency=c) for c in concurrencies]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shard_server.hop_floor", description=__doc__.split("\n")[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--concurrency", default="1,8", help="comma list of client counts")
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default="uvloop",
                        help="the event loop of the echo server and of the measuring client")
    args = parser.parse_args(argv)
    if args.serve:
        run_event_loop(_serve(args.event_loop), event_loop=args.event_loop)
        return 0
    levels = tuple(int(c) for c in args.concurrency.split(","))
    result = run_event_loop(hop_floor(queries=args.queries, concurrencies=levels, event_loop=args.event_loop),
                            event_loop=args.event_loop)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
