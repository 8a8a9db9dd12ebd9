"""Full answers: a trained partition answers top_k hits (top_k products when distinct) whatever its probed lists
hold, the broker's merge lists an image once, and a search by image id at the largest top_k answers that many."""

import asyncio
import threading
from dataclasses import replace

import pytest

from broker.core import Broker
from broker.fanout import ShardPool
from broker.merge import merge_top_k
from broker.routing import ShardMap
from broker.types import Query
from shard_server import synthetic
from shard_server.config import ShardConfig
from shard_server.engine import ShardEngine
from shard_server.partition import ExactScanTooLong, Partition
from shard_server.server import start_shard_server
from shard_server.types import Exactness, Hit, SearchQuery

DIM, N = 128, 20_000


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=200, seed=3)
    # derived nlist (IVF566 at 20k rows): ~35 rows per list, as in a production partition
    config = ShardConfig(data_dir=tmp_path_factory.mktemp("topk"), dimension=DIM, index_factory="IVF{nlist},PQ32x4fs",
                         train_threads=1)
    engine = ShardEngine(config)
    engine.load()
    for lo in range(0, N, 5000):
        engine.upsert(catalogue.records(lo, lo + 5000))
    assert engine.train_pending() == 1
    yield engine, catalogue
    engine.close()


@pytest.mark.parametrize(("top_k", "nprobe", "exactness", "distinct"), [
    (1000, 0, Exactness.DEFAULT, False), (500, 0, Exactness.FAST, False), (100, 1, Exactness.DEFAULT, False),
    (1000, 0, Exactness.DEFAULT, True), (50, 1, Exactness.DEFAULT, True)])
def test_unfiltered_ivf_search_returns_top_k_hits(engine, top_k, nprobe, exactness, distinct):
    """The probed lists of a trained partition can hold fewer rows than top_k: the search still answers top_k
    hits (distinct: top_k products) while the partition holds that many, as a filtered search does."""
    engine, catalogue = engine
    for q in catalogue.queries(3):
        hits = engine.search(SearchQuery(vector=q, top_k=top_k, nprobe=nprobe, exactness=exactness,
                                         distinct_products=distinct)).hits
        assert len(hits) == top_k
        keys = [h.product_id if distinct else h.image_id for h in hits]
        assert len(set(keys)) == top_k
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)


def test_broker_merge_lists_an_image_once():
    """A stale copy of an image on its former shard (re-ingested under another shard's category while the former
    shard was down) must not make one answer list the image twice."""
    def hit(image, category, score):
        return Hit(image_id=image, product_id="p-" + image, category=category, score=score)

    merged = merge_top_k([[hit("x", "shoes", 1.0), hit("a", "shoes", 0.5)], [hit("x", "bags", 1.0)]], 3)
    assert [h.image_id for h in merged] == ["x", "a"]


async def test_a_search_by_image_id_at_the_largest_top_k_answers_that_many(tmp_path):
    """A search by image id asks the shards for one more hit (the image itself, left out): at the broker's
    largest top_k that one must not be lost to the shards' limit (ShardConfig.max_top_k is one above it)."""
    catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=20, seed=8)
    handle = await start_shard_server(ShardConfig(data_dir=tmp_path / "shard", dimension=DIM))
    pool = ShardPool(ShardMap(shards={"s0": (f"127.0.0.1:{handle.port}",)}, categories={}))
    broker = Broker(pool=pool, embedder=None, cache=None, repair=None, dimension=DIM, max_image_bytes=1 << 20,
                    max_image_pixels=1 << 20)
    try:
        await pool.upsert(catalogue.records(0, 1100), timeout_s=60)
        source = synthetic.image_id(7)
        hits = (await broker.search(Query(image_id=source, top_k=broker.max_top_k), timeout_s=30)).hits
        assert len(hits) == broker.max_top_k and source not in {h.image_id for h in hits}
    finally:
        await pool.close()
        await handle.stop(snapshot=False)


async def test_a_long_exact_fallback_runs_on_a_search_thread_not_the_event_loop(tmp_path, monkeypatch):
    """Searches run on the shard's event loop (ShardConfig.inline_search). The rare exact fallback of an IVF
    search (its probed lists held fewer than top_k rows) scores every row of the partition: it must go to the
    search threads, or every other call on the shard waits behind it."""
    catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=200, seed=5)
    config = ShardConfig(data_dir=tmp_path / "shard", dimension=DIM, index_factory="IVF{nlist},PQ32x4fs",
                         train_threads=1, max_nprobe=1, exact_scan_max_rows=5_000)
    handle = await start_shard_server(config)
    pool = ShardPool(ShardMap(shards={"s0": (f"127.0.0.1:{handle.port}",)}, categories={}))
    threads: list[str] = []
    exact_over = Partition._exact_over

    def spy(self, *args, **kwargs):
        answer = exact_over(self, *args, **kwargs)  # raises before scanning when the scan is too long here
        threads.append(threading.current_thread().name)  # where a scan ran
        return answer

    monkeypatch.setattr(Partition, "_exact_over", spy)
    try:
        for lo in range(0, 12_000, 4_000):
            await pool.upsert(catalogue.records(lo, lo + 4_000), timeout_s=60)
        await asyncio.to_thread(handle.engine.train_pending)
        assert all(stats.trained for stats in handle.engine.stats().categories)
        query = catalogue.queries(1)[0]
        with pytest.raises(ExactScanTooLong):  # what the event loop's attempt sees
            handle.engine.search(SearchQuery(vector=query, top_k=500), exact_rows_limit=5_000)
        threads.clear()
        hits = (await broker_search(pool, query, top_k=500)).hits
        assert len(hits) == 500
        assert threads and all(name.startswith("shard-search") for name in threads), threads
        # A search that needs no long scan still runs on the loop.
        threads.clear()
        assert len((await broker_search(pool, query, top_k=10)).hits) == 10
        assert threads == []
    finally:
        await pool.close()
        await handle.stop(snapshot=False)


async def broker_search(pool: ShardPool, vector, *, top_k: int):
    broker = Broker(pool=pool, embedder=None, cache=None, repair=None, dimension=DIM, max_image_bytes=1 << 20,
                    max_image_pixels=1 << 20)
    return await broker.search(Query(vector=vector, top_k=top_k), timeout_s=30)


def test_a_search_over_many_categories_reads_details_for_the_best_rows_only_and_answers_the_same(tmp_path,
                                                                                               monkeypatch):
    """A search over every category of a shard that holds hundreds read ids and attributes for each category's
    top-k (193 ms for 2,000 categories of 10 vectors, `python -m shard_server.category_probe`). It now reads
    them for the best rows of all only; the answers are those of the one-pass search, filters, distinct products,
    deletes and a category's re-ingest included."""
    from shard_server import engine as engine_module
    from shard_server.types import AnyOf, Condition, Filter

    catalogue = synthetic.SyntheticCatalogue(dim=32, clusters=20, seed=11)
    engine = ShardEngine(ShardConfig(data_dir=tmp_path, dimension=32))
    engine.load()
    records = [r for c in range(60) for r in catalogue.records(c * 15, (c + 1) * 15, category=f"cat-{c:02d}")]
    # a few products span categories, so distinct products collapse across them
    records = [r if i % 7 else replace(r, product_id="shared") for i, r in enumerate(records)]
    engine.upsert(records)
    engine.delete([r.image_id for r in records[::5]])
    engine.upsert([replace(r, category="cat-00") for r in records[1:40:3]])  # moved
    queries = catalogue.queries(20)
    brands = Filter(all_of=(Condition(field="brand", predicate=AnyOf(values=frozenset({"brand-01", "brand-03"}))),))
    every_third = tuple(f"cat-{c:02d}" for c in range(0, 60, 3))
    variants = [{"top_k": 10}, {"top_k": 1}, {"top_k": 100}, {"top_k": 10, "distinct_products": True},
                {"top_k": 10, "filter": brands}, {"top_k": 5, "categories": every_third}]

    def answers(threshold: int) -> list:
        monkeypatch.setattr(engine_module, "MANY_PARTITIONS", threshold)
        return [[(h.image_id, h.category, round(h.score, 5), h.attributes) for h in
                 engine.search(SearchQuery(vector=q, **variant)).hits] for q in queries for variant in variants]

    one_pass, two_phase = answers(10**9), answers(1)
    assert two_phase == one_pass
    assert sum(map(len, one_pass)) > 0
    # The second read leaves out a row deleted after the first.
    partition = engine.partitions["cat-01"]
    hits = partition.search(queries[0], 3, Filter(), 1, False, with_details=False)
    engine.delete([partition.live_details(hits.rows[:1])[0][0]])
    assert partition.live_details(hits.rows)[0] is None and None not in partition.live_details(hits.rows)[1:]
    engine.close()


def test_an_image_rewritten_between_the_two_reads_of_a_many_category_search_is_still_answered(tmp_path,
                                                                                               monkeypatch):
    """A re-ingest (new attributes) between the rows' search and their details left the image out: its old row
    was dead by then. Such a search is answered by the one-pass search instead."""
    from shard_server.partition import Partition

    catalogue = synthetic.SyntheticCatalogue(dim=32, clusters=20, seed=12)
    engine = ShardEngine(ShardConfig(data_dir=tmp_path, dimension=32))
    engine.load()
    engine.upsert([r for c in range(10) for r in catalogue.records(c * 10, (c + 1) * 10, category=f"cat-{c}")])
    query = catalogue.queries(1)[0]
    top = engine.search(SearchQuery(vector=query, top_k=5)).hits[0]
    [record] = engine.get([top.image_id])
    original = Partition.live_details
    rewritten = []

    def rewrite_first(partition, rows):
        if not rewritten:
            rewritten.append(True)
            engine.upsert([replace(record, attributes={**record.attributes, "brand": "new-brand"})])
        return original(partition, rows)

    monkeypatch.setattr(Partition, "live_details", rewrite_first)
    hits = engine.search(SearchQuery(vector=query, top_k=5)).hits
    assert rewritten and hits[0].image_id == top.image_id and hits[0].attributes["brand"] == "new-brand"
    engine.close()


def test_equal_scores_are_ranked_by_image_id_whatever_the_row_or_category_order(tmp_path):
    """Ties were broken by row position and category order: two replicas that applied the same writes in another
    order answered the same search differently (identical searches alternated between them), and categories
    [A, C] and [C, A] gave different answers (review of 2026-12-05). Equal scores now rank by image id in the
    partition, the shard and the broker's merge."""
    import numpy as np

    from shard_server.types import Record

    rng = np.random.default_rng(5)
    same = rng.standard_normal(DIM).astype(np.float32)
    others = rng.standard_normal((30, DIM)).astype(np.float32)

    def records(ids, category):
        return [Record(image_id=i, product_id="p-" + i, category=category, vector=same) for i in ids]

    answers = []
    for n, order in enumerate((["dup0", "dup1", "dup2", "dup3"], ["dup3", "dup2", "dup1", "dup0"])):
        engine = ShardEngine(ShardConfig(data_dir=tmp_path / f"replica{n}", dimension=DIM))
        engine.load()
        try:
            filler = [Record(image_id=f"o{i}", product_id=f"o{i}", category="A", vector=v) for i, v in enumerate(others)]
            engine.upsert(filler[:15] + records(order[:2], "A") + filler[15:] + records(order[2:], "A"))
            engine.upsert(records(["dupC"], "C"))
            for categories in (("A",), ("A", "C"), ("C", "A")):
                for distinct in (False, True):
                    query = SearchQuery(vector=same, top_k=2, categories=categories, distinct_products=distinct)
                    answers.append((categories, distinct, [h.image_id for h in engine.search(query).hits]))
        finally:
            engine.close()
    first, second = answers[: len(answers) // 2], answers[len(answers) // 2:]
    assert first == second
    assert {tuple(ids) for categories, _, ids in first if categories != ("A",)} == {("dup0", "dup1")}

    # a search over 8 or more categories reads the best hits in rounds: a tie cut by a round's end was cut in
    # category order (review of the change)
    engine = ShardEngine(ShardConfig(data_dir=tmp_path / "many", dimension=DIM))
    engine.load()
    try:
        engine.upsert([Record(image_id=f"id{i:02d}", product_id=f"p{i}", category=f"c{i:02d}", vector=same)
                       for i in range(40)])
        categories = tuple(f"c{i:02d}" for i in range(40))
        for order in (categories, categories[::-1]):
            hits = engine.search(SearchQuery(vector=same, top_k=2, categories=order)).hits
            assert [h.image_id for h in hits] == ["id00", "id01"]
    finally:
        engine.close()

    def hit(image, category, score):
        return Hit(image_id=image, product_id="p-" + image, category=category, score=score)

    shard_a, shard_c = [hit("b", "A", 0.5), hit("z", "A", 0.4)], [hit("a", "C", 0.5), hit("y", "C", 0.5000000001)]
    assert [h.image_id for h in merge_top_k([shard_a, shard_c], 3)] == ["a", "b", "y"]
    assert [h.image_id for h in merge_top_k([shard_c, shard_a], 3)] == ["a", "b", "y"]


def test_a_distinct_search_takes_a_tie_at_its_cut_in_one_step(tmp_path, monkeypatch):
    """Thousands of copies of one picture (a placeholder) under one product: a distinct-products search widened
    its window x4 at a time, ranking the whole tie by image id at every step (50k copies: 20 -> 320 ms, reviews of
    2026-12-05), also when a better row sat above the tie. The next window now takes the tie whole."""
    import numpy as np

    from shard_server.types import Record

    rng = np.random.default_rng(11)
    copy = rng.standard_normal(DIM).astype(np.float32)
    copy /= np.linalg.norm(copy)
    above = copy + 0.01 * rng.standard_normal(DIM).astype(np.float32)
    records = [Record(image_id=f"copy{i:05d}", product_id="placeholder", category="c", vector=copy)
               for i in range(5000)]
    records += [Record(image_id="better", product_id="A", category="c", vector=above)]
    records += [Record(image_id=f"r{i}", product_id=f"p{i}", category="c", vector=v)
                for i, v in enumerate(rng.standard_normal((500, DIM)).astype(np.float32))]
    engine = ShardEngine(ShardConfig(data_dir=tmp_path / "ties", dimension=DIM))
    engine.load()
    calls = []
    original = Partition._top_k_of
    monkeypatch.setattr(Partition, "_top_k_of", lambda self, rows, scores, k, **kw: (
        calls.append(k), original(self, rows, scores, k, **kw))[1])
    try:
        for start in range(0, len(records), 2000):
            engine.upsert(records[start:start + 2000])
        for query in (copy, above):
            calls.clear()
            hits = engine.search(SearchQuery(vector=query, top_k=3, distinct_products=True,
                                             exactness=Exactness.EXACT)).hits
            assert {"placeholder", "A"} <= {h.product_id for h in hits} and len(hits) == 3
            assert len(calls) <= 2, calls  # one window, then the tie whole
    finally:
        engine.close()
