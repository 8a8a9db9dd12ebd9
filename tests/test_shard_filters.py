"""Filtered recall@10 at 50 %, 10 %, 1 % and 0.1 % selectivity with filters unrelated to the clusters, the
strategy chosen for each, and deletes/upserts never leaking stale rows."""

import numpy as np
import pytest

from shard_server import synthetic
from shard_server.config import ShardConfig
from shard_server.engine import ShardEngine
from shard_server.types import AnyOf, Condition, Filter, Range, SearchQuery

DIM, N, QUERIES, K = 128, 20_000, 60, 10


@pytest.fixture(scope="module")
def catalogue():
    return synthetic.SyntheticCatalogue(dim=DIM, clusters=100, seed=11)


def trained_engine(data_dir, catalogue, *, nlist: int) -> ShardEngine:
    # A low exact-scan limit so that this small partition exercises all three strategies.
    config = ShardConfig(data_dir=data_dir, dimension=DIM, nlist=nlist, index_factory="IVF{nlist},PQ32x4fs",
                         exact_scan_max_rows=300, train_threads=1)
    engine = ShardEngine(config)
    engine.load()
    for lo in range(0, N, 5000):
        engine.upsert(catalogue.records(lo, lo + 5000))
    assert engine.train_pending() == 1
    return engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory, catalogue):
    engine = trained_engine(tmp_path_factory.mktemp("filters"), catalogue, nlist=64)
    yield engine
    engine.close()


@pytest.mark.parametrize(("selectivity", "strategy"), [
    (0.95, "ivf"), (0.5, "ivf_wide"), (0.1, "ivf_wide"), (0.01, "exact"), (0.001, "exact")])
def test_filtered_recall(engine, catalogue, selectivity, strategy):
    flt = synthetic.selectivity_filter(selectivity)
    attributes = catalogue.attributes(0, N)
    mask = np.array([synthetic.matches(a, flt) for a in attributes])
    assert abs(mask.mean() - selectivity) < 0.3 * selectivity + 0.0005
    queries = catalogue.queries(QUERIES)
    truth = synthetic.brute_force_top_k(catalogue.vectors(0, N), queries, K, mask)
    found = []
    for q in queries:
        result = engine.search(SearchQuery(vector=q, top_k=K, filter=flt))
        ids = [h.image_id for h in result.hits]
        assert all(synthetic.matches(h.attributes, flt) for h in result.hits)
        assert len(ids) == min(K, int(mask.sum())), "filtered search returned padding instead of K hits"
        found.append(ids)
    recall = synthetic.recall_at_k(found, truth, K)
    assert recall >= 0.95, f"recall@{K} {recall:.3f} at selectivity {selectivity}"
    partition = engine.partitions["default"]
    hits = partition.search(engine.validate_query(SearchQuery(vector=queries[0], top_k=K)), K, flt,
                            engine.config.nprobe, False)
    assert hits.strategy == strategy


@pytest.fixture(scope="module")
def many_lists_engine(tmp_path_factory, catalogue):
    # Many small lists (about 80 vectors each), like a large partition: a few probed lists hold few neighbours.
    engine = trained_engine(tmp_path_factory.mktemp("filters-many-lists"), catalogue, nlist=256)
    yield engine
    engine.close()


@pytest.mark.parametrize("selectivity", [0.5, 0.1])
def test_filtered_recall_with_a_low_query_nprobe(many_lists_engine, catalogue, selectivity):
    engine = many_lists_engine
    """A query asking for nprobe=1 (a benchmark sweep, or a caller trading recall for speed) still gets filtered
    recall: the widened probe count starts from at least the configured nprobe, because the filtered top-k lie
    farther out than the unfiltered top-k that a low nprobe was tuned for."""
    flt = synthetic.selectivity_filter(selectivity)
    mask = np.array([synthetic.matches(a, flt) for a in catalogue.attributes(0, N)])
    queries = catalogue.queries(QUERIES)
    truth = synthetic.brute_force_top_k(catalogue.vectors(0, N), queries, K, mask)
    found = [[h.image_id for h in engine.search(SearchQuery(vector=q, top_k=K, filter=flt, nprobe=1)).hits]
             for q in queries]
    recall = synthetic.recall_at_k(found, truth, K)
    assert recall >= 0.95, f"recall@{K} {recall:.3f} at selectivity {selectivity} with nprobe=1"


def test_text_and_flag_filters(engine, catalogue):
    flt = synthetic.mixed_filter()
    q = catalogue.queries(1)[0]
    result = engine.search(SearchQuery(vector=q, top_k=K, filter=flt))
    assert len(result.hits) == K
    assert all(h.attributes["colour"] == "colour-3" and h.attributes["in_stock"] for h in result.hits)
    any_of = Filter(all_of=(Condition(field="brand", predicate=AnyOf(values=frozenset({"brand-01", "brand-02"}))),
                            Condition(field="price", predicate=Range(min=10.0, max=20.0))))
    result = engine.search(SearchQuery(vector=q, top_k=K, filter=any_of))
    assert len(result.hits) == K
    assert all(h.attributes["brand"] in {"brand-01", "brand-02"} and 10 <= h.attributes["price"] <= 20
               for h in result.hits)
    none = Filter(all_of=(Condition(field="brand", predicate=AnyOf(values=frozenset({"no-brand"}))),))
    assert engine.search(SearchQuery(vector=q, top_k=K, filter=none)).hits == ()


def test_filters_of_many_values_are_answered_but_not_kept_in_the_mask_cache(engine, catalogue):
    """The mask cache is bounded by entries: big filters as keys took a shard to 2.2 GB."""
    from shard_server.partition import MASK_CACHE_MAX_FILTER_VALUES

    q = catalogue.queries(1)[0]
    brands = frozenset({"brand-01"} | {f"missing-{i}" for i in range(MASK_CACHE_MAX_FILTER_VALUES)})
    big = Filter(all_of=(Condition(field="brand", predicate=AnyOf(values=brands)),))
    small = Filter(all_of=(Condition(field="brand", predicate=AnyOf(values=frozenset({"brand-01"}))),))
    found = [engine.search(SearchQuery(vector=q, top_k=K, filter=flt)).hits for flt in (big, small)]
    assert [h.image_id for h in found[0]] == [h.image_id for h in found[1]]
    assert all(h.attributes["brand"] == "brand-01" for h in found[0])
    keys = [flt for partition in engine.partitions.values() for flt, _ in partition._masks]
    assert small in keys and big not in keys


def test_deletes_and_upserts_replace(tmp_path, catalogue):
    config = ShardConfig(data_dir=tmp_path, dimension=DIM, nlist=16, index_factory="IVF{nlist},PQ32x4fs",
                         train_threads=1)
    engine = ShardEngine(config)
    engine.load()
    try:
        engine.upsert(catalogue.records(0, 2000))
        assert engine.train_pending() == 1
        vectors = catalogue.vectors(0, 2000)
        victim = synthetic.image_id(5)
        assert engine.search(SearchQuery(vector=vectors[5], top_k=1)).hits[0].image_id == victim
        assert engine.delete([victim, "never-existed"]) == 1
        assert engine.delete([victim]) == 0
        for flt in (Filter(), synthetic.selectivity_filter(1.0), synthetic.selectivity_filter(0.01)):
            hits = engine.search(SearchQuery(vector=vectors[5], top_k=50, filter=flt)).hits
            assert victim not in {h.image_id for h in hits}
        # Upsert of an existing id replaces it, here moving it to another category with a new vector.
        moved = catalogue.records(7, 8)[0]
        new_vector = catalogue.vectors(9, 10)[0] * -1.0
        from dataclasses import replace
        engine.upsert([replace(moved, category="other", vector=new_vector, attributes={"colour": "red"})])
        hits = engine.search(SearchQuery(vector=vectors[7], top_k=20, categories=("default",))).hits
        assert moved.image_id not in {h.image_id for h in hits}
        hit = engine.search(SearchQuery(vector=new_vector, top_k=1)).hits[0]
        assert (hit.image_id, hit.category, hit.attributes) == (moved.image_id, "other", {"colour": "red"})
        assert {c.category: c.vectors for c in engine.stats().categories} == {"default": 1998, "other": 1}
    finally:
        engine.close()


def test_attribute_rows_leave_out_absent_values():
    from shard_server.attributes import AttributeColumns

    columns = AttributeColumns({"brand": "text", "price": "number", "in_stock": "flag"})
    columns.append([{"brand": "acme", "price": 2.5, "in_stock": True}, {}, {"brand": "zeta", "in_stock": False},
                    {"price": 0.0}])
    assert columns.rows([3, 0, 2, 1]) == [
        {"price": 0.0}, {"brand": "acme", "price": 2.5, "in_stock": True}, {"brand": "zeta", "in_stock": False}, {}]
    assert columns.rows([]) == []
    assert type(columns.rows([0])[0]["price"]) is float and type(columns.rows([0])[0]["in_stock"]) is bool


def test_a_predicate_of_the_wrong_kind_says_what_the_field_takes():
    """`--filter price=5` was refused with only "predicate equals needs a text field" (API probe of 2026-12-05)."""
    from shard_server.attributes import validate_filter
    from shard_server.errors import InvalidRequestError
    from shard_server.types import Equals, Is

    schema = {"brand": "text", "price": "number", "in_stock": "flag"}
    for condition, says in ((Condition(field="price", predicate=Equals(value="5")), "with a range"),
                            (Condition(field="in_stock", predicate=Equals(value="maybe")), "with true or false"),
                            (Condition(field="brand", predicate=Is(value=True)), "with a value or any of several")):
        with pytest.raises(InvalidRequestError, match=says):
            validate_filter(Filter(all_of=(condition,)), schema)
