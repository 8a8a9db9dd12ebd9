"""The gRPC engines of the comparison (shard_server.compare): one `imgsearch-shard` process searched directly,
or the `imgsearch-broker` process over N shard processes (vector queries: no embedding, no duplicate cache).

Layout: one shard holds every vector in one category ("all"), as the in-process engines hold one index. With
the broker over N shards the vectors are split evenly (row i -> category ``part-{i % N}``), each category
pinned to its own shard; queries name no category, so every search fans out to all N shards and each searches
its partition with the same nprobe (N partitions of n/N vectors, each with the shard's own list count).
The single shard serves both "shard" and "broker-1" (built once). Each shard is loaded with one atomic
UpsertStream, then trains its IVF-PQ index in the background on the whole partition; the build time runs
from the first record sent to the last partition trained.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from broker.client import BrokerClient
from broker.stack import console_script, free_port, wait_for_port
from imgsearch.gc_pauses import FullCollections, scrape_full_collections
from shard_server import synthetic
from shard_server.client import ShardClient
from shard_server.compare import (
    TOP_K,
    BenchData,
    BuildReport,
    Engine,
    IndexParams,
    attributes_of,
    disk_bytes,
    row_of,
)
from shard_server.config import MAX_LOG_FRAME_BYTES, ShardConfig
from shard_server.process import ShardProcess
from shard_server.types import Filter, Record, SearchQuery, ShardStats

log = logging.getLogger("imgsearch.compare")

SEARCH_TIMEOUT_S = 10.0
LOAD_TIMEOUT_S = 7200.0
# A shard's write-ahead log below this size holds no bulk load any more (the load was snapshotted).
SETTLED_WAL_BYTES = 1 << 20


def _trained(stats: ShardStats) -> bool:
    return bool(stats.categories) and all(c.trained for c in stats.categories)


def _snapshotted(stats: ShardStats) -> bool:
    return stats.wal_bytes < SETTLED_WAL_BYTES


class ShardTier:
    """N shard processes loaded with the data (and, on demand, a broker over them). Built once and shared by
    the engines that search it ("shard" and "broker-1" use the same single shard)."""

    def __init__(self, work_dir: Path, *, shards: int, search_threads: int, config: ShardConfig) -> None:
        self.shards = shards
        self.config = config
        self.work_dir = work_dir / f"tier-{shards}"
        self.search_threads = search_threads
        self.processes: list[ShardProcess] = []
        self.clients: list[ShardClient] = []
        self.broker: BrokerClient | None = None
        self.broker_metrics_port: int | None = None
        self.nlist = 0
        self._broker_proc: subprocess.Popen | None = None
        self._broker_log = None
        self._report: BuildReport | None = None
        self._lock = asyncio.Lock()

    def categories(self) -> list[str]:
        return ["all"] if self.shards == 1 else [f"part-{j}" for j in range(self.shards)]

    def shard_args(self, data: BenchData) -> tuple[str, ...]:
        return (
            "--dimension",
            str(data.dim),
            "--search-threads",
            str(self.search_threads),
            # A whole partition is one atomic stream; no snapshot may run during the measurement.
            "--max-stream-bytes",
            str(MAX_LOG_FRAME_BYTES),
            "--snapshot-interval-s",
            "1000000000",
            "--snapshot-wal-bytes",
            str(1 << 50),
            "--max-message-bytes",
            str(64 << 20),
            "--nlist",
            str(self.config.nlist),
            # /metrics on a free port: the comparison and the stall probe read its garbage-collector pauses there
            "--metrics-port",
            "0",
        )

    async def build(self, data: BenchData, params: IndexParams) -> BuildReport:
        async with self._lock:
            if self._report is None:
                self._report = await self._build(data, params)
            return self._report

    async def _build(self, data: BenchData, params: IndexParams) -> BuildReport:
        self.dimension = data.dim
        self.work_dir.mkdir(parents=True, exist_ok=True)
        categories = self.categories()
        for j in range(self.shards):
            proc = ShardProcess(
                self.work_dir / f"shard-{j}",
                log_path=self.work_dir / f"shard-{j}.log",
                extra_args=self.shard_args(data),
            )
            self.processes.append(proc)
            await asyncio.to_thread(proc.start, timeout_s=120)
        self.clients = [ShardClient(p.address) for p in self.processes]
        started = time.perf_counter()
        await asyncio.gather(
            *(self._load(client, data, j, categories[j]) for j, client in enumerate(self.clients))
        )
        rows_per_shard = data.n // self.shards
        config = self.config
        trains = rows_per_shard >= config.training_threshold()
        if trains:
            await asyncio.gather(*(self._wait_until(c, _trained, "trained") for c in self.clients))
        build_s = time.perf_counter() - started
        if trains:
            # Searches are measured in the steady state, not while the shard writes and hashes the snapshot its
            # index swap triggers (the log it covers is dropped once it is written).
            await asyncio.gather(*(self._wait_until(c, _snapshotted, "snapshotted") for c in self.clients))
        stats = await asyncio.gather(*(c.stats(timeout_s=60) for c in self.clients))
        resident = sum(c.resident_bytes for s in stats for c in s.categories)
        index_types = sorted({c.index_type for s in stats for c in s.categories})
        self.nlist = config.nlist_for(rows_per_shard) if trains else 1
        layout = f"{self.shards} shard process(es) x {rows_per_shard} vectors"
        return BuildReport(
            build_s=build_s,
            bytes_per_vector=resident / data.n,
            disk_bytes_per_vector=disk_bytes(self.work_dir) / data.n,
            bytes_basis="shard Stats resident_bytes (IVF codes + ids + centroids + attributes; the vectors "
            "only while not yet in the shard's memory-mapped file); disk: WAL + snapshot + vector files",
            index=f"{', '.join(index_types)} + exact re-rank x{params.rerank_factor}; {layout}"
            + ("" if trains else " (below the training threshold: exact scan)"),
        )

    async def _load(self, client: ShardClient, data: BenchData, shard: int, category: str) -> None:
        def records() -> Iterator[Record]:
            for i in range(shard, data.n, self.shards):
                yield Record(
                    image_id=synthetic.image_id(i),
                    product_id=f"product-{i // 4}",
                    category=category,
                    vector=data.vectors[i],
                    attributes=attributes_of(data, i),
                )

        expected = len(range(shard, data.n, self.shards))
        written = await client.upsert_stream(records(), batch_size=1000, timeout_s=LOAD_TIMEOUT_S)
        if written != expected:
            raise RuntimeError(f"shard {shard} stored {written} of {expected} records")

    @staticmethod
    async def _wait_until(client: ShardClient, settled, what: str) -> None:
        """Poll the shard's Stats until ``settled(stats)`` holds."""
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            if settled(await client.stats(timeout_s=60)):
                return
            await asyncio.sleep(0.5)
        raise TimeoutError(f"shard not {what} in time")

    async def start_broker(self) -> BrokerClient:
        if self.broker is not None:
            return self.broker
        names = [f"shard-{j}" for j in range(self.shards)]
        shard_map = {
            "shards": {name: [p.address] for name, p in zip(names, self.processes, strict=True)},
            "categories": dict(zip(self.categories(), names, strict=True)),
        }
        map_path = self.work_dir / "shard-map.json"
        map_path.write_text(json.dumps(shard_map))
        port = free_port()
        self.broker_metrics_port = free_port()
        self._broker_log = open(self.work_dir / "broker.log", "ab")  # noqa: SIM115, ASYNC230 - closed in close(); start-up only
        # No Triton and no Redis: vector queries need neither (the broker's health stays NOT_SERVING without
        # Triton, but Search answers vector queries regardless).
        self._broker_proc = subprocess.Popen(  # noqa: ASYNC220 - start-up of the benchmark, nothing else runs
            [
                *console_script("imgsearch-broker"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--metrics-port",
                str(self.broker_metrics_port),
                "--shard-map",
                str(map_path),
                "--triton-url",
                f"127.0.0.1:{free_port()}",
                "--search-timeout-s",
                str(SEARCH_TIMEOUT_S),
                "--dimension",
                str(self.dimension),
            ],
            stdout=self._broker_log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        await asyncio.to_thread(
            wait_for_port, "127.0.0.1", port, timeout_s=60, process=self._broker_proc, name="imgsearch-broker"
        )
        self.broker = BrokerClient(f"127.0.0.1:{port}", timeout_s=SEARCH_TIMEOUT_S)
        return self.broker

    @property
    def broker_pid(self) -> int | None:
        return self._broker_proc.pid if self._broker_proc is not None else None

    async def close(self) -> None:
        if self.broker is not None:
            with contextlib.suppress(Exception):
                await self.broker.close()
        if self._broker_proc is not None:
            self._broker_proc.terminate()
            try:
                await asyncio.to_thread(self._broker_proc.wait, 15)
            except subprocess.TimeoutExpired:
                self._broker_proc.kill()
            self._broker_log.close()
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.close()
        for proc in self.processes:
            proc.kill()  # scratch data: no final snapshot needed


class ShardTierEngine(Engine):
    """Searches a ShardTier: straight at its one shard ("shard") or through a broker over it ("broker-N")."""

    is_async = True

    def __init__(
        self, params: IndexParams, knobs: Sequence[int], tier: ShardTier, *, via_broker: bool
    ) -> None:
        super().__init__(params, knobs)
        self.tier = tier
        self.via_broker = via_broker
        self.name = f"broker-{tier.shards}" if via_broker else "shard"
        self._filters = {s: synthetic.selectivity_filter(s) for s in (0.5, 0.1, 0.01, 0.001)}
        self._broker: BrokerClient | None = None

    async def build(self, data: BenchData) -> BuildReport:
        report = await self.tier.build(data, self.params)
        self._knobs = tuple(k for k in self._knobs if k <= self.tier.nlist) or (self.tier.nlist,)
        if self.via_broker:
            self._broker = await self.tier.start_broker()
            return replace(report, index=report.index + ", behind the broker")
        return report

    def profile_targets(self) -> dict[str, int]:
        """Processes worth profiling: the shard(s) and, behind the broker, the broker."""
        targets = {f"shard-{j}": p.proc.pid for j, p in enumerate(self.tier.processes) if p.proc is not None}
        if self.via_broker and self.tier.broker_pid is not None:
            targets["broker"] = self.tier.broker_pid
        return targets

    async def full_collections(self) -> FullCollections:
        """Full garbage collections so far in the server processes: the shards and, behind it, the broker."""
        ports = [p.metrics_port for p in self.tier.processes]
        if self.via_broker:
            ports.append(self.tier.broker_metrics_port)
        readings = await asyncio.gather(*(asyncio.to_thread(scrape_full_collections, port) for port in ports))
        return sum(readings, FullCollections())

    async def search(self, query: np.ndarray, knob: int, selectivity: float | None) -> list[int]:
        flt = self._filters[selectivity] if selectivity is not None else Filter()
        if self._broker is not None:
            answer = await self._broker.search(
                vector=query,
                top_k=TOP_K,
                nprobe=int(knob),
                filter=flt,
                use_duplicate_cache=False,
                timeout_s=SEARCH_TIMEOUT_S,
            )
            if answer.partial:
                raise RuntimeError(f"partial answer: {answer.shards}")
            hits = answer.hits
        else:
            result = await self.tier.clients[0].search(
                SearchQuery(vector=query, top_k=TOP_K, nprobe=int(knob), filter=flt),
                timeout_s=SEARCH_TIMEOUT_S,
            )
            hits = result.hits
        return [row_of(h.image_id) for h in hits]
