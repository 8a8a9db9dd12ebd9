"""Shard benchmark (not part of `make test`): one `imgsearch-shard` process over N synthetic vectors.

    python -m shard_server.bench --n 1000000 --out docs/bench-shard.json --markdown docs/bench-shard.md
    python -m shard_server.bench --n 50000 --queries 200      # a quick small run

Phases:
 1. ingest: N records through gRPC UpsertStream (atomic streams of --stream-records), training held off;
 2. build: restart the shard with normal settings; it trains IVF-PQ in the background on the whole partition
    (nlist = --nlist-per-sqrt-n * sqrt(N) unless --nlist), adds every vector and swaps; SIGTERM writes a snapshot;
 3. serve: restart from that snapshot (vectors memory-mapped) and measure single-query gRPC Search: recall@10
    against brute force, p50/p99 latency, QPS (1 and --concurrency clients) per nprobe, plus filtered searches;
 4. in process: stop the shard, load the same snapshot into this process and run the same queries through
    ShardEngine.search (and the bare faiss IVF search): the gRPC/in-process latency ratio.
Resident memory: IVF codes+ids per vector (the <= 80 B/vector target), the Stats RPC's resident bytes, and the
process's anonymous RSS (RssAnon: excludes the memory-mapped exact vectors) minus that of an empty shard.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import grpc
import numpy as np

from imgsearch.v1 import shard_pb2_grpc
from shard_server import convert, synthetic
from shard_server.client import ShardClient
from shard_server.config import ShardConfig
from shard_server.engine import ShardEngine
from shard_server.process import ShardProcess
from shard_server.types import Filter, SearchQuery


def rss_anon_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def latency_summary(latencies_s: list[float]) -> dict:
    return {"p50_ms": percentile(latencies_s, 50) * 1e3, "p99_ms": percentile(latencies_s, 99) * 1e3,
            "mean_ms": statistics.fmean(latencies_s) * 1e3}


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.catalogue = synthetic.SyntheticCatalogue(dim=args.dim, clusters=args.clusters, seed=args.seed)
        self.work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="shard-bench-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.work / "data"
        self.nlist = args.nlist or max(1, round(args.nlist_per_sqrt_n * math.sqrt(args.n)))
        self.result: dict = {"n": args.n, "dim": args.dim, "nlist": self.nlist, "factory": args.factory,
                             "rerank_factor": args.rerank_factor, "queries": args.queries,
                             "vector_dtype": ShardConfig.vector_dtype,
                             "machine": {"cpus": len(os.sched_getaffinity(0)),
                                         "platform": platform.platform(),
                                         "load_avg_at_start": list(os.getloadavg())}}

    def shard_args(self, *, training: bool) -> tuple[str, ...]:
        a = self.args
        args = ["--dimension", str(a.dim), "--index-factory", a.factory, "--nlist", str(self.nlist),
                "--rerank-factor", str(a.rerank_factor), "--max-train-points-per-centroid", "39",
                "--search-threads", str(max(2, a.concurrency)), "--snapshot-interval-s", "1000000",
                "--snapshot-wal-bytes", str(1 << 40), "--max-message-bytes", str(64 << 20)]
        if not training:  # hold training off while ingesting, so the build is measured on the whole partition
            args += ["--train-points-per-centroid", str(1 << 40)]
        return tuple(args)

    # --- phases ----------------------------------------------------------------------------------------------
    def run(self) -> dict:
        a = self.args
        print(f"work dir {self.work}; N={a.n} dim={a.dim} nlist={self.nlist} factory={a.factory}", flush=True)
        shard = ShardProcess(self.data_dir, log_path=self.work / "shard.log",
                             extra_args=self.shard_args(training=False)).start()
        try:
            time.sleep(1.0)
            empty_rss = rss_anon_bytes(shard.proc.pid)
            self.result["empty_shard_rss_anon_bytes"] = empty_rss
            t0 = time.perf_counter()
            asyncio.run(self.ingest(shard.address))
            ingest_s = time.perf_counter() - t0
            self.result["ingest"] = {"seconds": ingest_s, "vectors_per_s": a.n / ingest_s}
            print(f"ingested {a.n} in {ingest_s:.1f}s", flush=True)
            t0 = time.perf_counter()
            shard.stop(timeout_s=1800)
            self.result["ingest"]["final_snapshot_s"] = time.perf_counter() - t0

            shard.extra_args = self.shard_args(training=True)
            t0 = time.perf_counter()
            shard.start(timeout_s=1800)
            load_s = time.perf_counter() - t0
            asyncio.run(self.wait_trained(shard.address, timeout_s=a.build_timeout_s))
            build_s = time.perf_counter() - t0 - load_s
            self.result["build"] = {"load_untrained_s": load_s, "train_add_swap_s": build_s}
            print(f"trained+added+swapped in {build_s:.1f}s", flush=True)
            t0 = time.perf_counter()
            shard.stop(timeout_s=1800)
            self.result["build"]["snapshot_s"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            shard.start(timeout_s=1800)
            self.result["restart_load_s"] = time.perf_counter() - t0
            queries = self.catalogue.queries(a.queries)
            truth = self.ground_truth(queries)
            self.result["rpc_floor"] = self.measure_rpc_floor(shard.address)
            engine = self.load_in_process_copy()
            try:
                self.result["search"] = self.measure_paired(shard, engine, queries, truth)
            finally:
                engine.close()
            self.result["grpc_filtered"] = self.measure_filtered_grpc(shard.address, queries[: a.filter_queries])
            stats = asyncio.run(self.stats(shard.address))
            self.result["stats"] = {"index_type": stats.categories[0].index_type,
                                    "vectors": stats.categories[0].vectors,
                                    "resident_bytes": stats.categories[0].resident_bytes,
                                    "resident_bytes_per_vector": stats.categories[0].resident_bytes / a.n}
            rss = rss_anon_bytes(shard.proc.pid)
            self.result["memory"].update({
                "shard_rss_anon_bytes": rss,
                "shard_rss_anon_minus_empty_per_vector": (rss - empty_rss) / a.n,
            })
            shard.stop(timeout_s=600)
            return self.result
        finally:
            shard.kill()
            if not a.keep and not a.work_dir:
                shutil.rmtree(self.work, ignore_errors=True)

    async def ingest(self, address: str) -> None:
        a = self.args
        async with ShardClient(address) as client:
            for lo in range(0, a.n, a.stream_records):
                hi = min(a.n, lo + a.stream_records)
                written = await client.upsert_stream(self.catalogue.iter_records(lo, hi), batch_size=1000,
                                                     timeout_s=600)
                assert written == hi - lo
                if (lo // a.stream_records) % 5 == 0:
                    print(f"  ingested {hi}", flush=True)

    async def wait_trained(self, address: str, *, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        async with ShardClient(address) as client:
            while True:
                stats = await client.stats(timeout_s=30)
                if stats.categories and all(c.trained for c in stats.categories):
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not trained after {timeout_s}s")
                await asyncio.sleep(1.0)

    async def stats(self, address: str):
        async with ShardClient(address) as client:
            return await client.stats(timeout_s=30)

    def base_vectors(self) -> np.ndarray:
        """The whole catalogue as float32 (generated once; 2 GB at 1M x 512)."""
        if getattr(self, "_base", None) is None:
            self._base = np.concatenate([self.catalogue.vectors(lo, min(self.args.n, lo + 65536))
                                         for lo in range(0, self.args.n, 65536)])
        return self._base

    def ground_truth(self, queries: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Exact top-10 by brute force over the catalogue, in chunks."""
        k = 10
        best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        best_rows = np.full((len(queries), k), -1, dtype=np.int64)
        chunk = 65536
        base = self.base_vectors()
        for lo in range(0, self.args.n, chunk):
            hi = min(self.args.n, lo + chunk)
            scores = queries @ base[lo:hi].T
            if mask is not None:
                scores[:, ~mask[lo:hi]] = -np.inf
            rows = np.broadcast_to(np.arange(lo, hi), scores.shape)
            all_scores = np.concatenate([best_scores, scores], axis=1)
            all_rows = np.concatenate([best_rows, rows], axis=1)
            top = np.argpartition(-all_scores, k - 1, axis=1)[:, :k]
            best_scores = np.take_along_axis(all_scores, top, axis=1)
            best_rows = np.take_along_axis(all_rows, top, axis=1)
        order = np.argsort(-best_scores, axis=1)
        rows = np.take_along_axis(best_rows, order, axis=1)
        return np.where(np.isfinite(np.take_along_axis(best_scores, order, axis=1)), rows, -1)

    def _requests(self, queries: np.ndarray, nprobe: int, flt: Filter = Filter()):
        return [convert.query_to_proto(SearchQuery(vector=q, top_k=10, nprobe=nprobe, filter=flt)) for q in queries]

    def measure_rpc_floor(self, address: str) -> dict:
        """Round trip of a near-empty RPC (gRPC health Check): the transport and scheduling floor."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        latencies = []
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="imgsearch.v1.ShardService")
            for i in range(self.args.warmup + 500):
                t0 = time.perf_counter()
                stub.Check(request, timeout=30)
                if i >= self.args.warmup:
                    latencies.append(time.perf_counter() - t0)
        floor = latency_summary(latencies)
        print(f"  health Check RPC round trip: {floor}", flush=True)
        return floor

    def load_in_process_copy(self) -> ShardEngine:
        """The shard's snapshot, hard-linked into a private data dir and loaded into this process."""
        copy = self.work / "in-process"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(self.data_dir / "snapshots", copy / "snapshots", copy_function=os.link)
        faiss.omp_set_num_threads(1)  # like the shard's search threads
        args = ["--data-dir", str(copy), *self.shard_args(training=True)]
        engine = ShardEngine(ShardConfig.from_env(args, env={}))
        t0 = time.perf_counter()
        engine.load()
        print(f"in-process load {time.perf_counter() - t0:.1f}s", flush=True)
        partition = engine.partitions["default"]
        self.result["memory"] = {"ivf_codes_and_ids_bytes": partition.index_code_bytes(),
                                 "ivf_codes_and_ids_per_vector": partition.index_code_bytes() / self.args.n}
        return engine

    def measure_paired(self, shard: ShardProcess, engine: ShardEngine, queries: np.ndarray,
                       truth: np.ndarray) -> list[dict]:
        """Per nprobe: each query through gRPC, then the same query in process, alternating, so that both
        see the same machine load; then the bare faiss search and QPS with concurrent clients."""
        out = []
        partition = engine.partitions["default"]
        with grpc.insecure_channel(shard.address) as channel:
            stub = shard_pb2_grpc.ShardServiceStub(channel)
            for nprobe in self.args.nprobe:
                requests = self._requests(queries, nprobe)
                local_queries = [SearchQuery(vector=q, top_k=10, nprobe=nprobe) for q in queries]
                for r, q in zip(requests[: self.args.warmup], local_queries[: self.args.warmup]):
                    stub.Search(r, timeout=30)
                    engine.search(q)
                remote_s, local_s, remote_found, local_found = [], [], [], []
                for r, q in zip(requests, local_queries):
                    t0 = time.perf_counter()
                    response = stub.Search(r, timeout=30)
                    t1 = time.perf_counter()
                    result = engine.search(q)
                    t2 = time.perf_counter()
                    remote_s.append(t1 - t0)
                    local_s.append(t2 - t1)
                    remote_found.append([h.image_id for h in response.hits])
                    local_found.append([h.image_id for h in result.hits])
                params = faiss.SearchParametersIVF(nprobe=nprobe)
                bare = []
                for q in queries:
                    t0 = time.perf_counter()
                    partition.ivf.search(q[None, :], 10 * self.args.rerank_factor, params=params)
                    bare.append(time.perf_counter() - t0)
                grpc_latency, local_latency = latency_summary(remote_s), latency_summary(local_s)
                row = {
                    "nprobe": nprobe,
                    "recall_at_10_grpc": synthetic.recall_at_k(remote_found, truth, 10),
                    "recall_at_10_in_process": synthetic.recall_at_k(local_found, truth, 10),
                    "same_top10": sum(a == b for a, b in zip(remote_found, local_found)) / len(queries),
                    "grpc_latency": grpc_latency,
                    "in_process_latency": local_latency,
                    "faiss_ivf_only_latency": latency_summary(bare),
                    "grpc_over_in_process_p50": grpc_latency["p50_ms"] / local_latency["p50_ms"],
                    "qps_1_client": 1.0 / statistics.fmean(remote_s),
                    f"qps_{self.args.concurrency}_clients": self._concurrent_qps(shard.address, requests),
                }
                print(f"  nprobe={nprobe}: {row}", flush=True)
                out.append(row)
        return out

    def _concurrent_qps(self, address: str, requests) -> float:
        c = self.args.concurrency
        channels = [grpc.insecure_channel(address) for _ in range(c)]
        stubs = [shard_pb2_grpc.ShardServiceStub(ch) for ch in channels]
        barrier = threading.Barrier(c)

        def worker(i: int) -> int:
            barrier.wait()
            n = 0
            for r in requests[i::c]:
                stubs[i].Search(r, timeout=30)
                n += 1
            return n

        try:
            with ThreadPoolExecutor(c) as pool:
                t0 = time.perf_counter()
                total = sum(pool.map(worker, range(c)))
                return total / (time.perf_counter() - t0)
        finally:
            for ch in channels:
                ch.close()

    def measure_filtered_grpc(self, address: str, queries: np.ndarray) -> list[dict]:
        attributes_price = np.concatenate([
            np.array([a["price"] for a in self.catalogue.attributes(lo, min(self.args.n, lo + 65536))])
            for lo in range(0, self.args.n, 65536)])
        out = []
        with grpc.insecure_channel(address) as channel:
            stub = shard_pb2_grpc.ShardServiceStub(channel)
            for selectivity in (0.5, 0.1, 0.01, 0.001):
                flt = synthetic.selectivity_filter(selectivity)
                mask = attributes_price < 100.0 * selectivity
                truth = self.ground_truth(queries, mask)
                requests = self._requests(queries, self.args.default_nprobe, flt)
                stub.Search(requests[0], timeout=30)  # builds and caches the filter's selection
                latencies, found = [], []
                for r in requests:
                    t0 = time.perf_counter()
                    response = stub.Search(r, timeout=30)
                    latencies.append(time.perf_counter() - t0)
                    found.append([h.image_id for h in response.hits])
                row = {"selectivity": selectivity, "matching": int(mask.sum()),
                       "recall_at_10": synthetic.recall_at_k(found, truth, 10), "latency": latency_summary(latencies)}
                print(f"  gRPC filtered {row}", flush=True)
                out.append(row)
        return out


def markdown(result: dict) -> str:
    r = result
    lines = [
        "# Shard benchmark",
        "",
        (f"One `imgsearch-shard` process, {r['n']:,} synthetic {r['dim']}-d clustered unit vectors, one category, "
        f"index `{r['stats']['index_type']}` (re-rank top {r['rerank_factor']}xK with "
        f"{r.get('vector_dtype', 'float16')} exact vectors, "
        f"memory-mapped), {r['queries']} queries, single-query requests. Machine: {r['machine']['cpus']} CPUs "
        f"({r['machine']['platform']}), load average at start "
        f"{r['machine'].get('load_avg_at_start', 'not recorded')}."),
        "",
        "Reproduce: `" + r["command"] + "`",
        "",
        "## Unfiltered search: gRPC vs in process",
        "",
        ("| nprobe | recall@10 gRPC | recall@10 in process | same top-10 | gRPC p50 ms | gRPC p99 ms "
        "| in-process p50 ms | in-process p99 ms | gRPC/in-process p50 | faiss IVF-PQ scan p50 ms "
        f"| QPS (1 client) | QPS ({r['concurrency']} clients) |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    qps_key = f"qps_{r['concurrency']}_clients"
    for x in r["search"]:
        g, l = x["grpc_latency"], x["in_process_latency"]
        lines.append(
            f"| {x['nprobe']} | {x['recall_at_10_grpc']:.3f} | {x['recall_at_10_in_process']:.3f} "
            f"| {x['same_top10']:.0%} | {g['p50_ms']:.2f} | {g['p99_ms']:.2f} | {l['p50_ms']:.2f} "
            f"| {l['p99_ms']:.2f} | {x['grpc_over_in_process_p50']:.2f} "
            f"| {x['faiss_ivf_only_latency']['p50_ms']:.2f} | {x['qps_1_client']:.0f} | {x[qps_key]:.0f} |")
    lines += ["", ("gRPC and in-process queries alternate one by one (same snapshot, hard-linked), so both see the "
              "same machine load. A near-empty RPC (gRPC health Check) takes "
              f"{r['rpc_floor']['p50_ms']:.2f} ms p50 / {r['rpc_floor']['p99_ms']:.2f} ms p99 round trip on this "
              "machine: the transport and scheduling floor that every gRPC figure includes. "
              "In-process latency is `ShardEngine.search` (validation, IVF-PQ scan with the "
              "filter selector, exact re-rank, hit details); the faiss column is the bare IVF-PQ scan of "
              f"{r['rerank_factor']}x10 candidates."),
              "", "## Filtered search (gRPC, default nprobe)", "",
              "| selectivity | matching vectors | recall@10 | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    for f in r["grpc_filtered"]:
        lines.append(f"| {f['selectivity']:.1%} | {f['matching']:,} | {f['recall_at_10']:.3f} "
                     f"| {f['latency']['p50_ms']:.2f} | {f['latency']['p99_ms']:.2f} |")
    m = r["memory"]
    lines += [
        "", "## Build and memory", "",
        (f"- Ingest through gRPC UpsertStream: {r['ingest']['seconds']:.0f} s "
        f"({r['ingest']['vectors_per_s']:.0f} vectors/s, WAL fsync per stream)."),
        (f"- Build (background k-means on a sample, add all vectors, swap): {r['build']['train_add_swap_s']:.0f} s; "
        f"restart from snapshot (checksums verified): {r['restart_load_s']:.1f} s."),
        (f"- IVF codes + ids: {m['ivf_codes_and_ids_per_vector']:.1f} bytes/vector "
        f"({m['ivf_codes_and_ids_bytes'] / 2**20:.0f} MiB)."),
        (f"- Stats RPC resident bytes (codes, ids, centroids, attribute columns, tombstones): "
        f"{r['stats']['resident_bytes_per_vector']:.1f} bytes/vector."),
        (f"- Shard process anonymous RSS minus an empty shard's: {m['shard_rss_anon_minus_empty_per_vector']:.0f} "
        "bytes/vector (includes Python id lists and the id map; the exact vectors are memory-mapped "
        "and not in RssAnon)."),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--filter-queries", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--nprobe", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 32, 64])
    parser.add_argument("--default-nprobe", type=int, default=16)
    parser.add_argument("--factory", default="IVF{nlist},PQ64x4fs")
    parser.add_argument("--nlist", type=int, default=0)
    parser.add_argument("--nlist-per-sqrt-n", type=float, default=2.0)
    parser.add_argument("--rerank-factor", type=int, default=80)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--stream-records", type=int, default=50_000)
    parser.add_argument("--build-timeout-s", type=float, default=3600)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    import sys
    bench = Bench(args)
    result = bench.run()
    result["concurrency"] = args.concurrency
    result["command"] = "python -m shard_server.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(result))


if __name__ == "__main__":
    main()
