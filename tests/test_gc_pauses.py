"""Garbage-collector pauses: the pause metric counts every collection."""

import gc

from prometheus_client import CollectorRegistry

from imgsearch.gc_pauses import GC_PAUSE_BUCKETS_S, GcPauseCollector, install_gc_pause_metric


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
