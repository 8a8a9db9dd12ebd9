"""`python -m shard_server.stall_probe --vectors N`: does a freshly bulk-loaded shard stall, and does a restart cure it?

Builds one shard process the way the comparison does (one atomic UpsertStream of N synthetic vectors, background
training, the snapshot the swap triggers), then runs rounds of 200 searches with 1 and then 8 clients and
prints p50 / max latency per round, the shard's page faults, its full garbage collections (count and the
longest, from ``imgsearch_gc_pause_seconds`` on its /metrics: a collection holds the GIL, so every search in
flight waits for it) and the stacks its event-loop lag monitor logged while its loop was stalled
(imgsearch.serving.EventLoopLagMonitor); then restarts the same shard from its snapshot and runs the rounds
again. Written for the half-second stall seen in the 1M comparison's first 8-client run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import tempfile
import time
from pathlib import Path

import numpy as np

from imgsearch.gc_pauses import scrape_full_collections
from shard_server.client import ShardClient
from shard_server.compare import IndexParams, run_queries, synthetic_data
from shard_server.compare_grpc import ShardTier, ShardTierEngine
from shard_server.config import ShardConfig
from shard_server.process import ShardProcess


class GcPauses:
    """The longest garbage-collector pause of this (client) process since the last reset."""

    def __init__(self) -> None:
        self.longest_s = 0.0
        self._started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.longest_s = max(self.longest_s, time.perf_counter() - self._started)

    def take(self) -> float:
        longest, self.longest_s = self.longest_s, 0.0
        return longest


def _faults(pid: int) -> tuple[int, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7]), int(fields[9])  # minor, major


def _print_loop_stalls(log_path: Path, seen: int) -> int:
    """Print the shard's "event loop stalled" reports (imgsearch.serving.EventLoopLagMonitor) after `seen`."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    reports = text.split("event loop stalled")[1:]
    for report in reports[seen:]:
        print("  shard: event loop stalled" + report.split("\n20", 1)[0].rstrip(), flush=True)
    return len(reports)


async def _rounds(engine: ShardTierEngine, queries: np.ndarray, shard: ShardProcess, rounds: int, label: str,
                  gc_pauses: GcPauses) -> None:
    pid, log_path = shard.proc.pid, shard.log_path
    stalls_seen = _print_loop_stalls(log_path, 0)
    for r in range(rounds):
        for clients in (1, 8):
            before = _faults(pid)
            gc_before = scrape_full_collections(shard.metrics_port)
            gc_pauses.take()
            _, latencies, _ = await run_queries(engine, queries, 1, None, clients)
            after = _faults(pid)
            ms = np.asarray(latencies) * 1e3
            print(f"{label} round {r} clients {clients}: p50 {np.median(ms):.2f} ms, p99 "
                  f"{np.percentile(ms, 99):.2f} ms, max {ms.max():.1f} ms; "
                  f"shard page faults +{after[0] - before[0]} minor, +{after[1] - before[1]} major; shard: "
                  f"{scrape_full_collections(shard.metrics_port).since(gc_before).describe()}; "
                  f"longest client GC pause {gc_pauses.take() * 1e3:.1f} ms", flush=True)
            stalls_seen = _print_loop_stalls(log_path, stalls_seen)


async def probe(n: int, rounds: int, work_dir: Path) -> None:
    gc_pauses = GcPauses()
    data = synthetic_data(n=n, dim=512, n_queries=200, seed=0)
    tier = ShardTier(work_dir, shards=1, search_threads=8, config=ShardConfig(data_dir=work_dir))
    engine = ShardTierEngine(IndexParams.of_shard(n), (1,), tier, via_broker=False)
    try:
        report = await engine.build(data)
        print(f"built {n} vectors in {report.build_s:.0f} s; shard during start-up and the build: "
              f"{scrape_full_collections(tier.processes[0].metrics_port).describe()}", flush=True)
        await _rounds(engine, data.queries, tier.processes[0], rounds, "fresh", gc_pauses)
        for client in tier.clients:
            await client.close()
        tier.processes[0].kill()
        restarted = ShardProcess(tier.processes[0].data_dir, log_path=work_dir / "restarted.log",
                                 extra_args=tier.shard_args(data))
        t0 = time.perf_counter()
        await asyncio.to_thread(restarted.start, timeout_s=600)
        print(f"restarted from the snapshot in {time.perf_counter() - t0:.1f} s; shard during start-up and the "
              f"load: {scrape_full_collections(restarted.metrics_port).describe()}", flush=True)
        tier.processes[0] = restarted
        tier.clients = [ShardClient(restarted.address)]
        await _rounds(engine, data.queries, restarted, rounds, "restarted", gc_pauses)
    finally:
        await tier.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shard_server.stall_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="imgsearch-stall-") as tmp:
        asyncio.run(probe(args.vectors, args.rounds, Path(tmp)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
