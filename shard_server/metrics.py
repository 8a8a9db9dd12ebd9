"""Prometheus metrics of the shard server (names fixed by the project's metric contract)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from imgsearch.serving import LATENCY_BUCKETS_S

SEARCH_DURATION = Histogram(
    "imgsearch_shard_search_duration_seconds", "Time to search one partition, by strategy.", ["strategy"],
    buckets=LATENCY_BUCKETS_S)
CANDIDATES_SCANNED = Histogram(
    "imgsearch_shard_candidates_scanned", "Vectors whose distance was computed per search (codes + re-rank).",
    buckets=(10, 100, 1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000, 3_000_000, 10_000_000))
VECTORS = Gauge("imgsearch_shard_vectors", "Live vectors per category.", ["category"])
INDEX_TRAINED = Gauge("imgsearch_shard_index_trained", "1 when the category is served by IVF-PQ.", ["category"])
TRAINING_EVENTS = Counter("imgsearch_shard_training_events_total", "Background training events.", ["event"])
INDEX_SWAPS = Counter("imgsearch_shard_index_swaps_total", "Trained indexes swapped in.")
WAL_BYTES = Gauge("imgsearch_shard_wal_bytes", "Size of the write-ahead log on disk.")
SNAPSHOTS = Counter("imgsearch_shard_snapshots_total", "Snapshots written.")
RESIDENT_BYTES = Gauge("imgsearch_shard_resident_bytes",
                       "Bytes held in memory by indexes, ids and attributes (memory-mapped vectors excluded).")

STRATEGIES = ("exact", "ivf", "ivf_wide")
for _s in STRATEGIES:
    SEARCH_DURATION.labels(_s)
for _e in ("started", "completed", "failed"):
    TRAINING_EVENTS.labels(_e)
