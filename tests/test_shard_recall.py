"""Recall@10 of the shard against brute force on synthetic clustered data, in process and through gRPC, and
congruence of the two paths (same top-K)."""

import asyncio
import urllib.request

import numpy as np
import pytest

from shard_server import synthetic
from shard_server.client import ShardClient
from shard_server.config import ShardConfig
from shard_server.server import start_shard_server
from shard_server.types import Exactness, SearchQuery

DIM, N, QUERIES, K = 512, 20_000, 100, 10


def _config(tmp_path) -> ShardConfig:
    # nlist fixed small so training (k-means on a busy 2-core machine) takes about a second.
    return ShardConfig(data_dir=tmp_path / "shard", dimension=DIM, nlist=128, train_threads=1,
                       max_records_per_request=5000)


async def _wait_trained(client: ShardClient, timeout_s: float = 120.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        stats = await client.stats(timeout_s=5)
        if stats.categories and all(c.trained for c in stats.categories):
            return
        assert asyncio.get_running_loop().time() < deadline, f"not trained in time: {stats}"
        await asyncio.sleep(0.2)


@pytest.mark.timeout(300)
async def test_recall_in_process_and_grpc_agree(tmp_path):
    catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=200, seed=7)
    base = catalogue.vectors(0, N)
    queries = catalogue.queries(QUERIES)
    truth = synthetic.brute_force_top_k(base, queries, K)

    handle = await start_shard_server(_config(tmp_path))
    client = ShardClient(f"127.0.0.1:{handle.port}")
    try:
        assert await client.upsert_stream(catalogue.iter_records(0, N), batch_size=500, timeout_s=120) == N
        await _wait_trained(client)
        stats = await client.stats(timeout_s=5)
        assert stats.categories[0].vectors == N
        assert stats.categories[0].index_type == "IVF128,PQ64x4fs"

        via_grpc, in_process = [], []
        for q in queries:
            query = SearchQuery(vector=q, top_k=K)
            remote = await client.search(query, timeout_s=10)
            local = handle.engine.search(query)
            via_grpc.append([h.image_id for h in remote.hits])
            in_process.append([h.image_id for h in local.hits])
            np.testing.assert_allclose([h.score for h in remote.hits], [h.score for h in local.hits], atol=1e-6)
            assert remote.candidates_scanned > 0
        recall_grpc = synthetic.recall_at_k(via_grpc, truth, K)
        recall_local = synthetic.recall_at_k(in_process, truth, K)
        assert via_grpc == in_process, "gRPC and in-process searches returned different top-K"
        assert recall_local >= 0.95, recall_local
        assert recall_grpc >= 0.95, recall_grpc

        # EXACT is exhaustive: recall 1 (up to float16 rounding of stored vectors breaking near-ties).
        exact = [[h.image_id for h in (await client.search(
            SearchQuery(vector=q, top_k=K, exactness=Exactness.EXACT), timeout_s=10)).hits] for q in queries[:20]]
        assert synthetic.recall_at_k(exact, truth[:20], K) >= 0.99
        # Hits carry product id, category and attributes.
        hit = (await client.search(SearchQuery(vector=queries[0], top_k=1), timeout_s=10)).hits[0]
        row = int(hit.image_id.split("-")[1])
        assert hit.product_id == f"product-{row // 4}" and hit.category == "default"
        assert hit.attributes["colour"] == catalogue.attributes(row, row + 1)[0]["colour"]
    finally:
        await client.close()
        await handle.stop(snapshot=False)


async def test_unknown_category_is_empty_and_categories_merge(tmp_path):
    catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=20, seed=3)
    config = ShardConfig(data_dir=tmp_path / "shard", dimension=DIM, metrics_port=0)
    handle = await start_shard_server(config)
    client = ShardClient(f"127.0.0.1:{handle.port}")
    try:
        await client.upsert(catalogue.records(0, 300, category="shoes"), timeout_s=30)
        await client.upsert(catalogue.records(300, 600, category="bags"), timeout_s=30)
        q = catalogue.vectors(450, 451)[0]
        empty = await client.search(SearchQuery(vector=q, top_k=5, categories=("no-such-category",)), timeout_s=5)
        assert empty.hits == ()
        both = await client.search(SearchQuery(vector=q, top_k=5), timeout_s=5)
        assert both.hits[0].image_id == synthetic.image_id(450) and both.hits[0].category == "bags"
        shoes = await client.search(SearchQuery(vector=q, top_k=5, categories=("shoes", "nope")), timeout_s=5)
        assert {h.category for h in shoes.hits} == {"shoes"}
        scores = [h.score for h in both.hits]
        assert scores == sorted(scores, reverse=True)
        stats = await client.stats(timeout_s=5)
        assert {(c.category, c.vectors, c.trained, c.index_type) for c in stats.categories} == {
            ("shoes", 300, False, "Flat"), ("bags", 300, False, "Flat")}
        def scrape() -> tuple[str, dict[str, float]]:
            with urllib.request.urlopen(f"http://127.0.0.1:{handle.metrics_port}/metrics", timeout=5) as response:
                text = response.read().decode()
            totals = {name: float(line.split()[-1]) for line in text.splitlines() for name in
                      ("imgsearch_shard_vectors", "imgsearch_shard_categories", "imgsearch_shard_categories_untrained")
                      if line.startswith(name + " ")}
            return text, totals

        exposition, totals = scrape()
        for line in ('imgsearch_shard_partition_search_duration_seconds_count{strategy="exact"}',
                     'grpc_server_handled_total{grpc_code="OK",grpc_method="Search"',
                     "imgsearch_shard_candidates_scanned_count", "imgsearch_shard_wal_bytes",
                     "imgsearch_shard_resident_bytes", "imgsearch_shard_snapshots_total",
                     "imgsearch_shard_index_swaps_total", 'imgsearch_shard_training_events_total{event="failed"}',
                     'imgsearch_build_info{component="shard",version="0.1.0"} 1.0'):
            assert line in exposition, line
        # Categories are no label (the writers choose them: unbounded); an emptied category leaves the totals.
        # (The totals are this process's: other tests' engines may count in them too, hence the differences.)
        assert "category=" not in exposition
        assert totals["imgsearch_shard_vectors"] >= 600 and totals["imgsearch_shard_categories_untrained"] >= 2
        await client.delete([synthetic.image_id(i) for i in range(300)], timeout_s=30)
        _, after = scrape()
        assert {name: totals[name] - after[name] for name in totals} == {
            "imgsearch_shard_vectors": 300, "imgsearch_shard_categories": 1, "imgsearch_shard_categories_untrained": 1}
    finally:
        await client.close()
        await handle.stop(snapshot=False)
