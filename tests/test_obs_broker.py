"""Broker observability and state placement: the shards' reachability kept current in a gauge (not only in the
start-up log), and the removal journal in the Redis its setting names (its own, not the evicting cache's)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import redis
from conftest import RedisProcess
from prometheus_client import REGISTRY

from broker.config import BrokerConfig
from broker.hint_journal import HintJournal
from broker.routing import ShardMap
from broker.server import start_broker
from broker.stack import free_port
from imgsearch.serving import ServerOptions
from shard_server.config import ShardConfig
from shard_server.server import start_shard_server


def _config(shard_map: ShardMap, **kw) -> BrokerConfig:
    return BrokerConfig(server=ServerOptions(host="127.0.0.1", port=0), shard_map=shard_map,
                        triton_url=f"127.0.0.1:{free_port()}", health_check_interval_s=0.2, **kw)


async def _until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def _unreachable() -> float | None:
    return REGISTRY.get_sample_value("imgsearch_broker_shards_unreachable")


async def test_unreachable_shards_are_a_gauge_kept_current(tmp_path):
    """A broker that went SERVING after --ready-wait-s with a shard unreachable said so only in its log; the
    gauge counts such shards, and follows them while the broker serves."""
    up = await start_shard_server(ShardConfig(data_dir=tmp_path / "s0", dimension=512))
    late_port = free_port()
    shard_map = ShardMap(shards={"s0": (f"127.0.0.1:{up.port}",), "s1": (f"127.0.0.1:{late_port}",)})
    handle = await start_broker(_config(shard_map, ready_wait_s=0.3, shard_health_interval_s=0.2))
    late = None
    try:
        await _until(lambda: _unreachable() == 1)
        late = await start_shard_server(ShardConfig(data_dir=tmp_path / "s1", dimension=512, port=late_port))
        await _until(lambda: _unreachable() == 0)  # s1 came up after the broker served
        await up.stop(snapshot=False)
        up = None
        await _until(lambda: _unreachable() == 1)  # s0 went away while it served
    finally:
        await handle.stop(0)
        for shard in (up, late):
            if shard is not None:
                await shard.stop(snapshot=False)


@pytest.fixture
def two_redis(tmp_path):
    servers = [RedisProcess(tmp_path / name) for name in ("cache", "journal")]
    for server in servers:
        server.start()
    yield servers
    for server in servers:
        server.stop()


async def _seed(url: str, address: str, ids: list[str]) -> None:
    journal = HintJournal(url)
    try:
        await journal.save(address, {image_id: time.time_ns() for image_id in ids})
    finally:
        await journal.close()


def _journal_keys(url: str) -> list[bytes]:
    client = redis.Redis.from_url(url)
    try:
        return client.keys("imgsearch:removals:*")
    finally:
        client.close()


async def test_the_broker_keeps_its_removal_journal_in_the_journal_redis(two_redis):
    """The cache's Redis runs allkeys-lru without persistence: a journal there was evicted (or lost on restart),
    leaving old copies of moved images on their old shard. With --journal-redis-url the broker reads and writes
    the journal there, and the cache's Redis holds none of it."""
    cache, journal = two_redis
    down = f"127.0.0.1:{free_port()}"  # a replica that stays down: its removals stay pending
    shard_map = ShardMap(shards={"s0": (down,)})
    await _seed(journal.url, down, ["left-1", "left-2", "left-3"])  # a stopped broker left these
    handle = await start_broker(_config(shard_map, redis_url=cache.url, journal_redis_url=journal.url))
    try:
        hints = handle.broker.pool.removal_hints
        await _until(lambda: len(hints) == 3)  # taken up from the journal's Redis
        await hints.add(down, ["moved-1"], time.time_ns())
        keys = _journal_keys(journal.url)
        assert keys == [f"imgsearch:removals:{down}".encode()]
        assert redis.Redis.from_url(journal.url).hlen(keys[0]) == 4
        assert _journal_keys(cache.url) == []
    finally:
        await handle.stop(0)


async def test_without_a_journal_url_the_journal_stays_in_the_cache_redis(two_redis):
    """Nothing changes for a single-Redis setup: the journal defaults to the cache's Redis."""
    cache, journal = two_redis
    down = f"127.0.0.1:{free_port()}"
    await _seed(cache.url, down, ["left-1", "left-2"])
    await _seed(journal.url, down, ["elsewhere"])
    config = _config(ShardMap(shards={"s0": (down,)}), redis_url=cache.url)
    assert config.removal_journal_url == cache.url
    handle = await start_broker(config)
    try:
        await _until(lambda: len(handle.broker.pool.removal_hints) == 2)
        await asyncio.sleep(0.3)
        assert len(handle.broker.pool.removal_hints) == 2  # the other Redis was never read
    finally:
        await handle.stop(0)


def test_journal_redis_url_flag_and_environment(monkeypatch):
    for key in ("REDIS_URL", "IMGSEARCH_JOURNAL_REDIS_URL"):
        monkeypatch.delenv(key, raising=False)
    shard_map = '{"shards": {"s0": ["127.0.0.1:1"]}}'
    plain = BrokerConfig.from_env(["--shard-map", shard_map, "--redis-url", "redis://cache:6379/0"])
    assert plain.journal_redis_url is None and plain.removal_journal_url == "redis://cache:6379/0"
    flag = BrokerConfig.from_env(["--shard-map", shard_map, "--redis-url", "redis://cache:6379/0",
                                  "--journal-redis-url", "redis://journal:6379/0"])
    assert flag.removal_journal_url == "redis://journal:6379/0" and flag.redis_url == "redis://cache:6379/0"
    monkeypatch.setenv("IMGSEARCH_JOURNAL_REDIS_URL", "redis://journal-env:6379/1")
    env = BrokerConfig.from_env(["--shard-map", shard_map])
    assert env.removal_journal_url == "redis://journal-env:6379/1" and env.redis_url is None
    assert dataclasses.replace(env, journal_redis_url=None).removal_journal_url is None
