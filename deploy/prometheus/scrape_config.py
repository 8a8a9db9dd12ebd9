"""Generate a Prometheus configuration that scrapes a local imgsearch stack (`imgsearch up`, tests).

On Kubernetes the ServiceMonitors in deploy/base do this; outside it, point Prometheus at the addresses
`imgsearch up` prints:

    python deploy/prometheus/scrape_config.py --broker 127.0.0.1:9100 \\
        --shard shard-0=127.0.0.1:9101 --shard shard-1=127.0.0.1:9102 --triton 127.0.0.1:8002 \\
        --rules deploy/prometheus/rules/imgsearch.rules.yml > prometheus.yml
    prometheus --config.file=prometheus.yml

The `shard` label and the broker, Triton and Redis job names match what the ServiceMonitors produce; the shards
are one job here (`imgsearch-shard`) and one job per shard there (`imgsearch-shard-0`, ...), which the rules and
the dashboard match alike (`job=~"imgsearch-shard.*"`), so they work unchanged on either.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

BROKER_JOB = "imgsearch-broker"
SHARD_JOB = "imgsearch-shard"
TRITON_JOB = "imgsearch-triton"
REDIS_JOB = "imgsearch-redis"
# The removal journal's own Redis (deploy/base/redis-journal), when there is one.
REDIS_JOURNAL_JOB = "imgsearch-redis-journal"


def _duration(seconds: float) -> str:
    return f"{int(seconds * 1000)}ms" if seconds < 1 or seconds != int(seconds) else f"{int(seconds)}s"


def scrape_config(
    *,
    broker: Sequence[str] = (),
    shards: Mapping[str, Sequence[str]] | None = None,
    triton: Sequence[str] = (),
    redis_exporter: Sequence[str] = (),
    redis_journal_exporter: Sequence[str] = (),
    scrape_interval_s: float = 15.0,
    evaluation_interval_s: float | None = None,
    rule_files: Sequence[str | Path] = (),
) -> dict:
    """A prometheus.yml as a dict. Addresses are host:port of /metrics endpoints; `shards` maps a shard name
    (as in the broker's shard map) to its replicas' metrics addresses."""
    interval = _duration(scrape_interval_s)
    jobs: list[dict] = []

    def job(name: str, groups: list[dict]) -> None:
        if groups:
            jobs.append(
                {
                    "job_name": name,
                    "scrape_interval": interval,
                    "scrape_timeout": _duration(min(scrape_interval_s, 10.0)),
                    "metrics_path": "/metrics",
                    "static_configs": groups,
                }
            )

    job(BROKER_JOB, [{"targets": list(broker)}] if broker else [])
    job(
        SHARD_JOB,
        [
            {"targets": list(addresses), "labels": {"shard": name}}
            for name, addresses in sorted((shards or {}).items())
        ],
    )
    job(TRITON_JOB, [{"targets": list(triton)}] if triton else [])
    job(REDIS_JOB, [{"targets": list(redis_exporter)}] if redis_exporter else [])
    job(REDIS_JOURNAL_JOB, [{"targets": list(redis_journal_exporter)}] if redis_journal_exporter else [])
    return {
        "global": {
            "scrape_interval": interval,
            "evaluation_interval": _duration(evaluation_interval_s or scrape_interval_s),
        },
        "rule_files": [str(Path(p).resolve()) for p in rule_files],
        "scrape_configs": jobs,
    }


def render(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False)


def _address(url_or_address: str) -> str:
    """Accept host:port or http://host:port/metrics."""
    text = url_or_address.split("://", 1)[-1]
    return text.split("/", 1)[0]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--broker", action="append", default=[], help="broker metrics host:port (repeatable)")
    p.add_argument(
        "--shard",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="shard replica metrics address (repeatable)",
    )
    p.add_argument("--triton", action="append", default=[], help="Triton metrics host:port (repeatable)")
    p.add_argument("--redis-exporter", action="append", default=[], help="redis_exporter host:port")
    p.add_argument("--redis-journal-exporter", action="append", default=[],
                   help="redis_exporter host:port of the removal journal's own Redis")
    p.add_argument("--interval-s", type=float, default=15.0, help="scrape and rule evaluation interval")
    p.add_argument("--rules", action="append", default=[], help="rule file to load (repeatable)")
    a = p.parse_args(argv)
    shards: dict[str, list[str]] = {}
    for item in a.shard:
        name, sep, address = item.partition("=")
        if not sep:
            p.error(f"--shard wants NAME=HOST:PORT, got {item!r}")
        shards.setdefault(name, []).append(_address(address))
    config = scrape_config(
        broker=[_address(b) for b in a.broker],
        shards=shards,
        triton=[_address(t) for t in a.triton],
        redis_exporter=[_address(r) for r in a.redis_exporter],
        redis_journal_exporter=[_address(r) for r in a.redis_journal_exporter],
        scrape_interval_s=a.interval_s,
        rule_files=a.rules,
    )
    sys.stdout.write(render(config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
