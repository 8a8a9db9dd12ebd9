"""The full-stack load test (broker.loadtest): its arithmetic on hand-made outcomes, then one short real run
(redis-server, Triton on CPU, two shard processes, the broker) with a shard killed halfway."""

from __future__ import annotations

import json

import pytest

from broker.loadtest import LoadTestConfig, Outcome, query_mix, run, summarize, timeline
from broker.types import CacheOutcome, SearchAnswer, StageTimings
from shard_server.compare_plots import plot_loadtest


def _answer(*, cache: CacheOutcome, partial: bool = False, embed_s: float = 0.0) -> SearchAnswer:
    timings = StageTimings(
        decode_hash_s=0.002,
        cache_s=0.001,
        embed_s=embed_s,
        fanout_s=0.004 if embed_s else 0.0,
        merge_s=0.0001 if embed_s else 0.0,
        total_s=0.003 + (embed_s + 0.0041 if embed_s else 0.0),
    )
    return SearchAnswer(
        hits=(),
        cache=cache,
        from_duplicate_cache=cache is CacheOutcome.EXACT,
        partial=partial,
        timings=timings,
    )


def test_query_mix_keeps_the_hit_ratio():
    mix = query_mix([b"h1", b"h2"], [b"m1", b"m2", b"m3"], 0.3)
    kinds = [k for k, _ in mix]
    assert len(mix) == 5 and kinds.count("hit") == int(5 * 0.3)
    long = query_mix([b"h"] * 30, [b"m"] * 70, 0.3)
    assert [k for k, _ in long].count("hit") == 30
    assert all(data == (b"h" if kind == "hit" else b"m") for kind, data in long)


def test_summary_counts_stages_only_where_they_ran():
    outcomes = [
        Outcome(started_s=0.1 * i, latency_s=0.004, kind="hit", answer=_answer(cache=CacheOutcome.EXACT))
        for i in range(10)
    ]
    outcomes += [
        Outcome(
            started_s=1.0 + 0.1 * i,
            latency_s=0.05,
            kind="miss",
            answer=_answer(cache=CacheOutcome.MISS, embed_s=0.04, partial=i >= 5),
        )
        for i in range(10)
    ]
    outcomes.append(
        Outcome(started_s=2.5, latency_s=5.0, kind="miss", answer=None, error="DeadlineExceededError")
    )
    s = summarize(outcomes, wall_s=2.0)
    assert s["requests"] == 21 and s["qps"] == 10.0
    assert s["errors"] == {"DeadlineExceededError": 1} and s["partial"] == 5
    assert s["cache"] == {"exact": 10, "miss": 10} and s["from_duplicate_cache"] == 10
    assert s["stages"]["embed"]["count"] == 10 and s["stages"]["embed"]["p50_ms"] == pytest.approx(40.0)
    assert s["stages"]["decode_hash"]["count"] == 20
    assert s["client_by_kind"]["hit"]["p50_ms"] == pytest.approx(4.0)
    rows = timeline(outcomes)
    assert [r["t_s"] for r in rows] == [0.0, 1.0, 2.0]
    assert sum(r["complete"] for r in rows) == 15 and sum(r["partial"] for r in rows) == 5
    assert rows[-1]["errors"] == 1


@pytest.mark.slow
def test_full_stack_run_with_a_shard_killed(tmp_path, data_dir):
    cfg = LoadTestConfig(
        data_dir=data_dir,
        shards=2,
        gallery=16,
        queries=8,
        hit_ratio=0.3,
        concurrency=(1, 2),
        step_s=2.0,
        kill_concurrency=2,
        kill_run_s=4.0,
        work_dir=tmp_path / "stack",
        out_json=tmp_path / "loadtest.json",
        plot_dir=tmp_path,
    )
    report = run(cfg)
    json.dumps(report)
    assert report["ingest"]["images"] == 16 and report["ingest"]["cache_pending"] == 0
    for step in report["steps"]:
        assert step["requests"] > 0 and step["qps"] > 0 and not step["errors"] and step["partial"] == 0
        assert step["cache"].get("exact", 0) > 0 and step["cache"].get("miss", 0) > 0
        # Cache hits skip the embedding: the embed stage ran exactly for the misses.
        assert step["stages"]["embed"]["count"] == step["cache"]["miss"]
        assert step["stages"]["total"]["p99_ms"] <= step["client"]["p99_ms"] + 1.0
    killed = report["shard_killed"]
    assert killed["before"]["partial"] <= killed["before"]["requests"] // 2
    after = killed["after"]
    # Users keep getting answers: misses come back flagged partial (the other shard's hits), exact duplicates
    # still come from the cache (flagged partial too when their image is on the dead shard, whose check of the
    # cache answer could not be made); nothing fails.
    assert after["requests"] > 0 and not after["errors"]
    assert after["cache"].get("exact", 0) > 0
    assert after["cache"].get("miss", 0) <= after["partial"] <= after["requests"]
    paths = plot_loadtest(report, tmp_path)
    assert paths[0].stat().st_size > 10_000
