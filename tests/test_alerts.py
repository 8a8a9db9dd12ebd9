"""Prometheus alerting and recording rules (deploy/prometheus/rules): `promtool check rules`, the promtool
unit tests in deploy/prometheus/tests, and the conventions (every alert tested firing and quiet, documented,
and built only on metrics the services export)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))
TEST_FILES = sorted((PROM / "tests").glob("*.test.yml"))


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_contract():
    return load_module(PROM / "metrics_contract.py", "metrics_contract")


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool not found: `make system-deps` installs Debian's prometheus package"
    return found


def rules() -> list[dict]:
    return [
        rule
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def alerts() -> list[dict]:
    return [r for r in rules() if "alert" in r]


def test_rule_files_exist():
    assert RULE_FILES and TEST_FILES


def test_promtool_check_rules_passes():
    out = subprocess.run(
        [promtool(), "check", "rules", *map(str, RULE_FILES)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_check_rules_rejects_a_broken_rule(tmp_path):
    """The check above can fail: a bad expression and a bad template are caught."""
    broken = tmp_path / "broken.yml"
    broken.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "g",
                        "rules": [
                            {
                                "alert": "A",
                                "expr": "sum(rate(x[5m]) > ",
                                "annotations": {"summary": "{{ $value | nope }}"},
                            }
                        ],
                    }
                ]
            }
        )
    )
    out = subprocess.run(
        [promtool(), "check", "rules", str(broken)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0


def test_promtool_unit_tests_pass():
    out = subprocess.run(
        [promtool(), "test", "rules", *map(str, TEST_FILES)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout and "FAILED" not in out.stdout


def test_every_alert_is_unit_tested_firing_and_quiet():
    fired: set[str] = set()
    quiet: set[str] = set()
    for path in TEST_FILES:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names <= fired, f"never tested firing: {sorted(names - fired)}"
    assert names <= quiet, f"never tested quiet: {sorted(names - quiet)}"


def test_alerts_have_severity_summary_and_description():
    for alert in alerts():
        assert alert["labels"]["severity"] in ("page", "warning"), alert["alert"]
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], alert["alert"]


def test_rules_use_only_exported_metrics():
    contract = load_contract()
    recorded = {r["record"] for r in rules() if "record" in r}
    for rule in rules():
        assert not contract.unknown_metrics(rule["expr"], recorded), rule.get("alert") or rule["record"]
        assert not contract.unknown_labels(rule["expr"]), (rule.get("alert") or rule["record"],
                                                           contract.unknown_labels(rule["expr"]))


@pytest.mark.parametrize(
    "expr, unknown",
    [
        (('histogram_quantile(0.99, sum by (le) (rate(imgsearch_broker_stage_duration_seconds_bucket{stage="totl"}'
          "[5m])))"), {'stage="totl"'}),
        ("sum by (shard) (rate(imgsearch_broker_partial_results_total[5m]))", {"shard"}),
        ('sum by (namespace, shard) (rate(imgsearch_broker_shard_requests_total{outcome!="ok"}[5m]))', set()),
        ('rate(imgsearch_shard_partition_search_duration_seconds_bucket{strategy="ivf", shard="shard-0"}[5m])',
         set()),
        ('sum by (stage) (rate(imgsearch_shard_partition_search_duration_seconds_count{strategy=~"$strategy"}[5m]))',
         {"stage"}),
        # Categories are no label (unbounded: the writers choose them); the Stats RPC has them.
        ("max by (shard, category) (imgsearch_shard_vectors)", {"category"}),
        ('sum(rate(imgsearch_broker_embed_refused_total{work="serch"}[5m]))', {'work="serch"'}),
    ],
)
def test_labels_no_series_carries_are_unknown(expr, unknown):
    assert load_contract().unknown_labels(expr) == unknown


def test_the_contract_s_labels_and_values_are_the_services():
    import prometheus_client

    import broker.fanout
    import broker.metrics
    import shard_server.metrics

    contract = load_contract()
    declared = {
        name: tuple(collector._labelnames)  # the registry's own record of each metric's labels
        for name, collector in prometheus_client.REGISTRY._names_to_collectors.items()
        if name in contract.CONTRACT_METRICS and getattr(collector, "_labelnames", ())
    }
    assert declared == {k: v for k, v in contract.CONTRACT_LABELS.items() if k != "imgsearch_gc_pause_seconds"}
    values = contract.LABEL_VALUES
    assert values["stage"] == set(broker.metrics.STAGES)
    assert values["strategy"] == set(shard_server.metrics.STRATEGIES)
    assert values["outcome"] == {broker.fanout.OK, broker.fanout.TIMEOUT, broker.fanout.UNAVAILABLE,
                                 broker.fanout.ERROR}
    children = {label: set() for label in ("result", "source", "query", "event", "work")}
    for metric in (broker.metrics.CACHE_LOOKUPS, broker.metrics.SEARCHES, shard_server.metrics.TRAINING_EVENTS,
                   broker.metrics.EMBED_REFUSED):
        for key in metric._metrics:
            for label, value in zip(metric._labelnames, key, strict=True):
                children[label].add(value)
    assert {label: values[label] for label in children} == children


def test_the_issue_s_alerts_exist():
    by_metric = {a["alert"]: load_contract().metric_names(a["expr"]) for a in alerts()}

    def alert_on(metric: str, text: str = "") -> bool:
        return any(metric in by_metric[a["alert"]] and text in a["expr"] for a in alerts())

    assert alert_on(
        "imgsearch_broker_stage_duration_seconds", "histogram_quantile(0.99"
    )  # p99 over objective
    assert alert_on("grpc_server_handled_total", "grpc_code")  # error ratio
    assert alert_on("up", "imgsearch-shard")  # shard down
    assert alert_on("imgsearch_broker_partial_results_total")  # partial results
    assert alert_on("imgsearch_broker_cache_lookups_total", 'result="error"')  # cache errors
    assert alert_on("nv_inference_queue_duration_us")  # Triton queue time
    assert alert_on("imgsearch_broker_pending_removals")  # moved images' old copies not yet removed
    assert alert_on("imgsearch_broker_unsaved_removals")
    assert alert_on("imgsearch_broker_removal_hints_dropped_total")
    assert alert_on("imgsearch_event_loop_lag_seconds", "histogram_quantile(0.99")
    assert alert_on("imgsearch_broker_embed_refused_total", 'work="search"')  # load shedding
    assert alert_on("imgsearch_broker_searches_total", "imgsearch_broker_embed_refused_total")
    assert alert_on("process_start_time_seconds", "imgsearch-shard")  # shard (and broker) restarts
    assert alert_on("process_start_time_seconds", "imgsearch-broker")
    assert alert_on("imgsearch_broker_shards_unreachable")  # serving with shards unreachable
    assert alert_on("redis_evicted_keys_total", "imgsearch-redis-journal")  # the journal is state, not a cache


def test_the_shard_latency_objective_is_per_request():
    """imgsearch_shard_partition_search_duration_seconds observes once per category a request covers: a search of
    seconds over thousands of categories looked like 0.5 ms. The objective is on the gRPC handling time of the
    shard's search calls."""
    contract = load_contract()
    (alert,) = [a for a in alerts() if a["alert"] == "ImgsearchShardSearchLatencyHigh"]
    assert contract.metric_names(alert["expr"]) == {"grpc_server_handling_seconds"}
    assert 'grpc_service="imgsearch.v1.ShardService"' in alert["expr"]
    assert 'grpc_method=~"Search|SearchBatch|SearchStream"' in alert["expr"]
    assert "shard" in re.search(r"sum by \(([^)]*)\)", alert["expr"])[1]
    for rule in rules():
        assert "imgsearch_shard_partition_search_duration_seconds" not in rule["expr"] or "record" in rule, rule


def test_restart_alert_covers_the_jobs_the_scrape_config_and_servicemonitors_name():
    """Job names: imgsearch-broker, and imgsearch-shard (local scrape config) or imgsearch-shard-N (the
    ServiceMonitor's job is the Service's name)."""
    (alert,) = [a for a in alerts() if a["alert"] == "ImgsearchProcessRestarted"]
    (pattern,) = re.findall(r'job=~"([^"]+)"', alert["expr"])
    for job in ("imgsearch-broker", "imgsearch-shard", "imgsearch-shard-0", "imgsearch-shard-12"):
        assert re.fullmatch(pattern, job), job
    for job in ("imgsearch-triton", "imgsearch-redis", "imgsearch-redis-journal"):
        assert not re.fullmatch(pattern, job), job


def test_every_alert_keeps_namespaces_apart():
    """Two stacks scraped by one Prometheus (deploy/README.md) must not be alerted on as one."""
    for alert in alerts():
        for grouping in re.findall(r"\b(?:sum|max|min|avg|count)\b\s*(by\s*\([^)]*\))?\s*\(", alert["expr"]):
            assert "namespace" in grouping, (alert["alert"], grouping or "no by (...)")


@pytest.mark.parametrize(
    "expr, expected",
    [
        (
            ("histogram_quantile(0.99, sum by (le) "
            '(rate(imgsearch_broker_stage_duration_seconds_bucket{le="1"}[5m])))'),
            {"imgsearch_broker_stage_duration_seconds"},
        ),
        (
            "sum by (model) (rate(nv_inference_queue_duration_us[5m])) / 1e6 > 2 * 1024",
            {"nv_inference_queue_duration_us"},
        ),
        (
            'max(imgsearch_brokr_cache_repair_pending{a="b"}) and up',
            {"imgsearch_brokr_cache_repair_pending", "up"},
        ),
    ],
)
def test_metric_name_extraction(expr, expected):
    assert load_contract().metric_names(expr) == expected


def test_a_histogram_s_bare_name_is_unknown():
    """`rate(x_seconds[5m])` of a histogram selects no series: an alert on it could never fire."""
    contract = load_contract()
    assert contract.unknown_metrics("rate(imgsearch_event_loop_lag_seconds[5m])")
    assert not contract.unknown_metrics("rate(imgsearch_event_loop_lag_seconds_bucket[5m])")
    assert not contract.unknown_metrics("rate(imgsearch_event_loop_lag_seconds_count[5m])")


def test_the_contract_is_what_the_services_export():
    """Every metric the broker, the shards and the serving plumbing register is in the contract with its type (so
    rules and panels may use it), and nothing else is."""
    import prometheus_client

    import broker.metrics  # noqa: F401 - registers the broker's metrics
    import shard_server.metrics  # noqa: F401
    from imgsearch.gc_pauses import GcPauseCollector

    registry = prometheus_client.CollectorRegistry()
    registry.register(GcPauseCollector())
    exported = {}
    for registered in (prometheus_client.REGISTRY, registry):
        for family in registered.collect():
            name = family.name + ("_total" if family.type == "counter" else "")
            if name.startswith(("imgsearch_", "grpc_server_")):
                exported[name] = family.type
    assert exported == load_contract().CONTRACT_METRICS


def test_latency_objectives_sit_on_histogram_bucket_edges():
    """A threshold inside a bucket would make "p99 over the objective" an artefact of interpolation."""
    from imgsearch.serving import LATENCY_BUCKETS_S

    latency_alerts = [a for a in alerts() if a["expr"].lstrip().startswith("histogram_quantile(")]
    assert len(latency_alerts) >= 2
    for alert in latency_alerts:
        threshold = float(alert["expr"].rsplit(">", 1)[1])
        assert threshold in LATENCY_BUCKETS_S, (alert["alert"], threshold)


def test_the_prometheusrule_in_the_manifests_is_the_rules_file():
    generator = load_module(PROM / "prometheus_rule.py", "prometheus_rule")
    committed = ROOT / "deploy" / "base" / "prometheusrule.yaml"
    assert committed.read_text() == generator.render(), "run: python deploy/prometheus/prometheus_rule.py"
    assert yaml.safe_load(committed.read_text())["spec"] == yaml.safe_load(RULE_FILES[0].read_text())
