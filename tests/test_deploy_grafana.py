"""The Grafana dashboard (deploy/grafana/imgsearch.json): generated from build_dashboard.py, laid out on the
grid, every query parses (promtool) and uses only exported metrics, and the issue's topics all have panels.
tests/test_prometheus_stack.py also runs every query against a real Prometheus scraping a real stack."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "deploy" / "grafana"
PROM = ROOT / "deploy" / "prometheus"


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboard() -> dict:
    return json.loads((GRAFANA / "imgsearch.json").read_text())


def queries(board: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]


def as_promql(expr: str, rate_window: str = "5m") -> str:
    """A dashboard query with Grafana's variables replaced, as Grafana would send it."""
    return expr.replace("$__rate_interval", rate_window).replace("$namespace", ".*")


def test_committed_json_is_what_the_generator_writes():
    builder = load(GRAFANA / "build_dashboard.py", "build_dashboard")
    assert (GRAFANA / "imgsearch.json").read_text() == builder.render(), (
        "run: python deploy/grafana/build_dashboard.py"
    )


def test_panels_have_unique_ids_and_do_not_overlap():
    board = dashboard()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in board["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine
    for p in board["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}"
            assert p["targets"], p["title"]


def test_every_query_parses_and_uses_exported_metrics(tmp_path):
    contract = load(PROM / "metrics_contract.py", "metrics_contract")
    exprs = queries(dashboard())
    for title, expr in exprs:
        assert not contract.unknown_metrics(expr), f"{title}: {contract.unknown_metrics(expr)}"
        assert not contract.unknown_labels(expr), f"{title}: {contract.unknown_labels(expr)}"
        assert "$__rate_interval" in expr or "rate(" not in expr and "increase(" not in expr, title
    # promtool parses every query as the expression of a recording rule.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": as_promql(expr)}
                    for i, (_, expr) in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run(
        [shutil.which("promtool") or "promtool", "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_issue_s_topics_have_panels():
    exprs = " ".join(expr for _, expr in queries(dashboard()))
    assert (
        "sum by (le, stage) (rate(imgsearch_broker_stage_duration_seconds_bucket" in exprs
    )  # latency by stage
    assert 'grpc_method=~"Search|SearchStream"' in exprs  # QPS: unary calls and stream messages
    assert "sum by (grpc_service, grpc_code)" in exprs  # error codes
    assert 'imgsearch_broker_cache_lookups_total{result=~"hit|near_hit"' in exprs  # cache hit ratio
    assert (
        'up{job=~"imgsearch-shard.*"' in exprs and "imgsearch_broker_shard_requests_total" in exprs
    )  # shards
    assert "imgsearch_shard_vectors" in exprs  # index sizes
    assert "imgsearch_shard_categories_untrained" in exprs
    assert "imgsearch_broker_embed_refused_total" in exprs  # load shedding
    assert 'changes(process_start_time_seconds{job=~"imgsearch-shard.*|imgsearch-broker"' in exprs  # restarts
    assert "imgsearch_broker_shards_unreachable" in exprs
    assert "redis_evicted_keys_total" in exprs


def test_shard_latency_panels_are_per_request_and_per_partition_by_name():
    """The shard latency objective panel shows the gRPC handling time of search calls (per request); the
    per-partition histogram is shown only under a title that says so."""
    panels = {p["title"]: p for p in dashboard()["panels"]}
    (objective,) = [p for t, p in panels.items() if t.startswith("Shard request p99")]
    (expr,) = [t["expr"] for t in objective["targets"]]
    assert "grpc_server_handling_seconds_bucket" in expr and 'grpc_service="imgsearch.v1.ShardService"' in expr
    assert 'grpc_method=~"Search|SearchBatch|SearchStream"' in expr
    for title, expr in queries(dashboard()):
        if "imgsearch_shard_partition_search_duration_seconds" in expr:
            assert "partition" in title.lower(), title


def test_no_panel_groups_by_category():
    """Categories are chosen by the writers: no metric carries them (shard_server/metrics.py)."""
    for title, expr in queries(dashboard()):
        assert "category" not in expr, title
