"""Replicas end to end: one shard served by two `imgsearch-shard` processes behind a real broker (with real
Triton and redis-server). Writes reach every replica; searches keep working, not partial, while one replica is
down; writes then fail with UNAVAILABLE (the caller retries: ingest is idempotent) and work again once it is
back."""

from __future__ import annotations

import time

import pytest

from broker.catalogue import grocery_split
from broker.client import SyncBrokerClient
from broker.stack import LocalStack, StackConfig
from broker.types import CatalogueItem
from imgsearch.errors import UnavailableError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def photos(data_dir):
    train = grocery_split(data_dir, "train")
    return train[:: len(train) // 8][:8]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, photos):
    s = LocalStack(StackConfig(work_dir=tmp_path_factory.mktemp("replicas"), shards=1, replicas=2))
    s.start()
    try:
        with SyncBrokerClient(s.broker_address) as client:
            items = [_item(f) for f in photos]
            assert client.ingest_stream(items, timeout_s=300).ingested == len(items)
        yield s
    finally:
        s.stop()


def _item(f) -> CatalogueItem:
    return CatalogueItem(
        image_id=f.image_id,
        product_id=f.product_id,
        category=f.category,
        image=f.path.read_bytes(),
        attributes=f.attributes,
    )


def test_every_replica_holds_every_write(stack, photos):
    with SyncBrokerClient(stack.broker_address) as client:
        replicas = client.stats()
    assert [r.shard for r in replicas] == ["shard-0", "shard-0"]
    assert len({r.address for r in replicas}) == 2
    assert [sum(c.vectors for c in r.categories) for r in replicas] == [len(photos), len(photos)]


def test_searches_survive_a_replica_and_writes_wait_for_it(stack, photos):
    stack.processes["shard-0-r1"].kill()
    with SyncBrokerClient(stack.broker_address, timeout_s=10) as client:
        for f in photos[:4]:  # round-robin lands on the dead replica every other time
            answer = client.search(image=f.path.read_bytes(), top_k=3, use_duplicate_cache=False)
            assert not answer.partial and answer.hits[0].image_id == f.image_id
            assert answer.shards[0].address == stack.shard_addresses[0]
        with pytest.raises(UnavailableError):
            client.ingest(_item(photos[0]))

        stack.restart_shard("shard-0-r1")
        for _ in range(20):  # the broker's channel reconnects with backoff
            try:
                assert client.ingest(_item(photos[0])).ingested == 1
                break
            except UnavailableError:
                time.sleep(0.5)
        else:
            pytest.fail("writes did not resume after the replica came back")
        counts = [sum(c.vectors for c in r.categories) for r in client.stats()]
        assert counts == [len(photos), len(photos)]
