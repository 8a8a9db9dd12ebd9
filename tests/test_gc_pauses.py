"""Garbage-collector pauses: what a shard keeps per row stays out of the collector's walk, the pause metric
counts every collection, and the services freeze their start-up objects."""

import gc
import os
import subprocess
import sys
import types

import pytest
from prometheus_client import CollectorRegistry

from imgsearch.gc_pauses import GC_PAUSE_BUCKETS_S, GcPauseCollector, install_gc_pause_metric
from shard_server import synthetic
from shard_server.columns import StringColumn
from shard_server.config import ShardConfig
from shard_server.engine import ShardEngine
from shard_server.types import SearchQuery

DIM = 32
ROWS = 6000


def _tracked_containers_reachable_from(root, *, at_least: int) -> list[tuple[str, int]]:
    """Containers the collector would walk item by item (tracked ones) reachable from `root`, with at least
    `at_least` items: what makes a full collection grow with the catalogue. Classes, modules and functions are
    not followed: through them everything in the interpreter is reachable."""
    shared = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType,
              types.FrameType)
    seen: set[int] = set()
    stack = [root]
    big = []
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if not gc.is_tracked(obj) or isinstance(obj, shared):
            continue  # the collector does not walk it (or it is not the engine's own data)
        if isinstance(obj, (list, dict, set, tuple)) and len(obj) >= at_least:
            big.append((type(obj).__name__, len(obj)))
        stack.extend(gc.get_referents(obj))
    return big


def test_no_per_row_container_of_a_shard_is_walked_by_the_collector(tmp_path):
    """Two 1M-row lists of ids cost a shard 55-65 ms per full collection (gc callback in a 1M comparison);
    with StringColumn nothing reachable from the engine grows with its rows in the collector's view."""
    config = ShardConfig(data_dir=tmp_path / "data", dimension=DIM, nlist=16, index_factory="IVF{nlist},PQ8x4fs",
                         train_threads=1)
    engine = ShardEngine(config)
    engine.load()
    catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=30, seed=3)
    try:
        for start in range(0, ROWS, 1000):
            engine.upsert(catalogue.records(start, start + 1000, category="c"))
        assert engine.train_pending() == 1  # an IVF index, as in production
        engine.snapshot()
        result = engine.search(SearchQuery(vector=catalogue.queries(1)[0], top_k=5))
        assert [h.image_id for h in result.hits] and all(h.image_id.startswith("img-") for h in result.hits)
        assert _tracked_containers_reachable_from(engine, at_least=ROWS) == []
        [partition] = engine.partitions.values()
        assert isinstance(partition.image_ids, StringColumn) and isinstance(partition.product_ids, StringColumn)
        assert len(partition.image_ids) == ROWS and partition.image_ids[ROWS - 1] == synthetic.image_id(ROWS - 1)
    finally:
        engine.close()

    # The same after a restart from the snapshot.
    reloaded = ShardEngine(config)
    reloaded.load()
    try:
        [partition] = reloaded.partitions.values()
        assert isinstance(partition.image_ids, StringColumn)
        assert partition.image_ids.tolist() == [synthetic.image_id(i) for i in range(ROWS)]
        assert _tracked_containers_reachable_from(reloaded, at_least=ROWS) == []
        assert len(reloaded.id_map) == ROWS
    finally:
        reloaded.close()


def test_string_column_keeps_strings_one_per_cell():
    column = StringColumn(["a", "bb"])
    column.extend(["ccc"] * 40)  # past the initial capacity
    column.extend([])
    assert len(column) == 42 and column[0] == "a" and column[-1] == "ccc" and column.tolist()[:2] == ["a", "bb"]
    assert not gc.is_tracked(column.view)
    with pytest.raises(IndexError):
        column[42]


def test_pause_metric_counts_every_collection_by_generation():
    registry = CollectorRegistry()
    collector = GcPauseCollector()
    registry.register(collector)
    gc.callbacks.append(collector.callback)
    try:
        gc.collect()
        gc.collect(0)
    finally:
        gc.callbacks.remove(collector.callback)

    def value(name, **labels):
        return registry.get_sample_value(name, labels)

    assert value("imgsearch_gc_pause_seconds_count", generation="2") >= 1
    assert value("imgsearch_gc_pause_seconds_count", generation="0") >= 1
    assert value("imgsearch_gc_pause_seconds_sum", generation="2") > 0
    buckets = [value("imgsearch_gc_pause_seconds_bucket", generation="2", le=repr(b)) for b in GC_PAUSE_BUCKETS_S]
    assert buckets == sorted(buckets)  # cumulative
    assert value("imgsearch_gc_pause_seconds_bucket", generation="2", le="+Inf") == value(
        "imgsearch_gc_pause_seconds_count", generation="2")
    assert value("imgsearch_gc_frozen_objects") == gc.get_freeze_count()


def test_install_hooks_once_per_process():
    first = install_gc_pause_metric()
    assert install_gc_pause_metric() is first
    assert gc.callbacks.count(first.callback) == 1


@pytest.mark.parametrize("module", ["broker.server", "shard_server.server"])
def test_services_freeze_their_start_up_objects(module, tmp_path):
    """main() freezes before serving: run it with the event loop replaced by a probe that reports the freeze."""
    shard_map = tmp_path / "shard-map.json"
    shard_map.write_text('{"shards": {"s": ["127.0.0.1:1"]}, "categories": {"c": "s"}}')
    probe = (
        "import gc, sys\n"
        f"import {module} as service\n"
        "def probe(coro, **kw):\n"
        "    coro.close()\n"
        "    print(gc.get_freeze_count(), len(gc.get_objects()))\n"
        "service.run_event_loop = probe\n"
        "try:\n"
        "    service.main([])\n"
        "except SystemExit:\n"
        "    pass\n"
    )
    env = {**os.environ, "IMGSEARCH_SHARD_DATA_DIR": str(tmp_path / "shard"), "IMGSEARCH_SHARD_MAP": str(shard_map)}
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120,
                         check=True)
    out = run.stdout.split()
    assert len(out) == 2, run.stdout + run.stderr
    frozen, still_tracked = int(out[0]), int(out[1])
    assert frozen > 10_000, out  # modules, classes, functions of everything imported
    assert still_tracked < frozen // 10, out


def test_full_collections_are_read_back_from_a_services_metrics_endpoint():
    """The reading the stall probe and the comparison take: over HTTP, from a real /metrics endpoint."""
    from imgsearch.gc_pauses import FullCollections, scrape_full_collections
    from imgsearch.ports import free_port
    from imgsearch.serving import start_metrics_endpoint

    install_gc_pause_metric()
    port = start_metrics_endpoint("127.0.0.1", free_port())
    before = scrape_full_collections(port)
    gc.collect()
    gc.collect()
    during = scrape_full_collections(port).since(before)
    assert during.count == 2 and during.total_s > 0
    assert during.longest_at_most_s is not None and during.longest_at_most_s >= during.total_s / 2
    assert during.describe().startswith("2 full GCs")
    assert (during + during).count == 4 and (FullCollections() + during).buckets == during.buckets
    assert scrape_full_collections(None) == FullCollections() and FullCollections().describe() == "0 full GCs"


def test_a_collection_past_the_largest_bucket_is_reported_as_such():
    from imgsearch.gc_pauses import FullCollections

    bounds = [*GC_PAUSE_BUCKETS_S, float("inf")]
    slow = FullCollections(count=1, total_s=0.4, buckets=tuple((b, 1 if b == float("inf") else 0) for b in bounds))
    assert slow.describe() == "1 full GCs (400 ms in all), longest > 250 ms"
    assert slow.as_dict() == {"count": 1, "total_ms": 400.0, "longest_at_most_ms": None}
