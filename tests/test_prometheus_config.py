"""deploy/prometheus/scrape_config.py: the generated configuration passes `promtool check config`, names the
jobs the alerting rules expect and labels shard targets like the Kubernetes ServiceMonitor does."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy" / "prometheus"
SCRIPT = PROM / "scrape_config.py"
RULES = PROM / "rules" / "imgsearch.rules.yml"


def scrape_module():
    spec = importlib.util.spec_from_file_location("scrape_config", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def promtool_check_config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [shutil.which("promtool") or "promtool", "check", "config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_generated_config_passes_promtool(tmp_path):
    scrape = scrape_module()
    config = scrape.scrape_config(
        broker=["127.0.0.1:9100"],
        shards={"shard-1": ["127.0.0.1:9102"], "shard-0": ["127.0.0.1:9101"]},
        triton=["127.0.0.1:8002"],
        redis_exporter=["127.0.0.1:9121"],
        redis_journal_exporter=["127.0.0.1:9122"],
        scrape_interval_s=1,
        rule_files=[RULES],
    )
    path = tmp_path / "prometheus.yml"
    path.write_text(scrape.render(config))
    out = promtool_check_config(path)
    assert out.returncode == 0, out.stdout + out.stderr
    rules = sum(len(group["rules"]) for group in yaml.safe_load(RULES.read_text())["groups"])
    assert "SUCCESS" in out.stdout and f"{rules} rules found" in out.stdout
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"imgsearch-broker", "imgsearch-shard", "imgsearch-triton", "imgsearch-redis",
                         "imgsearch-redis-journal"}
    assert jobs["imgsearch-shard"]["static_configs"] == [
        {"targets": ["127.0.0.1:9101"], "labels": {"shard": "shard-0"}},
        {"targets": ["127.0.0.1:9102"], "labels": {"shard": "shard-1"}},
    ]
    assert config["global"]["scrape_interval"] == "1s"


def test_promtool_rejects_a_broken_config(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump({"global": {"scrape_interval": "soon"}}))
    assert promtool_check_config(path).returncode != 0


def test_the_shard_down_alert_matches_the_generated_shard_job():
    rules = yaml.safe_load(RULES.read_text())
    (shard_down,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "ImgsearchShardDown"]
    assert 'job=~"imgsearch-shard.*"' in shard_down["expr"]
    assert scrape_module().SHARD_JOB.startswith("imgsearch-shard")


def test_rules_name_the_generated_jobs():
    """Alerts select jobs by name: the restart alert the broker's and shards' jobs, the journal eviction alert the
    journal Redis's job (not the cache's, whose LRU evictions are expected)."""
    import re

    scrape = scrape_module()
    rules = {r["alert"]: r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
             if "alert" in r}
    (restart,) = re.findall(r'job=~"([^"]+)"', rules["ImgsearchProcessRestarted"])
    assert re.fullmatch(restart, scrape.SHARD_JOB) and re.fullmatch(restart, scrape.BROKER_JOB)
    assert f'job="{scrape.REDIS_JOURNAL_JOB}"' in rules["ImgsearchJournalRedisEvictions"]


def test_command_line(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--broker",
            "http://127.0.0.1:9100/metrics",
            "--shard",
            "shard-0=127.0.0.1:9101",
            "--shard",
            "shard-0=127.0.0.1:9103",
            "--triton",
            "127.0.0.1:8002",
            "--interval-s",
            "0.5",
            "--rules",
            str(RULES),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    shard_job = next(j for j in config["scrape_configs"] if j["job_name"] == "imgsearch-shard")
    assert shard_job["static_configs"] == [
        {"targets": ["127.0.0.1:9101", "127.0.0.1:9103"], "labels": {"shard": "shard-0"}}
    ]
    assert config["global"]["scrape_interval"] == "500ms"
    assert config["scrape_configs"][0]["static_configs"] == [{"targets": ["127.0.0.1:9100"]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(out.stdout)
    assert promtool_check_config(path).returncode == 0
    bad = subprocess.run(
        [sys.executable, str(SCRIPT), "--shard", "127.0.0.1:9101"], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "NAME=HOST:PORT" in bad.stderr
