"""The gRPC engines of the comparison (shard_server.compare): one `imgsearch-shard` process searched directly,
or the `imgsearch-broker` process over N shard processes (vector queries: no embedding, no duplicate cache).

Layout: one shard holds every vector in one category ("all"), as the in-process engines hold one index. With
the broker over N shards the vectors are split evenly (row i -> category ``part-{i % N}``), each category
pinned to its own shard; queries name no category, so every search fans out to all N shards and each searches
its partition with the same nprobe (N partitions of n/N vectors, each with the shard's own list count).
Each shard is loaded with one atomic UpsertStream, then trains its IVF-PQ index in the background on the whole
partition; the build time runs from the first record sent to the last partition trained.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from broker.client import BrokerClient
from broker.stack import console_script, free_port, wait_for_port
from shard_server import synthetic
from shard_server.client import ShardClient
from shard_server.compare import TOP_K, BenchData, BuildReport, Engine, IndexParams, attributes_of, row_of
from shard_server.config import ShardConfig
from shard_server.process import ShardProcess
from shard_server.types import Filter, Record, SearchQuery

log = logging.getLogger("imgsearch.compare")

SEARCH_TIMEOUT_S = 10.0
LOAD_TIMEOUT_S = 7200.0


class ShardTierEngine(Engine):
    is_async = True

    def __init__(self, params: IndexParams, knobs: Sequence[int], work_dir: Path, *, shards: int,
                 via_broker: bool, search_threads: int) -> None:
        super().__init__(params, knobs)
        self.shards = shards
        self.via_broker = via_broker
        self.name = f"broker-{shards}" if via_broker else "shard"
        self.work_dir = work_dir / self.name
        self.search_threads = search_threads
        self._processes: list[ShardProcess] = []
        self._clients: list[ShardClient] = []
        self._broker_proc = None
        self._broker: BrokerClient | None = None
        self._filters: dict[float, Filter] = {}

    def categories(self) -> list[str]:
        return ["all"] if self.shards == 1 and not self.via_broker else [f"part-{j}" for j in range(self.shards)]

    def shard_args(self, data: BenchData) -> tuple[str, ...]:
        return ("--dimension", str(data.dim), "--search-threads", str(self.search_threads),
                # A whole partition is one atomic stream; no snapshot may run during the measurement.
                "--max-stream-bytes", str(1 << 40), "--snapshot-interval-s", "1000000000",
                "--snapshot-wal-bytes", str(1 << 50), "--max-message-bytes", str(64 << 20))

    async def build(self, data: BenchData) -> BuildReport:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        categories = self.categories()
        for j in range(self.shards):
            proc = ShardProcess(self.work_dir / f"shard-{j}", log_path=self.work_dir / f"shard-{j}.log",
                                extra_args=self.shard_args(data))
            self._processes.append(proc)
            await asyncio.to_thread(proc.start, timeout_s=120)
        self._clients = [ShardClient(p.address) for p in self._processes]
        started = time.perf_counter()
        await asyncio.gather(*(self._load(client, data, j, categories[j]) for j, client in enumerate(self._clients)))
        rows_per_shard = data.n // self.shards
        config = ShardConfig(data_dir=Path("."))
        trains = rows_per_shard >= config.training_threshold(rows_per_shard)
        if trains:
            await asyncio.gather(*(self._wait_trained(c) for c in self._clients))
        build_s = time.perf_counter() - started
        stats = await asyncio.gather(*(c.stats(timeout_s=60) for c in self._clients))
        resident = sum(c.resident_bytes for s in stats for c in s.categories)
        index_types = sorted({c.index_type for s in stats for c in s.categories})
        nlist = config.nlist_for(rows_per_shard)
        self._knobs = tuple(k for k in self._knobs if k <= nlist) or (nlist,)
        if self.via_broker:
            await self._start_broker(categories)
        for selectivity in (0.5, 0.1, 0.01, 0.001):
            self._filters[selectivity] = synthetic.selectivity_filter(selectivity)
        layout = f"{self.shards} shard process(es) x {rows_per_shard} vectors" + (" behind the broker"
                                                                                   if self.via_broker else "")
        return BuildReport(
            build_s=build_s, bytes_per_vector=resident / data.n,
            bytes_basis="shard Stats resident_bytes (IVF codes + ids + centroids + attributes + vectors not yet "
                        "in a memory-mapped snapshot)",
            index=f"{', '.join(index_types)} + exact re-rank x{self.params.rerank_factor}; {layout}"
                  + ("" if trains else " (below the training threshold: exact scan)"))

    async def _load(self, client: ShardClient, data: BenchData, shard: int, category: str) -> None:
        def records() -> Iterator[Record]:
            for i in range(shard, data.n, self.shards):
                yield Record(image_id=synthetic.image_id(i), product_id=f"product-{i // 4}", category=category,
                             vector=data.vectors[i], attributes=attributes_of(data, i))

        expected = len(range(shard, data.n, self.shards))
        written = await client.upsert_stream(records(), batch_size=1000, timeout_s=LOAD_TIMEOUT_S)
        if written != expected:
            raise RuntimeError(f"shard {shard} stored {written} of {expected} records")

    async def _wait_trained(self, client: ShardClient) -> None:
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            stats = await client.stats(timeout_s=60)
            if stats.categories and all(c.trained for c in stats.categories):
                return
            await asyncio.sleep(0.5)
        raise TimeoutError("shard index not trained in time")

    async def _start_broker(self, categories: list[str]) -> None:
        names = [f"shard-{j}" for j in range(self.shards)]
        shard_map = {"shards": {name: [p.address] for name, p in zip(names, self._processes, strict=True)},
                     "categories": dict(zip(categories, names, strict=True))}
        map_path = self.work_dir / "shard-map.json"
        map_path.write_text(json.dumps(shard_map))
        port = free_port()
        log_file = open(self.work_dir / "broker.log", "ab")  # noqa: SIM115 - closed in close()
        import subprocess  # noqa: PLC0415

        # No Triton and no Redis: vector queries need neither (the broker's health stays NOT_SERVING without
        # Triton, but Search answers vector queries regardless).
        self._broker_log = log_file
        self._broker_proc = subprocess.Popen(
            [*console_script("imgsearch-broker"), "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "-1",
             "--shard-map", str(map_path), "--triton-url", f"127.0.0.1:{free_port()}",
             "--search-timeout-s", str(SEARCH_TIMEOUT_S)],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        await asyncio.to_thread(wait_for_port, "127.0.0.1", port, timeout_s=60, process=self._broker_proc,
                                name="imgsearch-broker")
        self._broker = BrokerClient(f"127.0.0.1:{port}", timeout_s=SEARCH_TIMEOUT_S)

    async def search(self, query: np.ndarray, knob: int, selectivity: float | None) -> list[int]:
        flt = self._filters[selectivity] if selectivity is not None else Filter()
        if self._broker is not None:
            answer = await self._broker.search(vector=query, top_k=TOP_K, nprobe=int(knob), filter=flt,
                                               use_duplicate_cache=False, timeout_s=SEARCH_TIMEOUT_S)
            if answer.partial:
                raise RuntimeError(f"partial answer: {answer.shards}")
            hits = answer.hits
        else:
            result = await self._clients[0].search(SearchQuery(vector=query, top_k=TOP_K, nprobe=int(knob),
                                                               filter=flt), timeout_s=SEARCH_TIMEOUT_S)
            hits = result.hits
        return [row_of(h.image_id) for h in hits]

    async def close(self) -> None:
        if self._broker is not None:
            with contextlib.suppress(Exception):
                await self._broker.close()
        if self._broker_proc is not None:
            self._broker_proc.terminate()
            try:
                await asyncio.to_thread(self._broker_proc.wait, 15)
            except Exception:  # noqa: BLE001
                self._broker_proc.kill()
            self._broker_log.close()
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.close()
        for proc in self._processes:
            proc.kill()  # scratch data: no final snapshot needed
