"""Writes deploy/grafana/imgsearch.json, the Grafana dashboard of imgsearch.

The JSON is generated so that every panel follows the same conventions (datasource variable, namespace filter,
$__rate_interval, units); edit this file and run ``python deploy/grafana/build_dashboard.py``.
tests/test_prometheus_stack.py runs every query of the dashboard against a real Prometheus scraping a real
stack.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).with_name("imgsearch.json")
NS = 'namespace=~"$namespace"'
RATE = "$__rate_interval"
BROKER = 'grpc_service="imgsearch.v1.BrokerService"'
SHARD_SEARCHES = 'grpc_service="imgsearch.v1.ShardService", grpc_method=~"Search|SearchBatch|SearchStream"'
SERVER_ERRORS = 'grpc_code=~"UNKNOWN|DEADLINE_EXCEEDED|INTERNAL|UNAVAILABLE|DATA_LOSS|UNIMPLEMENTED"'
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


class Layout:
    """Places panels left to right on Grafana's 24-column grid and numbers them."""

    def __init__(self) -> None:
        self.panels: list[dict] = []
        self.x = 0
        self.y = 0
        self.row_height = 0

    def _place(self, width: int, height: int) -> dict:
        if self.x + width > 24:
            self.x, self.y = 0, self.y + self.row_height
            self.row_height = 0
        pos = {"x": self.x, "y": self.y, "w": width, "h": height}
        self.x += width
        self.row_height = max(self.row_height, height)
        return pos

    def row(self, title: str) -> None:
        if self.x:
            self.x, self.y = 0, self.y + self.row_height
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "id": len(self.panels) + 1,
                "collapsed": False,
                "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1},
                "panels": [],
            }
        )
        self.y += 1
        self.row_height = 0

    def panel(
        self,
        kind: str,
        title: str,
        targets: list[tuple[str, str]],
        *,
        unit: str,
        width: int = 8,
        height: int = 8,
        description: str = "",
        thresholds: list[tuple[float, str]] | None = None,
    ) -> None:
        steps = [{"color": "green", "value": None}]
        steps += [{"color": color, "value": value} for value, color in (thresholds or [])]
        panel = {
            "type": kind,
            "title": title,
            "id": len(self.panels) + 1,
            "description": description,
            "datasource": DATASOURCE,
            "gridPos": self._place(width, height),
            "fieldConfig": {
                "defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
                "overrides": [],
            },
            "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]}}
            if kind == "timeseries"
            else {"reduceOptions": {"calcs": ["lastNotNull"]}},
            "targets": [
                {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
                for i, (expr, legend) in enumerate(targets)
            ],
        }
        self.panels.append(panel)


def quantile(q: float, metric: str, selector: str, by: str) -> str:
    labels = ", ".join(["le", *filter(None, [by])])
    return f"histogram_quantile({q}, sum by ({labels}) (rate({metric}_bucket{{{selector}}}[{RATE}])))"


def build() -> dict:
    lay = Layout()
    stage = "imgsearch_broker_stage_duration_seconds"
    lookups = "imgsearch_broker_cache_lookups_total"

    lay.row("Overview")
    lay.panel(
        "stat",
        "Search QPS",
        [
            (
                f'sum(rate(grpc_server_handled_total{{{BROKER}, grpc_method=~"Search|SearchStream", {NS}}}[{RATE}]))',
                "searches/s",
            ),
        ],
        unit="reqps",
        width=6,
        height=4,
    )
    lay.panel(
        "stat",
        "Search p99 (objective 200 ms)",
        [
            (quantile(0.99, stage, f'stage="total", {NS}', ""), "p99"),
        ],
        unit="s",
        width=6,
        height=4,
        thresholds=[(0.15, "orange"), (0.2, "red")],
    )
    lay.panel(
        "stat",
        "Cache hit ratio",
        [
            (
                (
                    f'sum(rate({lookups}{{result=~"hit|near_hit", {NS}}}[{RATE}]))'
                    f" / sum(rate({lookups}{{{NS}}}[{RATE}]))"
                ),
                "hit ratio",
            ),
        ],
        unit="percentunit",
        width=6,
        height=4,
    )
    lay.panel(
        "stat",
        "Server error ratio (objective 1 %)",
        [
            (
                (
                    f"sum(rate(grpc_server_handled_total{{{BROKER}, {SERVER_ERRORS}, {NS}}}[{RATE}]))"
                    f" / sum(rate(grpc_server_handled_total{{{BROKER}, {NS}}}[{RATE}]))"
                ),
                "errors",
            ),
        ],
        unit="percentunit",
        width=6,
        height=4,
        thresholds=[(0.005, "orange"), (0.01, "red")],
    )

    lay.row("Latency")
    lay.panel(
        "timeseries",
        "Broker p99 by stage",
        [
            (quantile(0.99, stage, NS, "stage"), "{{stage}}"),
        ],
        unit="s",
        width=12,
        description="decode_hash, cache, embed (Triton), fanout (shards), merge, total.",
    )
    lay.panel(
        "timeseries",
        "Broker p50 by stage",
        [
            (quantile(0.5, stage, NS, "stage"), "{{stage}}"),
        ],
        unit="s",
        width=12,
    )
    lay.panel(
        "timeseries",
        "Shard request p99 by shard (objective 50 ms)",
        [
            (quantile(0.99, "grpc_server_handling_seconds", f"{SHARD_SEARCHES}, {NS}", "shard, grpc_method"),
             "{{shard}} {{grpc_method}}"),
        ],
        unit="s",
        thresholds=[(0.05, "red")],
        description="gRPC handling time of the shards' Search and SearchBatch calls and SearchStream messages: what a "
        "broker waits for, "
        "whatever the number of categories searched (alert ImgsearchShardSearchLatencyHigh).",
    )
    lay.panel(
        "timeseries",
        "Partition search p99 by strategy (one category of a request)",
        [
            (
                quantile(0.99, "imgsearch_shard_partition_search_duration_seconds", NS, "shard, strategy"),
                "{{shard}} {{strategy}}",
            ),
        ],
        unit="s",
        description="Per partition, not per request: a search over N categories observes N times. Shows which "
        "strategy (exact, ivf, ivf_wide) is slow; the request latency is the panel before.",
    )
    lay.panel(
        "timeseries",
        "gRPC p99 by method",
        [
            (
                quantile(0.99, "grpc_server_handling_seconds", NS, "grpc_service, grpc_method"),
                "{{grpc_service}}/{{grpc_method}}",
            ),
        ],
        unit="s",
    )
    lay.panel(
        "timeseries",
        "Event-loop lag p99 by instance",
        [
            (quantile(0.99, "imgsearch_event_loop_lag_seconds", NS, "job, instance"), "{{job}} {{instance}}"),
        ],
        unit="s",
    )
    lay.panel(
        "timeseries",
        "Full garbage collection pause p99 by instance (every call in flight waits)",
        [
            (
                quantile(0.99, "imgsearch_gc_pause_seconds", f'generation="2", {NS}', "job, instance"),
                "{{job}} {{instance}}",
            ),
        ],
        unit="s",
    )
    lay.panel(
        "timeseries",
        "Triton queue and compute time per request",
        [
            (
                (
                    f"sum by (model) (rate(nv_inference_queue_duration_us{{{NS}}}[{RATE}]))"
                    f" / sum by (model) (rate(nv_inference_request_success{{{NS}}}[{RATE}])) / 1e6"
                ),
                "queue {{model}}",
            ),
            (
                (
                    f"sum by (model) (rate(nv_inference_compute_infer_duration_us{{{NS}}}[{RATE}]))"
                    f" / sum by (model) (rate(nv_inference_request_success{{{NS}}}[{RATE}])) / 1e6"
                ),
                "compute {{model}}",
            ),
        ],
        unit="s",
        thresholds=[(0.02, "red")],
    )

    lay.row("Traffic and errors")
    lay.panel(
        "timeseries",
        "Requests by method",
        [
            (
                f"sum by (grpc_service, grpc_method) (rate(grpc_server_handled_total{{{NS}}}[{RATE}]))",
                "{{grpc_service}}/{{grpc_method}}",
            ),
        ],
        unit="reqps",
    )
    lay.panel(
        "timeseries",
        "Errors by status code",
        [
            (
                (
                    "sum by (grpc_service, grpc_code) "
                    f'(rate(grpc_server_handled_total{{grpc_code!="OK", {NS}}}[{RATE}]))'
                ),
                "{{grpc_service}} {{grpc_code}}",
            ),
        ],
        unit="reqps",
    )
    lay.panel(
        "timeseries",
        "Searches by answer source and query",
        [
            (
                f"sum by (source, query) (rate(imgsearch_broker_searches_total{{{NS}}}[{RATE}]))",
                "{{source}} / {{query}}",
            ),
        ],
        unit="reqps",
        description="cache: answered by the duplicate cache; index: searched in the shards. Query: image "
        "(embedded), vector (sent ready), image_id (a catalogue image's stored embedding).",
    )

    refused = f'sum(rate(imgsearch_broker_embed_refused_total{{work="search", {NS}}}[{RATE}]))'
    lay.panel(
        "timeseries",
        "Searches refused by load shedding (objective 5 %)",
        [
            (f"{refused} / (sum(rate(imgsearch_broker_searches_total{{{NS}}}[{RATE}])) + {refused})", "searches"),
        ],
        unit="percentunit",
        thresholds=[(0.05, "red")],
        description="Share of searches the brokers refused at once (RESOURCE_EXHAUSTED) because the embedding "
        "model could not do them within their deadline; not in the server error ratio (alert "
        "ImgsearchLoadShedding).",
    )
    lay.panel(
        "timeseries",
        "Embedding refusals by work",
        [
            (f"sum by (work) (rate(imgsearch_broker_embed_refused_total{{{NS}}}[{RATE}]))", "{{work}}"),
        ],
        unit="reqps",
        description="Searches and ingests refused by load shedding; ingest refusals are retried by the client.",
    )

    lay.row("Duplicate cache")
    lay.panel(
        "timeseries",
        "Cache lookups by result",
        [
            (f"sum by (result) (rate({lookups}{{{NS}}}[{RATE}]))", "{{result}}"),
        ],
        unit="reqps",
    )
    lay.panel(
        "timeseries",
        "Cache hit ratio",
        [
            (
                f'sum(rate({lookups}{{result="hit", {NS}}}[{RATE}])) / sum(rate({lookups}{{{NS}}}[{RATE}]))',
                "exact",
            ),
            (
                (
                    f'sum(rate({lookups}{{result="near_hit", {NS}}}[{RATE}]))'
                    f" / sum(rate({lookups}{{{NS}}}[{RATE}]))"
                ),
                "near",
            ),
        ],
        unit="percentunit",
    )
    lay.panel(
        "timeseries",
        "Cache writes waiting for repair",
        [
            (f"sum(imgsearch_broker_cache_repair_pending{{{NS}}})", "pending"),
        ],
        unit="short",
    )
    lay.panel(
        "timeseries",
        "Stale-copy removals waiting for a shard replica",
        [
            # max, not sum: every broker takes up the journal's removals for its replicas (broker/removal_hints.py)
            (f"max(imgsearch_broker_pending_removals{{{NS}}})", "pending"),
            (f"max(imgsearch_broker_unsaved_removals{{{NS}}})", "not in the Redis journal"),
            (f"sum(increase(imgsearch_broker_removal_hints_dropped_total{{{NS}}}[$__rate_interval]))", "dropped"),
        ],
        unit="short",
    )

    lay.panel(
        "timeseries",
        "Redis evicted keys",
        [
            (f"sum by (job) (rate(redis_evicted_keys_total{{{NS}}}[{RATE}]))", "{{job}}"),
        ],
        unit="short",
        description="imgsearch-redis (duplicate cache, LRU): evictions are expected under memory pressure. "
        "imgsearch-redis-journal (removal journal, noeviction): must stay 0 (alert ImgsearchJournalRedisEvictions).",
    )

    lay.row("Shards")
    lay.panel(
        "timeseries",
        "Shard requests by outcome (broker view)",
        [
            (
                f"sum by (shard, outcome) (rate(imgsearch_broker_shard_requests_total{{{NS}}}[{RATE}]))",
                "{{shard}} {{outcome}}",
            ),
        ],
        unit="reqps",
    )
    lay.panel(
        "timeseries",
        "Partial results",
        [
            (f"sum(rate(imgsearch_broker_partial_results_total{{{NS}}}[{RATE}]))", "partial/s"),
        ],
        unit="reqps",
    )
    lay.panel(
        "timeseries",
        "Searches per shard call (mean)",
        [
            (
                (
                    f"sum(rate(imgsearch_broker_shard_call_searches_sum{{{NS}}}[{RATE}])) / "
                    f"sum(rate(imgsearch_broker_shard_call_searches_count{{{NS}}}[{RATE}]))"
                ),
                "searches/call",
            ),
        ],
        unit="short",
        description="Above 1: searches queued behind a call in flight went out together as one batch "
        "(broker --shard-calls-in-flight). Grows with load; 1 when idle or when batching is off.",
    )
    lay.panel(
        "stat",
        "Shard replicas up",
        [
            (f'sum(up{{job=~"imgsearch-shard.*", {NS}}})', "up"),
            (f'count(up{{job=~"imgsearch-shard.*", {NS}}})', "targets"),
        ],
        unit="short",
    )
    lay.panel(
        "timeseries",
        "Shards unreachable (broker view)",
        [
            (f"max(imgsearch_broker_shards_unreachable{{{NS}}})", "shards without a reachable replica"),
        ],
        unit="short",
        thresholds=[(1, "red")],
        description="Shards none of whose replicas answers a broker's health checks (worst broker); a broker "
        "serves after --ready-wait-s even so (alert ImgsearchBrokerShardsUnreachable).",
    )
    lay.panel(
        "timeseries",
        "Process restarts (15 min)",
        [
            (
                (
                    "sum by (job, instance) (changes(process_start_time_seconds"
                    f'{{job=~"imgsearch-shard.*|imgsearch-broker", {NS}}}[15m]))'
                ),
                "{{job}} {{instance}}",
            ),
        ],
        unit="short",
        thresholds=[(1, "red")],
        description="Starts of a broker or shard process under the same target (crash, OOM kill, a shard's "
        "fail-stop) in the last 15 minutes (alert ImgsearchProcessRestarted).",
    )
    lay.panel(
        "timeseries",
        "Vectors per shard",
        [
            (f"max by (shard) (imgsearch_shard_vectors{{{NS}}})", "{{shard}}"),
        ],
        unit="short",
        description="Live vectors of the shard (its most loaded replica). Per category: `imgsearch stats` (the "
        "Stats RPC); categories are no metric label, the writers choose them.",
    )
    lay.panel(
        "timeseries",
        "Categories per shard, untrained (exact search)",
        [
            (f"max by (shard) (imgsearch_shard_categories{{{NS}}})", "{{shard}} categories"),
            (f"max by (shard) (imgsearch_shard_categories_untrained{{{NS}}})", "{{shard}} untrained"),
        ],
        unit="short",
    )
    lay.panel(
        "timeseries",
        "Candidates scanned p99",
        [
            (quantile(0.99, "imgsearch_shard_candidates_scanned", NS, "shard"), "{{shard}}"),
        ],
        unit="short",
    )
    lay.panel(
        "timeseries",
        "Training events, index swaps and compactions",
        [
            (
                f"sum by (event) (increase(imgsearch_shard_training_events_total{{{NS}}}[{RATE}]))",
                "{{event}}",
            ),
            (f"sum(increase(imgsearch_shard_index_swaps_total{{{NS}}}[{RATE}]))", "swaps"),
            (
                f"sum by (event) (increase(imgsearch_shard_compactions_total{{{NS}}}[{RATE}]))",
                "compaction {{event}}",
            ),
        ],
        unit="short",
    )
    lay.panel(
        "timeseries",
        "WAL size",
        [
            (f"max by (instance) (imgsearch_shard_wal_bytes{{{NS}}})", "{{instance}}"),
        ],
        unit="bytes",
    )
    lay.panel(
        "timeseries",
        "Resident memory",
        [
            (f"max by (instance) (imgsearch_shard_resident_bytes{{{NS}}})", "{{instance}}"),
        ],
        unit="bytes",
    )
    lay.panel(
        "table",
        "Build info",
        [
            (f"max by (component, version, instance) (imgsearch_build_info{{{NS}}})", ""),
        ],
        unit="short",
        width=24,
        height=6,
    )

    return {
        "title": "imgsearch",
        "uid": "imgsearch-overview",
        "description": "Search latency by stage, QPS, errors, duplicate cache, shard health and index sizes.",
        "tags": ["imgsearch"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                {
                    "name": "namespace",
                    "label": "Namespace",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": {"query": "label_values(imgsearch_build_info, namespace)", "refId": "namespace"},
                    "definition": "label_values(imgsearch_build_info, namespace)",
                    "includeAll": True,
                    "allValue": ".*",
                    "multi": True,
                    "refresh": 2,
                    "current": {},
                    "hide": 0,
                },
            ]
        },
        "annotations": {"list": []},
        "panels": lay.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)
