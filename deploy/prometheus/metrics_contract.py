"""The metric names imgsearch's services export (the ops contract), for checking rules and dashboards.

Rules and dashboards may only use these, Triton's own ``nv_*`` series, Prometheus's ``up``, the process
collector's start time and the few redis_exporter series named below; a typo in a
metric name would otherwise give an alert that can never fire or an empty panel.
"""

from __future__ import annotations

import re

# name -> Prometheus type, as the services declare them.
CONTRACT_METRICS: dict[str, str] = {
    "grpc_server_started_total": "counter",
    "grpc_server_handled_total": "counter",
    "grpc_server_handling_seconds": "histogram",
    "imgsearch_build_info": "gauge",
    "imgsearch_event_loop_lag_seconds": "histogram",
    "imgsearch_gc_pause_seconds": "histogram",
    "imgsearch_gc_frozen_objects": "gauge",
    "imgsearch_broker_stage_duration_seconds": "histogram",
    "imgsearch_broker_cache_lookups_total": "counter",
    "imgsearch_broker_cache_lookups_sampled_total": "counter",
    "imgsearch_broker_shard_requests_total": "counter",
    "imgsearch_broker_shard_call_searches": "histogram",
    "imgsearch_broker_partial_results_total": "counter",
    "imgsearch_broker_cache_repair_pending": "gauge",
    "imgsearch_broker_cache_repair_dropped_total": "counter",
    "imgsearch_broker_cache_stale_entries_total": "counter",
    "imgsearch_broker_pending_removals": "gauge",
    "imgsearch_broker_unsaved_removals": "gauge",
    "imgsearch_broker_removal_hints_dropped_total": "counter",
    "imgsearch_broker_stale_copy_removals_failed_total": "counter",
    "imgsearch_broker_searches_total": "counter",
    "imgsearch_broker_embed_refused_total": "counter",
    "imgsearch_broker_shards_unreachable": "gauge",
    "imgsearch_shard_partition_search_duration_seconds": "histogram",
    "imgsearch_shard_candidates_scanned": "histogram",
    "imgsearch_shard_vectors": "gauge",
    "imgsearch_shard_categories": "gauge",
    "imgsearch_shard_categories_untrained": "gauge",
    "imgsearch_shard_training_events_total": "counter",
    "imgsearch_shard_index_swaps_total": "counter",
    "imgsearch_shard_compactions_total": "counter",
    "imgsearch_shard_wal_bytes": "gauge",
    "imgsearch_shard_snapshots_total": "counter",
    "imgsearch_shard_resident_bytes": "gauge",
}
# The labels each metric declares (a test checks them against the services' registry).
CONTRACT_LABELS: dict[str, tuple[str, ...]] = {
    "grpc_server_started_total": ("grpc_type", "grpc_service", "grpc_method"),
    "grpc_server_handled_total": ("grpc_type", "grpc_service", "grpc_method", "grpc_code"),
    "grpc_server_handling_seconds": ("grpc_type", "grpc_service", "grpc_method"),
    "imgsearch_build_info": ("component", "version"),
    "imgsearch_gc_pause_seconds": ("generation",),
    "imgsearch_broker_stage_duration_seconds": ("stage",),
    "imgsearch_broker_cache_lookups_total": ("result",),
    "imgsearch_broker_shard_requests_total": ("shard", "outcome"),
    "imgsearch_broker_searches_total": ("source", "query"),
    "imgsearch_broker_embed_refused_total": ("work",),
    "imgsearch_shard_partition_search_duration_seconds": ("strategy",),
    "imgsearch_shard_training_events_total": ("event",),
    "imgsearch_shard_compactions_total": ("event",),
}
# Labels every scraped series gets from its target (Prometheus and the ServiceMonitors); shard series also get
# `shard` (deploy/README.md, Observability).
TARGET_LABELS = frozenset({"namespace", "instance", "job", "pod", "service", "container", "endpoint"})
# The values of the bounded labels: an equality selector on any other value matches nothing (a test checks them
# against the code).
LABEL_VALUES: dict[str, frozenset[str]] = {
    "stage": frozenset({"decode_hash", "cache", "embed", "fanout", "merge", "total"}),
    "result": frozenset({"hit", "near_hit", "miss", "error", "out_of_time"}),
    "outcome": frozenset({"ok", "timeout", "unavailable", "error"}),
    "source": frozenset({"cache", "index"}),
    "query": frozenset({"image", "vector", "image_id"}),
    "strategy": frozenset({"exact", "ivf", "ivf_wide"}),
    "event": frozenset({"started", "completed", "failed"}),
    "work": frozenset({"search", "ingest"}),
}
# Triton's metrics used by rules and dashboards (names of Triton 2.4x-2.5x).
TRITON_METRICS = {
    "nv_inference_request_success",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
}
PROMETHEUS_METRICS = {"up"}
# prometheus_client's process collector (broker and shards, default registry): restarts.
PROCESS_METRICS = {"process_start_time_seconds"}
# redis_exporter's (imgsearch-redis, imgsearch-redis-journal).
REDIS_METRICS = {"redis_evicted_keys_total"}

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^}]*\}|\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.$])([a-zA-Z_:][\w:]*)\b(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Series names an expression selects (suffixes _bucket/_sum/_count folded onto histograms)."""
    bare = _GROUPING.sub(" ", _MATCHERS.sub(" ", _STRINGS.sub(" ", expr)))
    found = set()
    for name in _IDENT.findall(bare):
        if name.lower() in _KEYWORDS:
            continue
        for suffix in ("_bucket", "_sum", "_count"):
            base = name.removesuffix(suffix)
            if base != name and CONTRACT_METRICS.get(base) == "histogram":
                name = base
        found.add(name)
    return found


def bare_histograms(expr: str) -> set[str]:
    """Histograms selected by their bare name, which selects no series: only _bucket, _sum and _count exist."""
    bare = _GROUPING.sub(" ", _MATCHERS.sub(" ", _STRINGS.sub(" ", expr)))
    return {name for name in _IDENT.findall(bare) if CONTRACT_METRICS.get(name) == "histogram"}


def unknown_metrics(expr: str, recorded: set[str] = frozenset()) -> set[str]:
    """Names in `expr` that select nothing: nobody exports them (`recorded`: names of recording rules, which are
    fine), or they are a histogram's bare name."""
    unknown = (metric_names(expr) - set(CONTRACT_METRICS) - TRITON_METRICS - PROMETHEUS_METRICS - PROCESS_METRICS
               - REDIS_METRICS - set(recorded))
    return unknown | {f"{name} (a histogram: use _bucket, _sum or _count)" for name in bare_histograms(expr)}


_GROUPING_LABELS = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def unknown_labels(expr: str) -> set[str]:
    """Labels `expr` groups or selects by that none of its series carries, and values of bounded labels that no
    series has (`stage="totl"`): either selects nothing. Expressions on series outside the contract (Triton's,
    recording rules) are not judged."""
    names = metric_names(expr)
    if not names or not names <= set(CONTRACT_METRICS):
        return set()
    allowed = set(TARGET_LABELS) | {label for name in names for label in CONTRACT_LABELS.get(name, ())}
    if any(name.startswith(("imgsearch_shard_", "grpc_server_")) for name in names):
        allowed.add("shard")
    if "_bucket" in expr:
        allowed.add("le")
    unknown = set()
    for grouping in _GROUPING_LABELS.findall(_STRINGS.sub(" ", expr)):
        unknown |= {label for label in map(str.strip, grouping.split(",")) if label and label not in allowed}
    for selector in re.findall(r"\{([^}]*)\}", expr):
        for label, op, value in _MATCHER.findall(selector):
            if label == "__name__":
                continue
            if label not in allowed:
                unknown.add(label)
            elif op == "=" and label in LABEL_VALUES and "$" not in value and value not in LABEL_VALUES[label]:
                unknown.add(f'{label}="{value}"')
    return unknown
