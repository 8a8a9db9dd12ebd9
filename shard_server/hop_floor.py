"""`python -m shard_server.hop_floor`: what one Python gRPC hop costs with no search behind it.

A separate process serves the real ``ShardService.Search`` method (same generated code, same grpc.aio server
options and interceptor as the shard) but answers every request with a canned response of ten hits with four
attributes each, the size of a real top-10; the client sends real 512-d search requests through
``ShardClient`` and times them. The latency it reports is the floor under every gRPC engine of the comparison:
the shard costs at least one such hop, the broker two, whatever the search itself costs.

``--bare`` measures what is left without any of our code: a plain grpc.aio server (no interceptor, no health)
echoing canned bytes of the same sizes (a serialized 512-d query in, a serialized top-10 out), called with raw
bytes. The difference between the two is what our conversions, interceptor and metrics add to a hop.

``--layers N`` splits that difference: it measures, one client each and alternating N times, (1) the bare hop,
(2) the generated ShardService stub and protobuf messages on a plain server, (3) our server plumbing on top
(``start_grpc_service``: interceptor and metrics, health, reflection, lag monitor; the query parsed into a
SearchQuery) and (4) our client on top (``ShardClient``: conversions to and from the frozen dataclasses), which
is the echo shard above; and prints the median p50 of each.

``--broker N`` does the same for the broker's two hops (client -> broker -> shard), one client, alternating N
times, median p50 of each: one bare hop, two bare hops (a plain grpc.aio relay forwarding raw bytes to the bare
echo server), the echo shard through ShardClient (one hop with our code), and the real ``imgsearch-broker``
process in front of the echo shard, called through ``BrokerClient`` with vector queries (two hops with our code:
the broker's conversions, validation, routing, fan-out, merge and metrics). The last minus the second is what
the broker's code and ours on both hops add to the bare two hops.

``--experiments N`` runs ``--broker 1`` N times in fresh processes under each of grpc's two I/O engines (its
default EventEngine, ``GRPC_EXPERIMENTS=``, and iomgr, the services' default, see ``imgsearch.grpc_core``),
alternating, and prints the median p50 of every layer under each: the engine is chosen when a process imports
grpc, so it cannot change inside one run.

``--streams N`` compares unary calls with messages on open streams (what ShardClient and the async BrokerClient
send since 2026-12-05): the bare hop both ways, two bare hops (the raw-bytes relay) both ways, the echo shard
through ShardClient both ways, and the broker over
the echo shard with unary calls on both hops (``--no-shard-search-streams``, ``BrokerClient(search_streams=False)``)
and with streams on both; one client, alternating N times, median p50 of each. Between the bare relay and the
broker it also measures a minimal broker: the generated BrokerService stub serving SearchStream, each message's
vector put into a ShardService SearchStream message on one open stream to the echo shard and its hits copied
into the answer (protobuf to protobuf), with none of our code (no validation, deadlines, metrics, dataclasses,
replicas or merge), called through BrokerClient like the real broker: the real broker minus it is what our code
on the broker adds.

``--apis N`` asks whether grpc's synchronous API would make the bare hop cheaper: the bare hop with a grpc.aio or
a synchronous (thread pool) server, each called from a grpc.aio or a synchronous client, one client, alternating
N times, median p50 of each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from broker.client import BrokerClient
from broker.stack import console_script, free_port, wait_for_port
from imgsearch.grpc_core import IOMGR_EXPERIMENTS
from imgsearch.serving import (
    DEFAULT_EVENT_LOOP,
    EVENT_LOOPS,
    ServerOptions,
    run_event_loop,
    start_grpc_service,
)
from imgsearch.v1 import broker_pb2, broker_pb2_grpc, shard_pb2, shard_pb2_grpc
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
    """Parses the request like the shard (unless told not to), does no search, returns the canned top-10."""

    def __init__(self, *, parse: bool = True) -> None:
        self._response = convert.result_to_proto(canned_result())
        self._parse = parse

    async def Search(self, request, context):
        if self._parse:
            convert.query_from_proto(request)
        return self._response

    async def SearchStream(self, request_iterator, context):
        # What the broker's ShardClient uses: each message a batch, answered with one canned top-10 per search.
        async for request in request_iterator:
            response = shard_pb2.ShardServiceSearchStreamResponse()
            for search in request.searches:
                if self._parse:
                    convert.query_from_proto(search)
                response.outcomes.add().result.CopyFrom(self._response)
            yield response


BARE_SERVICE = "imgsearch.hopfloor.Bare"
BARE_METHOD = f"/{BARE_SERVICE}/Ping"
BARE_STREAM_METHOD = f"/{BARE_SERVICE}/PingStream"
# What serves the hop: raw bytes on a plain server; the generated stub on a plain server; our service plumbing.
SERVERS = ("bare", "bare-sync", "stub", "service", "relay", "stub-relay")
# (label, server, client) from the bare library to the full echo shard; see --layers.
LAYERS = (
    ("grpc.aio, raw bytes", "bare", "bytes"),
    ("+ generated stub, protobuf messages", "stub", "stub"),
    ("+ our server plumbing", "service", "stub"),
    ("+ our client (ShardClient) = echo shard", "service", "ShardClient"),
)


# (label, server, client) of the broker's two hops against one; see --broker. "relay" and "broker" run in front
# of a second process (the bare echo server, the echo shard).
BROKER_LAYERS = (
    ("one bare hop", "bare", "bytes"),
    ("two bare hops (raw-bytes relay)", "relay", "bytes"),
    ("echo shard via ShardClient (one hop)", "service", "ShardClient"),
    ("broker over the echo shard via BrokerClient (two hops)", "broker", "BrokerClient"),
)

# (label, server, client) of one hop and of the broker's two as unary calls and as messages on open streams (the
# services' default since 2026-12-05); see --streams.
STREAM_LAYERS = (
    ("one bare hop, unary call", "bare", "bytes"),
    ("one bare hop, message on an open stream", "bare", "bytes-stream"),
    ("two bare hops (raw-bytes relay), unary calls", "relay", "bytes"),
    ("two bare hops (raw-bytes relay), messages on open streams", "relay", "bytes-stream"),
    ("echo shard via ShardClient, unary Search calls", "service", "ShardClient-unary"),
    ("echo shard via ShardClient, SearchStream", "service", "ShardClient"),
    ("minimal broker (generated stubs, protobuf only) over the echo shard via BrokerClient, streams", "stub-relay",
     "BrokerClient"),
    ("broker over the echo shard via BrokerClient, unary calls on both hops", "broker-unary", "BrokerClient-unary"),
    ("broker over the echo shard via BrokerClient, streams on both hops", "broker", "BrokerClient"),
)

# (label, server, client) of the bare hop through grpc's two Python APIs; see --apis.
APIS = (
    ("grpc.aio server, grpc.aio client", "bare", "bytes"),
    ("sync server, grpc.aio client", "bare-sync", "bytes"),
    ("grpc.aio server, sync client", "bare", "bytes-sync"),
    ("sync server, sync client", "bare-sync", "bytes-sync"),
)


def _bare_handler(*, sync: bool = False) -> grpc.GenericRpcHandler:
    response = canned_response_bytes()

    async def ping(request: bytes, context) -> bytes:
        return response

    def ping_sync(request: bytes, context) -> bytes:
        return response

    async def ping_stream(requests, context):
        async for _ in requests:
            yield response

    handlers = {"Ping": grpc.unary_unary_rpc_method_handler(ping_sync if sync else ping)}
    if not sync:
        handlers["PingStream"] = grpc.stream_stream_rpc_method_handler(ping_stream)
    return grpc.method_handlers_generic_handler(BARE_SERVICE, handlers)


def _serve_sync() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((_bare_handler(sync=True),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def measure_sync(address: str, *, queries: int, dim: int = 512) -> dict:
    """One client on grpc's synchronous API sending raw bytes to the bare server: p50/p99 (ms), searches/s."""
    vectors = np.random.default_rng(0).standard_normal((64, dim)).astype(np.float32)
    payloads = [convert.query_to_proto(SearchQuery(vector=v, top_k=TOP_K)).SerializeToString() for v in vectors]
    with grpc.insecure_channel(address) as channel:
        ping = channel.unary_unary(BARE_METHOD)
        for payload in payloads:  # connect and warm up
            ping(payload, timeout=10)
        latencies = []
        started = time.perf_counter()
        for i in range(queries):
            t0 = time.perf_counter()
            ping(payloads[i % len(payloads)], timeout=10)
            latencies.append(time.perf_counter() - t0)
        wall = time.perf_counter() - started
    return _summary(latencies, concurrency=1, wall_s=wall)


def _summary(latencies: list[float], *, concurrency: int, wall_s: float) -> dict:
    ms = np.asarray(latencies) * 1e3
    return {"concurrency": concurrency, "queries": len(latencies), "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3), "qps": round(len(latencies) / wall_s, 1)}


def canned_response_bytes() -> bytes:
    return convert.result_to_proto(canned_result()).SerializeToString()


class MinimalBroker(broker_pb2_grpc.BrokerServiceServicer):
    """SearchStream of vector queries relayed to the echo shard's SearchStream with the generated stubs and
    nothing else: what the broker's hop costs without any code of ours (see --streams)."""

    def __init__(self, downstream: str) -> None:
        self._shard = shard_pb2_grpc.ShardServiceStub(grpc.aio.insecure_channel(downstream))

    async def SearchStream(self, request_iterator, context):
        shard_call = self._shard.SearchStream()  # one open stream to the shard per incoming stream
        try:
            async for message in request_iterator:
                request = shard_pb2.ShardServiceSearchStreamRequest(timeout_s=message.timeout_s or 10.0)
                search = request.searches.add()
                search.vector.CopyFrom(message.search.vector)
                search.top_k = message.search.top_k
                search.categories.extend(message.search.categories)
                await shard_call.write(request)
                answer = await shard_call.read()
                response = broker_pb2.SearchStreamResponse()
                response.result.hits.extend(answer.outcomes[0].result.hits)
                yield response
        finally:
            shard_call.cancel()


def _relay_handler(downstream: str) -> grpc.GenericRpcHandler:
    """Forwards each raw request to the bare echo server at ``downstream`` and returns its raw answer."""
    channel = grpc.aio.insecure_channel(downstream)
    ping = channel.unary_unary(BARE_METHOD)

    ping_stream = channel.stream_stream(BARE_STREAM_METHOD)

    async def relay(request: bytes, context) -> bytes:
        return await ping(request, timeout=10)

    async def relay_stream(requests, context):
        # one open downstream stream per incoming stream, each message forwarded and answered in turn
        downstream_call = ping_stream()
        try:
            async for request in requests:
                await downstream_call.write(request)
                yield await downstream_call.read()
        finally:
            downstream_call.cancel()

    return grpc.method_handlers_generic_handler(
        BARE_SERVICE, {"Ping": grpc.unary_unary_rpc_method_handler(relay),
                       "PingStream": grpc.stream_stream_rpc_method_handler(relay_stream)})


async def _serve(server_kind: str, downstream: str | None = None) -> None:
    if server_kind in ("bare", "stub", "relay", "stub-relay"):
        server = grpc.aio.server()
        if server_kind == "bare":
            server.add_generic_rpc_handlers((_bare_handler(),))
        elif server_kind == "relay":
            server.add_generic_rpc_handlers((_relay_handler(downstream),))
        elif server_kind == "stub-relay":
            broker_pb2_grpc.add_BrokerServiceServicer_to_server(MinimalBroker(downstream), server)
        else:
            shard_pb2_grpc.add_ShardServiceServicer_to_server(EchoShard(parse=False), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
    else:
        def register(server):
            shard_pb2_grpc.add_ShardServiceServicer_to_server(EchoShard(), server)
            return ["imgsearch.v1.ShardService"]

        options = ServerOptions(host="127.0.0.1", port=0)
        service = await start_grpc_service(options, register, component="hop-floor")
        await service.set_serving(True)
        server, port = service.server, service.port
    print(port, flush=True)
    await server.wait_for_termination()


async def measure(address: str, *, queries: int, concurrency: int, dim: int = 512,
                  client_kind: str = "ShardClient") -> dict:
    """Closed-loop workers sending `queries` searches in all: p50/p99 latency (ms) and searches/s.

    `client_kind`: "bytes" (raw bytes, for the bare server), "stub" (the generated stub with prepared requests),
    "ShardClient" or "BrokerClient" (vector queries to a broker)."""
    vectors = np.random.default_rng(0).standard_normal((64, dim)).astype(np.float32)
    async with contextlib.AsyncExitStack() as stack:
        if client_kind in ("ShardClient", "ShardClient-unary"):
            client = await stack.enter_async_context(
                ShardClient(address, search_streams=client_kind == "ShardClient"))

            async def call(i: int) -> None:
                await client.search(SearchQuery(vector=vectors[i % len(vectors)], top_k=TOP_K), timeout_s=10)
        elif client_kind in ("BrokerClient", "BrokerClient-unary"):
            broker = await stack.enter_async_context(
                BrokerClient(address, timeout_s=10, search_streams=client_kind == "BrokerClient"))

            async def call(i: int) -> None:
                await broker.search(vector=vectors[i % len(vectors)], top_k=TOP_K, use_duplicate_cache=False)
        else:
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(address))
            requests = [convert.query_to_proto(SearchQuery(vector=v, top_k=TOP_K)) for v in vectors]
            if client_kind == "bytes":
                ping = channel.unary_unary(BARE_METHOD)
                payloads = [r.SerializeToString() for r in requests]

                async def call(i: int) -> None:
                    await ping(payloads[i % len(payloads)], timeout=10)
            elif client_kind == "bytes-stream":
                stream = channel.stream_stream(BARE_STREAM_METHOD)()
                payloads = [r.SerializeToString() for r in requests]

                async def call(i: int) -> None:
                    await stream.write(payloads[i % len(payloads)])
                    await stream.read()
            else:
                stub = shard_pb2_grpc.ShardServiceStub(channel)

                async def call(i: int) -> None:
                    await stub.Search(requests[i % len(requests)], timeout=10)

        for i in range(len(vectors)):  # connect and warm up
            await call(i)
        latencies: list[float] = []
        remaining = iter(range(queries))

        async def worker() -> None:
            for i in remaining:
                t0 = time.perf_counter()
                await call(i)
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return _summary(latencies, concurrency=concurrency, wall_s=wall)


class EchoShardProcess:
    """The echo server in its own process (a hop between processes, as in the comparison)."""

    def __init__(self, event_loop: str = DEFAULT_EVENT_LOOP, *, server_kind: str = "service",
                 downstream: str | None = None) -> None:
        self.event_loop = event_loop
        self.server_kind = server_kind
        self.downstream = downstream

    def __enter__(self) -> str:
        args = [sys.executable, "-m", "shard_server.hop_floor", "--serve", self.server_kind,
                "--event-loop", self.event_loop]
        if self.downstream:
            args += ["--downstream", self.downstream]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.isdigit():
            self.proc.kill()
            raise RuntimeError(f"echo shard did not start (got {line!r})")
        return f"127.0.0.1:{line}"

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait()


@contextlib.contextmanager
def broker_process(shard_address: str, work_dir: Path, *extra_args: str) -> Iterator[str]:
    """The real ``imgsearch-broker`` over one shard holding category "all" (vector queries: no Triton or Redis)."""
    shard_map = work_dir / "shard-map.json"
    shard_map.write_text(json.dumps({"shards": {"echo": [shard_address]}, "categories": {"all": "echo"}}))
    port = free_port()
    proc = subprocess.Popen([*console_script("imgsearch-broker"), "--host", "127.0.0.1", "--port", str(port),
                             "--metrics-port", "-1", "--shard-map", str(shard_map),
                             "--triton-url", f"127.0.0.1:{free_port()}", "--dimension", "512", *extra_args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, timeout_s=60, process=proc, name="imgsearch-broker")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def serving(server_kind: str, event_loop: str = DEFAULT_EVENT_LOOP) -> Iterator[str]:
    """The address of a server of `server_kind`, with the bare echo server or echo shard behind a relay or
    broker."""
    with contextlib.ExitStack() as stack:
        if server_kind in ("relay", "stub-relay"):
            echo = "bare" if server_kind == "relay" else "service"
            downstream = stack.enter_context(EchoShardProcess(event_loop, server_kind=echo))
            yield stack.enter_context(EchoShardProcess(event_loop, server_kind=server_kind, downstream=downstream))
        elif server_kind in ("broker", "broker-unary"):
            shard = stack.enter_context(EchoShardProcess(event_loop, server_kind="service"))
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            extra = ("--no-shard-search-streams",) if server_kind == "broker-unary" else ()
            yield stack.enter_context(broker_process(shard, work_dir, *extra))
        else:
            yield stack.enter_context(EchoShardProcess(event_loop, server_kind=server_kind))


async def hop_floor(*, queries: int, concurrencies: tuple[int, ...],
                    event_loop: str = DEFAULT_EVENT_LOOP, bare: bool = False) -> list[dict]:
    """The echo server on `event_loop` (the services' default unless told otherwise), timed from this loop."""
    _, server_kind, client_kind = LAYERS[0] if bare else LAYERS[-1]
    with EchoShardProcess(event_loop, server_kind=server_kind) as address:
        return [await measure(address, queries=queries, concurrency=c, client_kind=client_kind)
                for c in concurrencies]


async def hop_layers(*, queries: int, repeats: int, event_loop: str = DEFAULT_EVENT_LOOP,
                     layers: tuple[tuple[str, str, str], ...] = LAYERS) -> list[dict]:
    """One client through each of `layers`, alternating the order `repeats` times; the median p50 of each."""
    p50s: dict[str, list[float]] = {label: [] for label, _, _ in layers}
    for repeat in range(repeats):
        for label, server_kind, client_kind in (layers if repeat % 2 == 0 else layers[::-1]):
            with serving(server_kind, event_loop) as address:
                if client_kind == "bytes-sync":  # blocks this loop, which has nothing else to do meanwhile
                    result = measure_sync(address, queries=queries)
                else:
                    result = await measure(address, queries=queries, concurrency=1, client_kind=client_kind)
            p50s[label].append(result["p50_ms"])
    return [{"layer": label, "p50_ms": round(float(np.median(values)), 3), "runs": values}
            for label, values in p50s.items()]


def io_engines(*, queries: int, repeats: int) -> list[dict]:
    """`--broker 1` in a fresh process tree per run under each grpc I/O engine, alternating; median p50s."""
    engines = (("EventEngine (grpc default)", ""), ("iomgr (imgsearch default)", IOMGR_EXPERIMENTS))
    p50s: dict[tuple[str, str], list[float]] = {}
    for repeat in range(repeats):
        for engine, experiments in (engines if repeat % 2 == 0 else engines[::-1]):
            run = subprocess.run([sys.executable, "-m", "shard_server.hop_floor", "--broker", "1",
                                  "--queries", str(queries)], env={**os.environ, "GRPC_EXPERIMENTS": experiments},
                                 capture_output=True, text=True, check=True, timeout=600)
            for layer in json.loads(run.stdout):
                p50s.setdefault((layer["layer"], engine), []).extend(layer["runs"])
    return [{"layer": layer, "engine": engine, "p50_ms": round(float(np.median(values)), 3), "runs": values}
            for (layer, engine), values in p50s.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shard_server.hop_floor", description=__doc__.split("\n")[0])
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--concurrency", default="1,8", help="comma list of client counts")
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default=DEFAULT_EVENT_LOOP,
                        help="the event loop of the echo server and of the measuring client")
    parser.add_argument("--bare", action="store_true",
                        help="plain grpc.aio echo of raw bytes: no protobuf, interceptor or metrics of ours")
    parser.add_argument("--layers", type=int, default=0, metavar="N",
                        help="split the hop into layers, one client, alternating N times (see the module doc)")
    parser.add_argument("--downstream", help=argparse.SUPPRESS)
    parser.add_argument("--broker", type=int, default=0, metavar="N",
                        help="the broker's two hops against one and against two bare hops, alternating N times")
    parser.add_argument("--streams", type=int, default=0, metavar="N",
                        help="one hop and the broker's two as unary calls and over open streams, alternating N times")
    parser.add_argument("--apis", type=int, default=0, metavar="N",
                        help="the bare hop with grpc.aio or synchronous server and client, alternating N times")
    parser.add_argument("--experiments", type=int, default=0, metavar="N",
                        help="--broker 1 under grpc's EventEngine and under iomgr, fresh processes, N times each")
    args = parser.parse_args(argv)
    if args.experiments:
        print(json.dumps(io_engines(queries=args.queries, repeats=args.experiments), indent=2))
        return 0
    if args.serve == "bare-sync":
        _serve_sync()
        return 0
    if args.serve:
        run_event_loop(_serve(args.serve, args.downstream), event_loop=args.event_loop)
        return 0
    if args.layers or args.apis or args.broker or args.streams:
        chosen = (LAYERS if args.layers else APIS if args.apis else STREAM_LAYERS if args.streams
                  else BROKER_LAYERS)
        layers = hop_layers(queries=args.queries, repeats=args.layers or args.apis or args.broker or args.streams,
                            event_loop=args.event_loop, layers=chosen)
        print(json.dumps(run_event_loop(layers, event_loop=args.event_loop), indent=2))
        return 0
    levels = tuple(int(c) for c in args.concurrency.split(","))
    floor = hop_floor(queries=args.queries, concurrencies=levels, event_loop=args.event_loop, bare=args.bare)
    result = run_event_loop(floor, event_loop=args.event_loop)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
