"""The engine comparison (shard_server.compare) on a small catalogue, every engine real: faiss in process,
shard processes over gRPC, the broker process over them, embedded LanceDB and Milvus Lite."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from shard_server.compare import (
    CompareConfig,
    IndexParams,
    ground_truth,
    hottest_functions,
    recall_at_k,
    run,
    synthetic_data,
)
from shard_server.compare_plots import (
    comparison_tables,
    plot_comparison,
    profile_table,
    render,
    target_check,
    update_document,
)
from shard_server.config import ShardConfig
from shard_server.hop_floor import APIS, LAYERS, STREAM_LAYERS, hop_floor, hop_layers


def test_index_params_are_the_shards():
    config = ShardConfig(data_dir=".")
    params = IndexParams.of_shard(200_000)
    assert params.nlist == config.nlist_for(200_000)
    assert params.factory == config.factory_for(params.nlist)
    assert (params.pq_m, params.pq_bits) == (64, 4)  # "PQ64x4fs"
    assert params.rerank_factor == config.rerank_factor
    assert IndexParams.of_shard(200_000, ShardConfig(data_dir=".", nlist=32)).nlist == 32


def test_synthetic_data_is_deterministic_with_known_selectivities():
    a = synthetic_data(n=6000, dim=32, n_queries=5, seed=3)
    b = synthetic_data(n=6000, dim=32, n_queries=5, seed=3)
    assert np.array_equal(a.vectors, b.vectors) and np.array_equal(a.queries, b.queries)
    assert np.array_equal(a.prices, b.prices) and a.colours == b.colours
    assert np.allclose(np.linalg.norm(a.vectors, axis=1), 1.0, atol=1e-5)
    for selectivity, tolerance in ((0.5, 0.03), (0.1, 0.015), (0.01, 0.005)):
        assert abs(a.mask(selectivity).mean() - selectivity) < tolerance
    assert not np.array_equal(a.vectors, synthetic_data(n=6000, dim=32, n_queries=5, seed=4).vectors)


def test_ground_truth_and_recall():
    data = synthetic_data(n=3000, dim=16, n_queries=20, seed=1)
    truth = ground_truth(data, None)
    scores = data.queries @ data.vectors.T
    assert np.array_equal(truth[:, 0], scores.argmax(axis=1))
    filtered = ground_truth(data, 0.01)
    mask = data.mask(0.01)
    assert all(mask[r] for r in filtered.ravel() if r >= 0)
    assert recall_at_k(truth, truth) == 1.0
    assert recall_at_k([row[:5] for row in truth], truth) == 0.5


def small_run(tmp_path, engines: tuple[str, ...]) -> dict:
    # nlist 32: every shard (4000 and 2 x 2000 vectors) passes the training threshold, so the shards answer
    # from IVF-PQ and the nprobe knob reaches them; filters below 20k rows are exact scans in the shard.
    cfg = CompareConfig(
        n_vectors=4000,
        dim=64,
        n_queries=40,
        filter_queries=20,
        nlist=32,
        engines=engines,
        nprobes=(1, 4, 32),
        concurrency=2,
        work_dir=tmp_path / "work",
        out_json=tmp_path / "compare.json",
        plot_dir=tmp_path,
    )
    return asyncio.run(run(cfg))


def test_faiss_shard_and_broker_side_by_side(tmp_path):
    engines = ("faiss", "shard", "broker-1", "broker-2")
    report = small_run(tmp_path, engines)
    json.dumps(report)  # the report is plain JSON
    engines = report["engines"]
    assert tuple(engines) == ("faiss", "shard", "broker-1", "broker-2")
    for name, e in engines.items():
        assert e["error"] is None, (name, e["error"])
        assert e["build"]["build_s"] > 0 and e["build"]["bytes_per_vector"] > 0
        recalls = [p["recall"] for p in e["sweep"]]
        assert recalls[-1] >= 0.9, (name, e["sweep"])
        assert set(e["filtered"]) == {"0.5", "0.1", "0.01", "0.001"}
    assert "IVF32,PQ64x4fs" in engines["shard"]["build"]["index"]
    # The shard keeps at least the vectors on disk (WAL, snapshot or vector file): 64 floats of >= 2 bytes.
    assert engines["shard"]["build"]["disk_bytes_per_vector"] >= 128
    # Same index parameters: the shard over gRPC finds what faiss in process finds, knob for knob.
    faiss_by_knob = {p["knob"]: p["recall"] for p in engines["faiss"]["sweep"]}
    for p in engines["shard"]["sweep"]:
        assert abs(p["recall"] - faiss_by_knob[p["knob"]]) <= 0.15, (p, faiss_by_knob)
    assert engines["shard"]["sweep"][0]["recall"] < engines["shard"]["sweep"][-1]["recall"]
    # The broker adds a hop, not an error: over one shard it returns exactly the shard's answers' recall.
    assert [p["recall"] for p in engines["broker-1"]["sweep"]] == [
        p["recall"] for p in engines["shard"]["sweep"]
    ]
    for name in ("shard", "broker-1", "broker-2"):
        for selectivity, point in engines[name]["filtered"].items():
            assert point["recall"] >= 0.95, (name, selectivity, point)
    reached = engines["faiss"]["matched"]["0.90"]
    assert (
        reached["reached"] and reached["concurrent"]["qps"] > 0 and reached["concurrent"]["concurrency"] == 2
    )
    tables = comparison_tables(report)
    assert "| broker-2 |" in tables and "**Filtered recall@10**" in tables
    assert "broker-1 vs faiss (single, recall 0.95)" in target_check(report)
    # The floor under every gRPC engine, measured in the same run.
    assert [h["concurrency"] for h in report["grpc_hop_floor"]] == [1, 2]
    assert all(0 < h["p50_ms"] <= h["p99_ms"] and h["qps"] > 0 for h in report["grpc_hop_floor"])
    assert "one gRPC hop with no search (1 client(s)" in target_check(report)
    # Full garbage collections in the server processes, read from their /metrics (none for in-process faiss).
    assert engines["faiss"]["gc"] is None
    for name in ("shard", "broker-1", "broker-2"):
        assert engines[name]["gc"]["count"] >= 0 and engines[name]["gc"]["total_ms"] >= 0, engines[name]["gc"]
    assert "- broker-2: full garbage collections in its server processes while measured: " in target_check(report)
    assert report["event_loops"]["client"] == "asyncio" and set(report["event_loops"]) == {"client", "shard", "broker"}
    paths = plot_comparison(report, tmp_path, stem="compare")
    assert [p.name for p in paths] == ["compare-recall-qps.png", "compare-filtered-recall.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_lancedb_and_milvus_lite_on_the_same_data(tmp_path):
    pytest.importorskip("lancedb", reason="needs the bench extra: pip install -e '.[bench]'")
    pytest.importorskip("pymilvus", reason="needs the bench extra: pip install -e '.[bench]'")
    report = small_run(tmp_path, ("lancedb", "milvus"))
    for name, e in report["engines"].items():
        assert e["error"] is None, (name, e["error"])
        assert next(p["knob"] for p in e["sweep"]) == 1
        assert e["sweep"][-1]["recall"] >= 0.9, (name, e["sweep"])
    # The list count reaches the engines (milvus-lite silently falls back to 128 lists when it does not).
    assert "num_partitions=32" in report["engines"]["lancedb"]["build"]["index"]
    assert report["engines"]["milvus"]["build"]["index"] == "IVF_SQ8(nlist=32)"


def test_hottest_functions_from_collapsed_stacks():
    collapsed = "process 1:main;run (a.py:1);search (b.py:10);IndexIVF.search (swigfaiss.py:5) 60\nprocess 1:main;run (a.py:1);convert (c.py:3) 30\nprocess 1:main;run (a.py:1) 10"
    top = hottest_functions(collapsed)
    assert top[0] == {"function": "IndexIVF.search (swigfaiss.py)", "self_pct": 60.0, "inclusive_pct": 60.0}
    by_name = {t["function"]: t for t in top}
    assert by_name["run (a.py)"]["inclusive_pct"] == 100.0 and by_name["run (a.py)"]["self_pct"] == 10.0


def test_profile_table_lists_each_profiled_process():
    report = {"engines": {
        "shard": {"profile": {"processes": {"shard-0": {"top": [
            {"function": "VectorStore.take (vectors.py)", "self_pct": 15.2, "inclusive_pct": 15.4}]}}}},
        "lancedb": {"profile": None},
    }}
    table = profile_table(report)
    assert "| shard | shard-0 | `VectorStore.take (vectors.py)` 15 |" in table
    assert "lancedb" not in table


def test_update_document_re_renders_the_marked_blocks_from_their_reports(tmp_path):
    repo = Path(__file__).resolve().parent.parent
    reports = ("docs/bench/compare-grocery.json", "docs/bench/loadtest.json")
    doc = tmp_path / "bench.md"
    doc.write_text(
        "# Title\n\ntext before\n"
        f"<!-- tables from {reports[0]} -->\n| stale | table |\n<!-- end tables -->\n"
        "text between\n"
        f"<!-- tables from {reports[1]} -->\n<!-- end tables -->\ntext after\n"
    )
    assert update_document(doc, root=repo) == list(reports)
    text = doc.read_text()
    assert "stale" not in text
    assert text.startswith("# Title\n\ntext before\n") and text.endswith("<!-- end tables -->\ntext after\n")
    for path in reports:
        body = render(json.loads((repo / path).read_text()))
        assert f"<!-- tables from {path} -->\n{body}<!-- end tables -->" in text
    assert "broker-1 vs faiss (single, recall 0.95)" in text  # the target check comes with the tables
    update_document(doc, root=repo)
    assert doc.read_text() == text  # idempotent


def test_the_tables_in_docs_benchmarks_are_what_their_json_files_say(tmp_path):
    """docs/benchmarks.md's table blocks are generated (`python -m shard_server.compare_plots --update
    docs/benchmarks.md`): a hand edit or a re-run JSON without the re-render fails here."""
    repo = Path(__file__).resolve().parent.parent
    copy = tmp_path / "benchmarks.md"
    copy.write_text((repo / "docs/benchmarks.md").read_text())
    rendered = update_document(copy, root=repo)
    assert {"docs/bench/compare-1m.json", "docs/bench/loadtest.json"} <= set(rendered)
    assert copy.read_text() == (repo / "docs/benchmarks.md").read_text()


@pytest.mark.parametrize("bare", [False, True], ids=["echo-shard", "bare-grpc"])
def test_hop_floor_measures_the_echo_shard_and_the_bare_library(bare):
    [one, two] = asyncio.run(hop_floor(queries=50, concurrencies=(1, 2), bare=bare))
    assert (one["concurrency"], two["concurrency"]) == (1, 2)
    assert all(0 < h["p50_ms"] <= h["p99_ms"] < 1000 and h["qps"] > 0 and h["queries"] == 50 for h in (one, two))


def test_hop_layers_measure_each_layer_from_the_bare_library_to_the_echo_shard():
    layers = asyncio.run(hop_layers(queries=30, repeats=2))
    assert [layer["layer"] for layer in layers] == [label for label, _, _ in LAYERS]
    assert all(len(layer["runs"]) == 2 and 0 < layer["p50_ms"] < 1000 for layer in layers)


def test_hop_streams_measure_one_and_two_bare_hops_both_ways():
    # The floor under the broker's two hops over streams: a relay forwarding each message of an open stream.
    bare = tuple(layer for layer in STREAM_LAYERS if "bare" in layer[0])
    assert [server for _, server, _ in bare] == ["bare", "bare", "relay", "relay"]
    measured = asyncio.run(hop_layers(queries=30, repeats=1, layers=bare))
    assert [m["layer"] for m in measured] == [label for label, _, _ in bare]
    assert all(len(m["runs"]) == 1 and 0 < m["p50_ms"] < 1000 for m in measured)


def test_hop_streams_measure_a_minimal_broker_through_the_broker_client():
    # The real broker's hop without our code: the generated stubs relaying vector searches to the echo shard.
    minimal = tuple(layer for layer in STREAM_LAYERS if layer[1] == "stub-relay")
    assert len(minimal) == 1 and minimal[0][2] == "BrokerClient"
    [measured] = asyncio.run(hop_layers(queries=30, repeats=1, layers=minimal))
    assert len(measured["runs"]) == 1 and 0 < measured["p50_ms"] < 1000


def test_hop_apis_measure_the_bare_hop_through_the_aio_and_the_synchronous_api():
    apis = asyncio.run(hop_layers(queries=30, repeats=1, layers=APIS))
    assert [api["layer"] for api in apis] == [label for label, _, _ in APIS]
    assert all(len(api["runs"]) == 1 and 0 < api["p50_ms"] < 1000 for api in apis)


def test_keepalive_probe_reports_both_streams():
    # The probe's real run idles 330 s (too long for make test); a short idle only checks its wiring: both
    # servers answer, both streams are found open, the next search of each is answered.
    from shard_server.keepalive_probe import probe

    report = asyncio.run(probe(0.2))
    assert set(report) == {"ours", "grpc-default"}
    assert all(not r["stream_ended"] and r["next_search_hits"] == 3 for r in report.values()), report
