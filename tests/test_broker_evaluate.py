"""broker.evaluate on its own: product ranks, the summary's Recall@k / MRR / errors, and the search loop with a
stand-in client (the real broker is in tests/test_e2e_broker.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from broker.catalogue import CatalogueFile
from broker.evaluate import QueryOutcome, evaluate, product_rank, summarise
from broker.types import CacheOutcome, SearchAnswer
from imgsearch.errors import InvalidArgumentError
from shard_server.types import Hit


def _hit(image_id: str, product_id: str, score: float) -> Hit:
    return Hit(image_id=image_id, product_id=product_id, category="c", score=score)


def test_product_rank_counts_products_not_images():
    hits = [_hit("a1", "A", 0.9), _hit("a2", "A", 0.8), _hit("b1", "B", 0.7), _hit("c1", "C", 0.6)]
    assert product_rank(hits, "A") == 1
    assert product_rank(hits, "B") == 2  # the second image of A does not push B down
    assert product_rank(hits, "C") == 3
    assert product_rank(hits, "Z") is None
    assert product_rank([], "A") is None


def _outcome(rank, *, error=None, latency_s=0.01, from_cache=False):
    return QueryOutcome(image_id="i", product_id="p", rank=rank, latency_s=latency_s, error=error,
                        from_cache=from_cache)


def test_summary_scores_failed_searches_as_misses():
    outcomes = [_outcome(1), _outcome(2), _outcome(7), _outcome(None), _outcome(None, error="INVALID_ARGUMENT"),
                _outcome(1, from_cache=True)]
    report = summarise(outcomes, top_k=10)
    assert report.queries == 6 and report.answered == 5
    assert report.recall_at == {1: 2 / 6, 5: 3 / 6, 10: 4 / 6}
    assert report.mrr == pytest.approx((1 + 1 / 2 + 1 / 7 + 1) / 6)
    assert report.errors == {"INVALID_ARGUMENT": 1} and report.from_cache == 1
    assert set(summarise(outcomes, top_k=5).recall_at) == {1, 5}  # no Recall@10 from 5 products
    assert set(summarise(outcomes, top_k=3).recall_at) == {1, 3}  # and Recall@k at -k itself
    with pytest.raises(ValueError):
        summarise([], top_k=10)


class _StandInClient:
    """Answers with a fixed ranking; refuses one image; counts concurrent searches."""

    def __init__(self):
        self.in_flight = self.most_in_flight = 0
        self.calls = []

    async def search(self, *, image, top_k, distinct_products, filter, categories, use_duplicate_cache, timeout_s):
        self.calls.append({"top_k": top_k, "distinct": distinct_products, "categories": categories})
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        if image == b"bad":
            raise InvalidArgumentError("not an image")
        hits = (_hit("x", "B", 0.9), _hit("y", "A", 0.8))[:top_k]
        return SearchAnswer(hits=hits, cache=CacheOutcome.MISS, from_duplicate_cache=False, partial=False)


def test_evaluate_keeps_query_order_bounds_concurrency_and_records_errors(tmp_path: Path):
    files = []
    for i, (content, product) in enumerate([(b"ok", "A"), (b"bad", "A"), (b"ok", "B"), (b"ok", "C")] * 2):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(content)
        files.append(CatalogueFile(path=path, image_id=str(i), product_id=product, category=f"cat{i}"))
    files.append(CatalogueFile(path=tmp_path / "missing.jpg", image_id="8", product_id="A", category="cat8"))
    client = _StandInClient()
    outcomes = asyncio.run(evaluate(client, files, top_k=2, own_category=True, concurrency=3))
    assert outcomes.pop().error == "FILE_UNREADABLE"  # listed but missing: counted, the run went on
    assert [o.image_id for o in outcomes] == [str(i) for i in range(8)]
    assert [o.rank for o in outcomes] == [2, None, 1, None] * 2
    assert [o.top_product for o in outcomes] == ["B", None, "B", "B"] * 2
    assert [o.error for o in outcomes] == [None, "INVALID_ARGUMENT", None, None] * 2
    assert client.most_in_flight == 3
    assert all(c["distinct"] and c["top_k"] == 2 for c in client.calls)
    # each search in its own query's category (calls start in whatever order the file reads finish)
    assert sorted(c["categories"] for c in client.calls) == sorted((f"cat{i}",) for i in range(8))
    with pytest.raises(ValueError):
        asyncio.run(evaluate(client, files, concurrency=0))
