"""Full-stack load test: image queries through the broker, Triton on CPU, Redis and N shard processes.

    python -m broker.loadtest --out docs/bench/loadtest.json --plots docs/bench

1. Starts the whole stack as `imgsearch up` does (broker.stack.LocalStack: redis-server, Triton on CPU with
   the default model, N `imgsearch-shard` processes, the broker), every process on a free loopback port.
2. Ingests a gallery of grocery train photos through the broker (embedded by Triton, hashed into the cache).
3. Mixed image queries: a fraction `--hit-ratio` are byte-identical gallery photos (duplicate-cache hits: no
   embedding, no fan-out), the rest are val photos of the same products (misses: decode + hash, cache lookup,
   Triton embedding, fan-out to the shards, merge). Closed-loop clients at increasing concurrency, each step
   bounded in time (`--step-s`) and count; per step: throughput, client latency and p50/p99 of every broker
   stage from the StageTimings the broker returns.
4. Failure run: the same mix at `--kill-concurrency` clients, one shard SIGKILLed halfway: what users see
   (complete answers, partial answers flagged `partial`, errors) second by second.

Everything is bounded: a few seconds per step; the stack is stopped (and every process killed) at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from broker.catalogue import CatalogueFile, default_data_dir, grocery_split, iter_items
from broker.client import BrokerClient
from broker.stack import LocalStack, StackConfig
from broker.types import SearchAnswer

log = logging.getLogger("imgsearch.loadtest")

STAGE_FIELDS = {
    "decode_hash": "decode_hash_s",
    "cache": "cache_s",
    "embed": "embed_s",
    "fanout": "fanout_s",
    "merge": "merge_s",
    "total": "total_s",
}
TOKEN = "loadtest-write-token"


@dataclass(frozen=True, kw_only=True)
class LoadTestConfig:
    data_dir: Path
    shards: int = 2
    gallery: int = 160  # catalogue photos ingested (spread over all products)
    queries: int = 80  # distinct val photos used as cache-miss queries
    hit_ratio: float = 0.3
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    step_s: float = 8.0
    max_requests_per_step: int = 2000
    kill_concurrency: int = 4
    kill_run_s: float = 12.0
    search_timeout_s: float = 5.0
    top_k: int = 10
    work_dir: Path | None = None
    out_json: Path = Path("docs/bench/loadtest.json")
    plot_dir: Path | None = Path("docs/bench")

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> LoadTestConfig:
        p = argparse.ArgumentParser(prog="python -m broker.loadtest", description=__doc__.split("\n")[0])
        p.add_argument("--data-dir", type=Path, default=default_data_dir())
        p.add_argument("--shards", type=int, default=cls.shards)
        p.add_argument("--gallery", type=int, default=cls.gallery)
        p.add_argument("--queries", type=int, default=cls.queries)
        p.add_argument("--hit-ratio", type=float, default=cls.hit_ratio)
        p.add_argument("--concurrency", default=",".join(map(str, cls.concurrency)))
        p.add_argument("--step-s", type=float, default=cls.step_s)
        p.add_argument("--max-requests-per-step", type=int, default=cls.max_requests_per_step)
        p.add_argument("--kill-concurrency", type=int, default=cls.kill_concurrency)
        p.add_argument("--kill-run-s", type=float, default=cls.kill_run_s, help="0: no failure run")
        p.add_argument("--search-timeout-s", type=float, default=cls.search_timeout_s)
        p.add_argument("--work-dir", type=Path, default=None)
        p.add_argument("--out", type=Path, default=cls.out_json)
        p.add_argument("--plots", default="docs/bench", help="plot directory; empty for none")
        a = p.parse_args(argv)
        return cls(
            data_dir=a.data_dir,
            shards=a.shards,
            gallery=a.gallery,
            queries=a.queries,
            hit_ratio=a.hit_ratio,
            concurrency=tuple(int(c) for c in a.concurrency.split(",")),
            step_s=a.step_s,
            max_requests_per_step=a.max_requests_per_step,
            kill_concurrency=a.kill_concurrency,
            kill_run_s=a.kill_run_s,
            search_timeout_s=a.search_timeout_s,
            work_dir=a.work_dir,
            out_json=a.out,
            plot_dir=Path(a.plots) if a.plots else None,
        )


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """One search as the client saw it."""

    started_s: float  # since the start of the run
    latency_s: float
    kind: str  # "hit" (a gallery photo) or "miss" (a val photo)
    answer: SearchAnswer | None
    error: str | None = None


def pick_gallery(data_dir: Path, count: int) -> list[CatalogueFile]:
    """`count` train photos spread evenly over the split (so over every product), deterministic."""
    train = grocery_split(data_dir, "train")
    step = max(1, len(train) // count)
    return train[::step][:count]


def pick_misses(data_dir: Path, count: int) -> list[CatalogueFile]:
    val = grocery_split(data_dir, "val")
    step = max(1, len(val) // count)
    return val[::step][:count]


def query_mix(hits: list[bytes], misses: list[bytes], hit_ratio: float) -> list[tuple[str, bytes]]:
    """A fixed, interleaved sequence: every query i is a hit when floor((i+1)*r) > floor(i*r)."""
    mix: list[tuple[str, bytes]] = []
    h = m = 0
    for i in range(len(hits) + len(misses)):
        if int((i + 1) * hit_ratio) > int(i * hit_ratio):
            mix.append(("hit", hits[h % len(hits)]))
            h += 1
        else:
            mix.append(("miss", misses[m % len(misses)]))
            m += 1
    return mix


async def run_clients(
    client: BrokerClient,
    mix: list[tuple[str, bytes]],
    *,
    concurrency: int,
    duration_s: float,
    max_requests: int,
    top_k: int,
    timeout_s: float,
    t0: float,
    during: asyncio.Future | None = None,
) -> list[Outcome]:
    """`concurrency` closed-loop clients walk through `mix` until `duration_s` or `max_requests` is hit."""
    outcomes: list[Outcome] = []
    counter = iter(range(max_requests))
    deadline = time.perf_counter() + duration_s

    async def worker() -> None:
        for i in counter:
            if time.perf_counter() >= deadline:
                return
            kind, image = mix[i % len(mix)]
            start = time.perf_counter()
            try:
                answer = await client.search(image=image, top_k=top_k, timeout_s=timeout_s)
                outcomes.append(
                    Outcome(
                        started_s=start - t0, latency_s=time.perf_counter() - start, kind=kind, answer=answer
                    )
                )
            except Exception as exc:  # noqa: BLE001 - what the user sees is the point
                outcomes.append(
                    Outcome(
                        started_s=start - t0,
                        latency_s=time.perf_counter() - start,
                        kind=kind,
                        answer=None,
                        error=type(exc).__name__,
                    )
                )

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    if during is not None:
        tasks.append(during)
    await asyncio.gather(*tasks)
    return outcomes


def _pct(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "p50_ms": None, "p99_ms": None}
    arr = np.asarray(values) * 1000.0
    return {
        "count": len(values),
        "p50_ms": round(float(np.percentile(arr, 50)), 2),
        "p99_ms": round(float(np.percentile(arr, 99)), 2),
        "mean_ms": round(float(arr.mean()), 2),
    }


def summarize(outcomes: list[Outcome], wall_s: float) -> dict:
    ok = [o for o in outcomes if o.answer is not None]
    stages = {}
    for stage, attr in STAGE_FIELDS.items():
        # A stage that did not run reports 0 (embed and fan-out on cache hits): only runs that did it count.
        stages[stage] = _pct(
            [getattr(o.answer.timings, attr) for o in ok if getattr(o.answer.timings, attr) > 0]
        )
    by_kind = {kind: _pct([o.latency_s for o in ok if o.kind == kind]) for kind in ("hit", "miss")}
    return {
        "requests": len(outcomes),
        "qps": round(len(ok) / wall_s, 2) if wall_s > 0 else 0.0,
        "errors": dict(Counter(o.error for o in outcomes if o.error)),
        "partial": sum(1 for o in ok if o.answer.partial),
        "cache": dict(Counter(o.answer.cache.value for o in ok)),
        "from_duplicate_cache": sum(1 for o in ok if o.answer.from_duplicate_cache),
        "client": _pct([o.latency_s for o in ok]),
        "client_by_kind": by_kind,
        "stages": stages,
    }


def timeline(outcomes: list[Outcome], *, bucket_s: float = 1.0) -> list[dict]:
    """Per time bucket: complete answers, partial answers, errors, p50 latency."""
    if not outcomes:
        return []
    start = min(o.started_s for o in outcomes)
    buckets: dict[int, list[Outcome]] = {}
    for o in outcomes:
        buckets.setdefault(int((o.started_s - start) // bucket_s), []).append(o)
    rows = []
    for b in sorted(buckets):
        group = buckets[b]
        ok = [o for o in group if o.answer is not None]
        rows.append(
            {
                "t_s": round(b * bucket_s, 1),
                "complete": sum(1 for o in ok if not o.answer.partial),
                "partial": sum(1 for o in ok if o.answer.partial),
                "errors": sum(1 for o in group if o.error),
                "p50_ms": _pct([o.latency_s for o in ok])["p50_ms"],
            }
        )
    return rows


async def ingest(address: str, gallery: list[CatalogueFile]) -> dict:
    items = list(iter_items(gallery))
    started = time.perf_counter()
    async with BrokerClient(address, token=TOKEN, ingest_timeout_s=900) as client:
        summary = await client.ingest_stream(items, timeout_s=900)
    seconds = time.perf_counter() - started
    if summary.ingested != len(items):
        raise RuntimeError(f"ingested {summary.ingested} of {len(items)}")
    return {
        "images": len(items),
        "seconds": round(seconds, 2),
        "images_per_s": round(len(items) / seconds, 2),
        "cache_pending": summary.cache_pending,
    }


async def drive(
    cfg: LoadTestConfig, stack: LocalStack, gallery: list[CatalogueFile], misses: list[CatalogueFile]
) -> dict:
    result: dict = {"ingest": await ingest(stack.broker_address, gallery)}
    log.info("ingested %s", result["ingest"])
    mix = query_mix(
        [f.path.read_bytes() for f in gallery], [f.path.read_bytes() for f in misses], cfg.hit_ratio
    )
    async with BrokerClient(stack.broker_address, timeout_s=cfg.search_timeout_s) as client:
        t0 = time.perf_counter()
        # Warm-up (Triton's first batches, gRPC channels, shard mask caches); not reported.
        await run_clients(
            client,
            mix,
            concurrency=2,
            duration_s=3.0,
            max_requests=20,
            top_k=cfg.top_k,
            timeout_s=cfg.search_timeout_s,
            t0=t0,
        )
        steps = []
        for concurrency in cfg.concurrency:
            started = time.perf_counter()
            outcomes = await run_clients(
                client,
                mix,
                concurrency=concurrency,
                duration_s=cfg.step_s,
                max_requests=cfg.max_requests_per_step,
                top_k=cfg.top_k,
                timeout_s=cfg.search_timeout_s,
                t0=t0,
            )
            step = {"concurrency": concurrency, **summarize(outcomes, time.perf_counter() - started)}
            steps.append(step)
            log.info(
                "concurrency %d: %.1f qps, client p50 %s ms p99 %s ms, cache %s, errors %s",
                concurrency,
                step["qps"],
                step["client"]["p50_ms"],
                step["client"]["p99_ms"],
                step["cache"],
                step["errors"],
            )
        result["steps"] = steps
        if cfg.kill_run_s > 0:
            result["shard_killed"] = await kill_run(cfg, stack, client, mix)
    return result


async def kill_run(
    cfg: LoadTestConfig, stack: LocalStack, client: BrokerClient, mix: list[tuple[str, bytes]]
) -> dict:
    victim = "shard-0"
    killed_at: dict = {}
    t0 = time.perf_counter()

    async def kill_halfway() -> None:
        await asyncio.sleep(cfg.kill_run_s / 2)
        killed_at["t_s"] = round(time.perf_counter() - t0, 2)
        await asyncio.to_thread(stack.processes[victim].kill)
        log.info("killed %s at t=%.1fs", victim, killed_at["t_s"])

    outcomes = await run_clients(
        client,
        mix,
        concurrency=cfg.kill_concurrency,
        duration_s=cfg.kill_run_s,
        max_requests=cfg.max_requests_per_step,
        top_k=cfg.top_k,
        timeout_s=cfg.search_timeout_s,
        t0=t0,
        during=asyncio.ensure_future(kill_halfway()),
    )
    before = [o for o in outcomes if o.started_s < killed_at["t_s"]]
    after = [o for o in outcomes if o.started_s >= killed_at["t_s"]]
    half = cfg.kill_run_s / 2
    return {
        "victim": victim,
        "killed_at_s": killed_at["t_s"],
        "concurrency": cfg.kill_concurrency,
        "before": summarize(before, half),
        "after": summarize(after, half),
        "timeline": timeline(outcomes),
    }


def machine_info() -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "os": platform.platform(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def run(cfg: LoadTestConfig) -> dict:
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    machine = machine_info()
    gallery = pick_gallery(cfg.data_dir, cfg.gallery)
    misses = pick_misses(cfg.data_dir, cfg.queries)
    categories = sorted({f.category for f in gallery})
    work_dir = cfg.work_dir or Path(tempfile.mkdtemp(prefix="imgsearch-loadtest-"))
    stack = LocalStack(
        StackConfig(
            work_dir=work_dir,
            shards=cfg.shards,
            write_token=TOKEN,
            pinned_categories={c: i % cfg.shards for i, c in enumerate(categories)},
            search_timeout_s=cfg.search_timeout_s,
        )
    )
    t_start = time.perf_counter()
    stack.start()
    startup_s = time.perf_counter() - t_start
    log.info("stack up in %.1fs: %s", startup_s, stack.describe())
    try:
        result = asyncio.run(drive(cfg, stack, gallery, misses))
    finally:
        stack.stop()
        if cfg.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    return {
        "kind": "full-stack-loadtest",
        "started_at": started_at,
        "command": "python -m broker.loadtest " + " ".join(sys.argv[1:]),
        "machine": {**machine, "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "grpc_experiments": os.environ.get("GRPC_EXPERIMENTS", ""),
        "stack": {
            "shards": cfg.shards,
            "triton": "CPU (KIND_CPU), default model",
            "redis": True,
            "startup_s": round(startup_s, 1),
            "categories": len(categories),
        },
        "workload": {
            "gallery_images": len(gallery),
            "miss_queries": len(misses),
            "hit_ratio": cfg.hit_ratio,
            "top_k": cfg.top_k,
            "step_s": cfg.step_s,
            "search_timeout_s": cfg.search_timeout_s,
        },
        **result,
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = LoadTestConfig.from_args(argv)
    report = run(cfg)
    cfg.out_json.parent.mkdir(parents=True, exist_ok=True)
    cfg.out_json.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", cfg.out_json)
    if cfg.plot_dir is not None:
        from shard_server.compare_plots import plot_loadtest  # noqa: PLC0415 - matplotlib only here

        for path in plot_loadtest(report, cfg.plot_dir, stem=cfg.out_json.stem):
            log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
