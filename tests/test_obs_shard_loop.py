"""A shard search over many partitions runs on the search threads, not on the event loop (ShardConfig.inline_search):
inline, one over 20,000 categories stalled the loop, and every other call of the shard, for 339 ms."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shard_server.client import ShardClient
from shard_server.config import ShardConfig
from shard_server.engine import MANY_PARTITIONS, ShardEngine
from shard_server.server import start_shard_server
from shard_server.types import Exactness, Record, SearchQuery

DIM = 32
CATEGORIES = 4_000


def _records(categories: int) -> list[Record]:
    rng = np.random.default_rng(3)
    return [Record(image_id=f"img-{c}", product_id=f"p-{c}", category=f"cat-{c:06d}-" + "x" * 40,
                   vector=rng.standard_normal(DIM).astype(np.float32)) for c in range(categories)]


@pytest.fixture
async def shard(tmp_path):
    handle = await start_shard_server(ShardConfig(data_dir=tmp_path / "shard", dimension=DIM,
                                                  max_records_per_request=CATEGORIES))
    await asyncio.to_thread(handle.engine.upsert, _records(CATEGORIES))
    client = ShardClient(f"127.0.0.1:{handle.port}")
    try:
        yield handle, client
    finally:
        await client.close()
        await handle.stop(snapshot=False)


def _query(categories: tuple[str, ...] = (), **kw) -> SearchQuery:
    return SearchQuery(vector=np.ones(DIM, np.float32), top_k=5, categories=categories, **kw)


def _category(c: int) -> str:
    return f"cat-{c:06d}-" + "x" * 40


async def test_searches_over_many_partitions_go_to_the_search_threads(shard, monkeypatch):
    _handle, client = shard
    threads: list[str] = []
    search = ShardEngine.search

    def spy(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return search(self, *args, **kwargs)

    monkeypatch.setattr(ShardEngine, "search", spy)
    cases = [
        ((), True),  # every category of the shard
        (tuple(_category(c) for c in range(MANY_PARTITIONS)), True),
        (tuple(_category(c) for c in range(MANY_PARTITIONS - 1)), False),
        # unknown categories and repeats cover no more partitions
        (tuple(_category(c) for c in range(3)) * 5 + tuple(f"nope-{i}" for i in range(20)), False),
        ((_category(7),), False),  # the common one-category search stays on the loop
    ]
    for categories, on_thread in cases:
        threads.clear()
        result = await client.search(_query(categories), timeout_s=30)
        assert result.hits, categories[:2]
        assert len(threads) == 1 and threads[0].startswith("shard-search") == on_thread, (len(categories), threads)
    threads.clear()  # EXACT searches went to the threads before, and still do
    await client.search(_query((_category(7),), exactness=Exactness.EXACT), timeout_s=30)
    assert threads[0].startswith("shard-search")


async def test_the_event_loop_answers_health_checks_during_a_many_category_search(shard):
    handle, client = shard
    async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        t0 = time.perf_counter()
        await client.search(_query(), timeout_s=30)
        search_s = time.perf_counter() - t0
        async def search_several() -> None:
            for _ in range(4):
                await client.search(_query(), timeout_s=60)

        searches = asyncio.ensure_future(search_several())
        checks = []
        await asyncio.sleep(0.005)
        while not searches.done():
            t = time.perf_counter()
            await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            checks.append(time.perf_counter() - t)
            await asyncio.sleep(0.002)
        await searches
    median = sorted(checks)[len(checks) // 2]
    print(f"one search over {CATEGORIES} categories {search_s * 1e3:.0f} ms; {len(checks)} health checks during 4, "
          f"median {median * 1e3:.1f} ms, max {max(checks) * 1e3:.1f} ms")
    # Inline, each check waited for a whole search: about one check per search, each taking about a search. (The
    # maximum is left alone: the search thread holds the GIL between its switches, and client and server share
    # this process and its loop here.)
    assert len(checks) >= 8, (len(checks), search_s)
    assert median < 0.25 * search_s, (median, search_s)
