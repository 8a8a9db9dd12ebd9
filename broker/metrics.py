"""Prometheus metrics of the broker (names fixed by the ops contract; labels: bounded enums, shard names)."""

from prometheus_client import Counter, Gauge, Histogram

from imgsearch.serving import LATENCY_BUCKETS_S

STAGES = ("decode_hash", "cache", "embed", "fanout", "merge", "total")

STAGE_SECONDS = Histogram(
    "imgsearch_broker_stage_duration_seconds",
    "Wall time of each stage of a broker search.",
    ["stage"],
    buckets=LATENCY_BUCKETS_S,
)
CACHE_LOOKUPS = Counter(
    "imgsearch_broker_cache_lookups_total",
    "Duplicate-cache lookups by result (hit, near_hit, miss, error; out_of_time: cut short by the search's own "
    "deadline).",
    ["result"],
)
CACHE_STALE_ENTRIES = Counter(
    "imgsearch_broker_cache_stale_entries_total",
    "Duplicate-cache entries that the owning shard no longer holds as cached (the image deleted, re-ingested or "
    "moved there while the cache write was lost): left out of the answer and removed from the cache.",
)
PENDING_REMOVALS = Gauge(
    "imgsearch_broker_pending_removals",
    "Stale-copy removals a shard replica missed (it was down while an image moved off its shard), waiting to be "
    "sent again (broker/removal_hints.py).",
)
UNSAVED_REMOVALS = Gauge(
    "imgsearch_broker_unsaved_removals",
    "Pending stale-copy removals not yet saved to the Redis journal (Redis was down): a broker that stops now loses "
    "them (broker/hint_journal.py).",
)
REMOVAL_HINTS_DROPPED = Counter(
    "imgsearch_broker_removal_hints_dropped_total",
    "Stale-copy removals not kept for a later retry because too many were pending already (a copy of a moved "
    "image may stay on its old shard until the id is written again).",
)
STALE_COPY_REMOVALS_FAILED = Counter(
    "imgsearch_broker_stale_copy_removals_failed_total",
    "Ingests that could not remove re-ingested image ids from a shard that no longer owns their category (a copy "
    "may stay there until the id is re-ingested again).",
)
SHARD_REQUESTS = Counter(
    "imgsearch_broker_shard_requests_total",
    "Shard searches by configured shard name and outcome (ok, timeout, unavailable, error).",
    ["shard", "outcome"],
)
SHARD_CALL_SEARCHES = Histogram(
    "imgsearch_broker_shard_call_searches",
    "Searches carried by one call to a shard replica (more than 1: searches queued behind a call in flight went "
    "out together as one SearchBatch, broker.coalesce).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
PARTIAL_RESULTS = Counter(
    "imgsearch_broker_partial_results_total",
    "Searches answered without at least one shard that should have answered.",
)
CACHE_REPAIR_PENDING = Gauge(
    "imgsearch_broker_cache_repair_pending",
    "Duplicate-cache writes (upserts or deletes) that failed and wait for the repair loop.",
)
CACHE_REPAIR_DROPPED = Counter(
    "imgsearch_broker_cache_repair_dropped_total",
    "Failed duplicate-cache writes not kept for the repair loop because too many were pending (Redis down for "
    "long): each costs a cache miss later, or an entry found stale when it would answer.",
)
CACHE_LOOKUPS_SAMPLED = Counter(
    "imgsearch_broker_cache_lookups_sampled_total",
    "Duplicate-cache lookups whose candidate sets were too big to read whole, so a sample was read (a near "
    "duplicate may have been missed; the search then goes to the index).",
)
SEARCHES = Counter(
    "imgsearch_broker_searches_total",
    "Answered searches by where the answer came from (cache, index) and what the query was (image, vector, "
    "image_id: a catalogue image's stored embedding).",
    ["source", "query"],
)
EMBED_REFUSED = Counter(
    "imgsearch_broker_embed_refused_total",
    "Embedding requests refused at once because the model could not do them within their deadline (load "
    "shedding: the caller gets RESOURCE_EXHAUSTED), by the work refused: search or ingest.",
    ["work"],
)
SHARDS_UNREACHABLE = Gauge(
    "imgsearch_broker_shards_unreachable",
    "Shards of the shard map none of whose replicas answers its health check, as this broker last checked "
    "(at start-up, then every few seconds while it serves): their categories' searches are partial.",
)

for _stage in STAGES:
    STAGE_SECONDS.labels(_stage)
for _result in ("hit", "near_hit", "miss", "error", "out_of_time"):
    CACHE_LOOKUPS.labels(_result)
for _source, _query in (("cache", "image"), ("index", "image"), ("index", "vector"), ("index", "image_id")):
    SEARCHES.labels(_source, _query)
for _work in ("search", "ingest"):
    EMBED_REFUSED.labels(_work)
