"""Distinct-products search (`SearchOptions.distinct_products`): at most one hit per product, top_k counts
products. Checked against brute force on deterministic synthetic products that each have many near-identical
images, in process and over gRPC (same answers), through the IVF, exact, filtered and untrained paths, with a
product that has more near-identical images than the re-rank looks at, and across categories."""

import asyncio

import numpy as np
import pytest

from broker.merge import merge_top_k
from shard_server.client import ShardClient
from shard_server.config import ShardConfig
from shard_server.server import start_shard_server
from shard_server.types import Condition, Exactness, Filter, Hit, Is, Record, SearchQuery

DIM, PRODUCTS, FAMILY, IMAGES_PER_PRODUCT, K = 512, 1_000, 20, 12, 10
CROWD = 1_200  # images of one product, more than the k x rerank_factor = 800 candidates of a top-10
QUERIES = 40


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _catalogue(seed: int = 11):
    """Products in families of FAMILY products (a product's nearest other products are its family's), each a
    tight cluster of images; product-0 is a crowd of CROWD images. Rows are product-major."""
    rng = np.random.default_rng(seed)
    families = _unit(rng.standard_normal((PRODUCTS // FAMILY, DIM)))
    centres = _unit(np.repeat(families, FAMILY, axis=0) + rng.standard_normal((PRODUCTS, DIM)) / np.sqrt(DIM))
    counts = np.full(PRODUCTS, IMAGES_PER_PRODUCT)
    counts[0] = CROWD
    product_of_row = np.repeat(np.arange(PRODUCTS), counts)
    vectors = _unit(centres[product_of_row] + rng.standard_normal((len(product_of_row), DIM)) * 0.5 / np.sqrt(DIM))
    # Queries near a product centre, so the plain top-10 is mostly that product's images; half of them near the
    # crowd, whose 1,200 images outrank every other product's.
    near = np.where(np.arange(QUERIES) % 2 == 0, 0, rng.integers(1, PRODUCTS, QUERIES))
    queries = _unit(centres[near] + rng.standard_normal((QUERIES, DIM)) * 0.8 / np.sqrt(DIM))
    return vectors, product_of_row, queries


def _records(vectors, product_of_row, rows, category="default"):
    return [
        Record(image_id=f"img-{r}", product_id=f"product-{product_of_row[r]}", category=category,
               vector=vectors[r], attributes={"in_stock": bool(r % 3)})
        for r in rows
    ]


def _truth(vectors, product_of_row, query, k, mask=None):
    """Brute force: each product's best row, the k best products (as image ids, best first)."""
    scores = vectors @ query
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    best: dict[int, int] = {}
    for row in np.argsort(-scores, kind="stable"):
        if not np.isfinite(scores[row]):
            break
        best.setdefault(int(product_of_row[row]), int(row))
        if len(best) == k:
            break
    return [f"img-{r}" for r in best.values()]


async def _wait_trained(client: ShardClient, timeout_s: float = 120.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not all(c.trained for c in (await client.stats(timeout_s=5)).categories):
        assert asyncio.get_running_loop().time() < deadline, "not trained in time"
        await asyncio.sleep(0.2)


def _product_recall(found: list[list[str]], truth: list[list[str]]) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


@pytest.mark.timeout(300)
async def test_distinct_products_against_brute_force_in_process_and_over_grpc(tmp_path):
    vectors, product_of_row, queries = _catalogue()
    config = ShardConfig(data_dir=tmp_path / "shard", dimension=DIM, nlist=64, train_threads=1,
                         max_records_per_request=5000)
    handle = await start_shard_server(config)
    client = ShardClient(f"127.0.0.1:{handle.port}")
    try:
        rows = np.arange(len(vectors))
        records = _records(vectors, product_of_row, rows)
        assert await client.upsert_stream(iter(records), batch_size=1000, timeout_s=120) == len(rows)
        await _wait_trained(client)
        assert (await client.stats(timeout_s=5)).categories[0].index_type == "IVF64,PQ64x4fs"
        in_stock = np.array([bool(r % 3) for r in rows])
        in_stock_only = Filter(all_of=(Condition(field="in_stock", predicate=Is(value=True)),))
        cases = {
            "ivf": ({}, None),
            "exact": ({"exactness": Exactness.EXACT}, None),
            "filtered": ({"filter": in_stock_only}, in_stock),
        }
        for name, (options, mask) in cases.items():
            found_grpc, found_local, truth = [], [], []
            for q in queries:
                query = SearchQuery(vector=q, top_k=K, distinct_products=True, **options)
                remote = await client.search(query, timeout_s=10)
                local = handle.engine.search(query)
                assert [h.image_id for h in remote.hits] == [h.image_id for h in local.hits], name
                products = [h.product_id for h in remote.hits]
                assert len(products) == K and len(set(products)) == K, (name, products)
                scores = [h.score for h in remote.hits]
                assert scores == sorted(scores, reverse=True), name
                found_grpc.append([h.image_id for h in remote.hits])
                found_local.append([h.image_id for h in local.hits])
                truth.append(_truth(vectors, product_of_row, q, K, mask))
            recall = _product_recall(found_grpc, truth)
            if name == "exact":
                assert found_grpc == truth, "an exhaustive distinct search must equal brute force"
            else:
                assert recall >= 0.95, (name, recall)

        # Without the option the same queries return images of one product: the reason for the option.
        plain = await client.search(SearchQuery(vector=queries[0], top_k=K), timeout_s=10)
        assert {h.product_id for h in plain.hits} == {"product-0"}
    finally:
        await client.close()
        await handle.stop(snapshot=False)


async def test_distinct_products_untrained_and_across_categories(tmp_path):
    vectors, product_of_row, _ = _catalogue(seed=5)
    handle = await start_shard_server(ShardConfig(data_dir=tmp_path / "shard", dimension=DIM))
    client = ShardClient(f"127.0.0.1:{handle.port}")
    try:
        # 3 products' images in "shoes"; product-1's images also filed under "bags" (same product, two
        # categories): a distinct search over both categories lists it once. Both partitions stay untrained.
        shoes = np.flatnonzero(np.isin(product_of_row, [1, 2, 3]))
        bags = np.flatnonzero(product_of_row == 1)
        await client.upsert(_records(vectors, product_of_row, shoes, "shoes"), timeout_s=30)
        bag_records = [
            Record(image_id=f"bag-{r}", product_id=f"product-{product_of_row[r]}", category="bags",
                   vector=vectors[r]) for r in bags
        ]
        await client.upsert(bag_records, timeout_s=30)
        query = vectors[bags[0]]
        answer = await client.search(SearchQuery(vector=query, top_k=5, distinct_products=True), timeout_s=5)
        assert [h.product_id for h in answer.hits][:1] == ["product-1"]
        assert sorted(h.product_id for h in answer.hits) == ["product-1", "product-2", "product-3"]
        assert handle.engine.search(SearchQuery(vector=query, top_k=5, distinct_products=True)).hits == answer.hits
        plain = await client.search(SearchQuery(vector=query, top_k=5), timeout_s=5)
        assert [h.product_id for h in plain.hits] == ["product-1"] * 5
    finally:
        await client.close()
        await handle.stop(snapshot=False)


def test_broker_merge_keeps_each_products_best_hit_across_shards():
    def hit(image, product, score):
        return Hit(image_id=image, product_id=product, category="c", score=score)

    shard_a = [hit("a1", "p1", 0.9), hit("a2", "p2", 0.7)]
    shard_b = [hit("b1", "p1", 0.8), hit("b2", "p3", 0.75), hit("b3", "p4", 0.1)]
    assert [h.image_id for h in merge_top_k([shard_a, shard_b], 3, distinct=True)] == ["a1", "b2", "a2"]
    assert [h.image_id for h in merge_top_k([shard_a, shard_b], 3)] == ["a1", "b1", "b2"]
