"""Chaos test of the broker's writes over replicas: a broker core (in process, the real ShardPool) over 2 shards x
2 replica processes; writers (one per set of ids, so no two writes of an id race) ingest, re-ingest, move images
between the shards' categories and delete them by vector, while one replica at a time is SIGKILLed and restarted.
At the end every acknowledged write must be on every replica of its owning shard, as written, and on no replica of
the other shard; ids whose last write failed are skipped (uncertain: the caller was told to retry).

    python -m broker.chaos [--seconds 60] [--seed 0] [--work-dir DIR]

Exit status 1 on any violation. (Written by a review of the broker's replica writes, 2026-12-04.)
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from broker.core import Broker
from broker.fanout import ShardPool
from broker.routing import ShardMap
from broker.types import CatalogueItem
from imgsearch.errors import ImgsearchError
from imgsearch.ports import free_port
from shard_server.client import ShardClient
from shard_server.process import ShardProcess

DIM = 32
CATEGORY_SHARD = {"a": "s0", "a2": "s0", "b": "s1", "b2": "s1"}
REPLICAS = {"s0": ("s0r1", "s0r2"), "s1": ("s1r1", "s1r2")}
WRITERS = 4
IDS_PER_WRITER = 400


class NoEmbedder:
    """For writers that ingest vectors: an embedding call would be a bug."""

    async def embed(self, images, *, timeout_s, bulk=False):
        raise AssertionError("vector ingests only: nothing is embedded")

    async def ready(self, *, timeout_s):
        return True

    async def close(self):
        pass


def _unit(rng: random.Random) -> np.ndarray:
    v = np.random.default_rng(rng.getrandbits(32)).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


async def _held(address: str, ids: list[str]) -> dict:
    for attempt in range(60):  # a restarted replica is refused for a while by the client's reconnect backoff
        try:
            async with ShardClient(address) as client:
                held = {}
                for lo in range(0, len(ids), 1000):
                    held.update({r.image_id: r for r in await client.get(ids[lo : lo + 1000], timeout_s=30)})
                return held
        except ImgsearchError:
            await asyncio.sleep(2 if attempt else 0.5)
    raise RuntimeError(f"{address} unreachable")


async def run(seconds: float, seed: int, base: Path) -> int:
    rng = random.Random(seed)
    ports = {name: free_port() for names in REPLICAS.values() for name in names}  # fixed: restarts keep them
    processes = {
        name: ShardProcess(base / name, extra_args=("--dimension", str(DIM), "--snapshot-wal-bytes", "300000",
                                                    "--port", str(port)))
        for name, port in ports.items()
    }
    try:
        for process in processes.values():
            process.start(timeout_s=60)
        shard_map = ShardMap(shards={s: tuple(f"127.0.0.1:{ports[r]}" for r in rs) for s, rs in REPLICAS.items()},
                             categories=CATEGORY_SHARD)
        broker = Broker(pool=ShardPool(shard_map), embedder=NoEmbedder(), cache=None, repair=None, dimension=DIM,
                        max_image_bytes=1 << 22, max_image_pixels=1 << 22)
        state: dict[str, tuple[str, np.ndarray] | None] = {}
        uncertain: set[str] = set()
        stop = asyncio.Event()
        counts = {"ok": 0, "failed": 0}

        async def writer(w: int) -> None:
            wr = random.Random(seed * 1000 + w)
            ids = [f"w{w}-{k}" for k in range(IDS_PER_WRITER)]
            while not stop.is_set():
                batch = wr.sample(ids, wr.randint(1, 20))
                if wr.random() < 0.25:
                    new = dict.fromkeys(batch)
                    call = broker.delete(batch, timeout_s=10)
                else:
                    new, items = {}, []
                    for image_id in batch:
                        category, vector = wr.choice(list(CATEGORY_SHARD)), _unit(wr)
                        items.append(CatalogueItem(image_id=image_id, product_id="p", category=category,
                                                   vector=vector, attributes={"price": float(wr.randint(0, 99))}))
                        new[image_id] = (category, vector)
                    call = broker.ingest(items, timeout_s=10)
                try:
                    await call
                    counts["ok"] += 1
                    state.update(new)
                    uncertain.difference_update(new)
                except ImgsearchError:
                    counts["failed"] += 1
                    uncertain.update(new)
                    await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(writer(w)) for w in range(WRITERS)]
        started, kills = time.monotonic(), 0
        while time.monotonic() - started < seconds:
            await asyncio.sleep(rng.uniform(0.5, 3))
            victim = rng.choice(list(processes))
            processes[victim].kill()
            kills += 1
            await asyncio.sleep(rng.uniform(0.2, 2))
            processes[victim].start(timeout_s=60)
        stop.set()
        await asyncio.gather(*tasks)
        await asyncio.sleep(3)  # the broker's pending stale-copy removals go out (broker/removal_hints.py)
        held = {name: await _held(f"127.0.0.1:{port}", list(state)) for name, port in ports.items()}
        violations = []
        for image_id, written in state.items():
            if image_id in uncertain:
                continue
            for name in ports:
                record = held[name].get(image_id)
                owner = written is not None and CATEGORY_SHARD[written[0]] == name[:2]
                if owner and (record is None or record.category != written[0]
                              or not np.allclose(record.vector, written[1], atol=1e-5)):
                    violations.append((image_id, name, "missing or old"))
                if not owner and record is not None:
                    violations.append((image_id, name, f"should be absent, holds it in {record.category}"))
        await broker.pool.close()
    finally:
        for process in processes.values():
            process.kill()
    checked = len(set(state) - uncertain)
    print(f"{seconds:.0f} s, {kills} replica kills, writes acknowledged {counts['ok']}, failed {counts['failed']}; "
          f"ids checked {checked}, uncertain {len(uncertain)}; violations {len(violations)}")
    for violation in violations[:10]:
        print("  ", violation)
    return 1 if violations else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None, help="kept when given; a temporary one otherwise")
    args = parser.parse_args(argv)
    base = args.work_dir or Path(tempfile.mkdtemp(prefix="imgsearch-broker-chaos-"))
    base.mkdir(parents=True, exist_ok=True)
    try:
        return asyncio.run(run(args.seconds, args.seed, base))
    finally:
        if args.work_dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
