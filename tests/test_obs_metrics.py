"""Observability of the shard and of every gRPC server: bounded label cardinality (categories are chosen by the
writers, so no metric carries them) and status-code series that exist before their first failure."""

from __future__ import annotations

import numpy as np
import prometheus_client
from prometheus_client import REGISTRY

from imgsearch.serving import GRPC_HANDLED, PREINITIALISED_CODES, preinitialise_rpc_metrics
from imgsearch.v1 import broker_pb2, shard_pb2  # noqa: F401 - their services' descriptors
from shard_server.config import ShardConfig
from shard_server.engine import ShardEngine
from shard_server.types import Record

DIM = 16


def _records(categories: int, per_category: int = 2, start: int = 0) -> list[Record]:
    rng = np.random.default_rng(categories)
    return [
        Record(image_id=f"img-{start + c}-{i}", product_id=f"p-{start + c}-{i}", category=f"cat-{start + c:06d}",
               vector=rng.standard_normal(DIM).astype(np.float32))
        for c in range(categories) for i in range(per_category)
    ]


def _shard_series() -> list[str]:
    text = prometheus_client.generate_latest(REGISTRY).decode()
    return [line for line in text.splitlines() if line.startswith("imgsearch_shard_")]


def _value(name: str) -> float:
    return REGISTRY.get_sample_value(name)


def test_many_categories_make_a_bounded_number_of_shard_series(tmp_path):
    """20,000 categories gave 10,000 series per gauge per shard (a 3 MB /metrics): the number of series does not
    depend on the number of categories now, and the totals describe them."""
    # The totals are the process's: engines other test modules left open (test_shard_wal.py closes only their
    # logs) count too, so this engine's share is what it adds (failed 11 == 5 run after test_shard_wal.py).
    names = ("imgsearch_shard_categories", "imgsearch_shard_vectors", "imgsearch_shard_categories_untrained")
    base = {name: REGISTRY.get_sample_value(name) or 0.0 for name in names}

    def _value(name: str) -> float:  # noqa: F811 - this engine's part of the total
        return REGISTRY.get_sample_value(name) - base[name]

    engine = ShardEngine(ShardConfig(data_dir=tmp_path / "shard", dimension=DIM, max_records_per_request=10_000))
    engine.load()
    try:
        engine.upsert(_records(5))
        few = _shard_series()
        assert _value("imgsearch_shard_categories") == 5 and _value("imgsearch_shard_vectors") == 10
        engine.upsert(_records(1_000, start=5))
        many = _shard_series()
        assert len(many) == len(few), sorted(set(many) - set(few))[:5]
        assert not any("category=" in line for line in many)
        assert _value("imgsearch_shard_categories") == 1_005
        assert _value("imgsearch_shard_vectors") == 2_010
        assert _value("imgsearch_shard_categories_untrained") == 1_005  # too small to train: exact search
        # An emptied category leaves the totals.
        engine.delete(["img-0-0", "img-0-1"])
        assert _value("imgsearch_shard_categories") == 1_004 and _value("imgsearch_shard_vectors") == 2_008
        engine.upsert(_records(1, per_category=3, start=1))  # ids of cat-000001 written again: no double count
        assert _value("imgsearch_shard_categories") == 1_004 and _value("imgsearch_shard_vectors") == 2_009
    finally:
        engine.close()
    # A closed engine's categories leave the process's totals (tests run several engines in one process).
    assert _value("imgsearch_shard_categories") == 0 and _value("imgsearch_shard_vectors") == 0


def test_the_totals_count_trained_categories_apart(tmp_path):
    from shard_server import metrics

    totals = metrics.CategoryTotals()
    totals.update(1, "a", 10, False)
    totals.update(1, "b", 5, True)
    totals.update(2, "a", 7, False)  # another engine's category of the same name
    assert (_value("imgsearch_shard_categories"), _value("imgsearch_shard_categories_untrained"),
            _value("imgsearch_shard_vectors")) == (3, 2, 22)
    totals.update(1, "a", 12, True)  # trained now
    assert (_value("imgsearch_shard_categories_untrained"), _value("imgsearch_shard_vectors")) == (1, 24)
    totals.forget(1)
    assert (_value("imgsearch_shard_categories"), _value("imgsearch_shard_vectors")) == (1, 7)
    totals.forget(2)
    assert _value("imgsearch_shard_categories") == 0


def test_server_error_codes_have_series_before_their_first_failure():
    """rate() and increase() see a series' first increment only against an earlier sample: with only OK created up
    front, the first UNAVAILABLE (or RESOURCE_EXHAUSTED, ...) of a method after a restart was invisible to the
    error-ratio and load-shedding alerts."""
    preinitialise_rpc_metrics(["imgsearch.v1.ShardService", "imgsearch.v1.BrokerService"])
    for service, method in (("imgsearch.v1.ShardService", "Search"), ("imgsearch.v1.ShardService", "SearchBatch"),
                            ("imgsearch.v1.BrokerService", "Search"), ("imgsearch.v1.BrokerService", "Ingest")):
        for code in ("OK", "UNAVAILABLE", "INTERNAL", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNKNOWN"):
            labels = {"grpc_type": "unary", "grpc_service": service, "grpc_method": method, "grpc_code": code}
            assert REGISTRY.get_sample_value("grpc_server_handled_total", labels) is not None, (method, code)
    # Bounded: these codes for each method of the services, nothing else.
    codes = {key[3] for key in GRPC_HANDLED._metrics if key[1].startswith("imgsearch.v1.")}
    assert set(PREINITIALISED_CODES) <= codes and len(PREINITIALISED_CODES) <= 8
