"""The stored records behind a search by image id: the shard's Get (in process and over gRPC, same answers) and
the broker's ShardPool.get over real shard processes on loopback ports: found on whichever shard holds it,
NOT_FOUND only when every shard answered, UNAVAILABLE when the image may be on a shard that is down."""

import numpy as np
import pytest

from broker.errors import UnknownImageError
from broker.fanout import ShardPool
from broker.routing import ShardMap
from imgsearch.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError, UnavailableError
from imgsearch.ports import free_port
from shard_server import synthetic
from shard_server.client import ShardClient
from shard_server.config import ShardConfig
from shard_server.server import start_shard_server

DIM = 512


@pytest.mark.parametrize("vector_dtype", ["float32", "float16"])
async def test_shard_get_returns_the_stored_records(tmp_path, vector_dtype):
    catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=20, seed=4)
    config = ShardConfig(data_dir=tmp_path / "shard", dimension=DIM, vector_dtype=vector_dtype,
                         max_records_per_request=100)
    handle = await start_shard_server(config)
    client = ShardClient(f"127.0.0.1:{handle.port}")
    try:
        shoes = catalogue.records(0, 40, category="shoes")
        bags = catalogue.records(40, 80, category="bags")
        await client.upsert(shoes + bags, timeout_s=30)
        await client.delete([shoes[3].image_id], timeout_s=30)
        asked = [bags[5].image_id, "no-such-image", shoes[3].image_id, shoes[0].image_id, bags[5].image_id]
        records = await client.get(asked, timeout_s=5)
        # asked order, each once; unknown and deleted ids left out
        assert [r.image_id for r in records] == [bags[5].image_id, shoes[0].image_id]
        assert [r.category for r in records] == ["bags", "shoes"]
        for got, stored in zip(records, (bags[5], shoes[0])):
            assert got.product_id == stored.product_id and dict(got.attributes) == dict(stored.attributes)
            assert got.vector.dtype == np.float32
            np.testing.assert_allclose(got.vector, stored.vector, atol=1e-3 if vector_dtype == "float16" else 1e-6)
        local = handle.engine.get(asked)
        assert [(r.image_id, r.category, r.product_id) for r in local] == [
            (r.image_id, r.category, r.product_id) for r in records
        ]
        assert await client.get([], timeout_s=5) == []
        with pytest.raises(InvalidArgumentError):
            await client.get(["ok", ""], timeout_s=5)
        with pytest.raises(ResourceExhaustedError):
            await client.get([f"id-{i}" for i in range(101)], timeout_s=5)
        # a re-ingested image (new row) is read from its new row
        moved = catalogue.records(90, 91, category="bags")[0]
        await client.upsert([type(moved)(image_id=shoes[0].image_id, product_id="p-new", category="bags",
                                         vector=moved.vector)], timeout_s=30)
        (again,) = await client.get([shoes[0].image_id], timeout_s=5)
        assert (again.category, again.product_id) == ("bags", "p-new")
        np.testing.assert_allclose(again.vector, moved.vector, atol=1e-3)
    finally:
        await client.close()
        await handle.stop(snapshot=False)


async def test_shard_pool_get_asks_every_shard(tmp_path):
    catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=20, seed=5)
    handles = [
        await start_shard_server(ShardConfig(data_dir=tmp_path / f"shard-{i}", dimension=DIM)) for i in range(2)
    ]
    addresses = [f"127.0.0.1:{h.port}" for h in handles]
    dead = f"127.0.0.1:{free_port()}"
    pool = ShardPool(ShardMap(shards={"s0": (addresses[0],), "s1": (dead, addresses[1])}))
    with_dead_shard = ShardPool(ShardMap(shards={"s0": (addresses[0],), "s1": (dead,)}))
    try:
        first, second = catalogue.records(0, 1, category="a"), catalogue.records(1, 2, category="b")
        for address, records in zip(addresses, (first, second)):
            writer = ShardClient(address)
            await writer.upsert(records, timeout_s=30)
            await writer.close()
        # found on either shard; s1's first replica is down, its second answers
        assert (await pool.get(first[0].image_id, timeout_s=5)).category == "a"
        assert (await pool.get(second[0].image_id, timeout_s=5)).category == "b"
        with pytest.raises(UnknownImageError) as unknown:
            await pool.get("no-such-image", timeout_s=5)
        assert isinstance(unknown.value, NotFoundError)
        # every replica of s1 down: an image on s0 is still found, an unknown one may be on s1
        assert (await with_dead_shard.get(first[0].image_id, timeout_s=5)).category == "a"
        with pytest.raises(UnavailableError, match="could not be asked"):
            await with_dead_shard.get("no-such-image", timeout_s=5)
    finally:
        await pool.close()
        await with_dead_shard.close()
        for h in handles:
            await h.stop(snapshot=False)
