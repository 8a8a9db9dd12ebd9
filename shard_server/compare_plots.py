"""PNG plots of an engine-comparison report (shard_server.compare) and of a load-test report (broker.loadtest)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

STAGES = ("decode_hash", "cache", "embed", "fanout", "merge", "total")


def _subtitle(report: dict) -> str:
    machine = report.get("machine", {})
    data = report.get("data", {})
    n = data.get("n")
    size = f"{n:,} x {data.get('dim')}-d, " if n else ""
    return f"{size}{machine.get('cores')} cores ({machine.get('cpu', '?')}), load avg {machine.get('load_avg_at_start')}"


def plot_comparison(report: dict, out_dir: Path, *, stem: str = "compare") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    engines = {name: e for name, e in report["engines"].items() if not e.get("error") and e.get("sweep")}
    paths = []

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, e in engines.items():
        sweep = e["sweep"]
        ax.plot([p["recall"] for p in sweep], [p["qps"] for p in sweep], marker="o", label=name)
        for p in sweep:
            ax.annotate(str(p["knob"]), (p["recall"], p["qps"]), fontsize=6, xytext=(2, 2),
                        textcoords="offset points")
    for target in report.get("targets", []):
        ax.axvline(target, color="grey", linestyle=":", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("recall@10 (labels: nprobe)")
    ax.set_ylabel("queries per second, one client, one query at a time")
    ax.set_title(f"Recall vs QPS\n{_subtitle(report)}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / f"{stem}-recall-qps.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    selectivities = [f"{s:g}" for s in report.get("selectivities", [])]
    with_filters = {n: e for n, e in engines.items() if e.get("filtered")}
    if with_filters and selectivities:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        width = 0.8 / len(with_filters)
        for i, (name, e) in enumerate(with_filters.items()):
            values = [e["filtered"].get(s, {}).get("recall", 0.0) for s in selectivities]
            ax.bar([x + i * width for x in range(len(selectivities))], values, width, label=name)
        ax.axhline(0.95, color="red", linestyle="--", linewidth=0.8, label="target 0.95")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(selectivities))])
        ax.set_xticklabels([f"{float(s) * 100:g} %" for s in selectivities])
        ax.set_xlabel("fraction of the catalogue the filter keeps")
        ax.set_ylabel("filtered recall@10")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"Recall under filters, at each engine's recall-{report.get('filter_target')} setting\n"
                     f"{_subtitle(report)}", fontsize=9)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        paths.append(out_dir / f"{stem}-filtered-recall.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def plot_loadtest(report: dict, out_dir: Path, *, stem: str = "loadtest") -> list[Path]:
    """Per-stage p50/p99 latency at each client concurrency, and throughput."""
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = report["steps"]
    labels = [str(s["concurrency"]) for s in steps]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    ax = axes[0]
    width = 0.8 / len(STAGES)
    for i, stage in enumerate(STAGES):
        p50 = [s["stages"][stage]["p50_ms"] for s in steps]
        p99 = [s["stages"][stage]["p99_ms"] for s in steps]
        xs = [x + i * width for x in range(len(steps))]
        bars = ax.bar(xs, p99, width, alpha=0.35)
        ax.bar(xs, p50, width, color=bars.patches[0].get_facecolor()[:3], label=stage)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(steps))])
    ax.set_xticklabels(labels)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("ms (solid: p50, light: p99)")
    ax.set_yscale("log")
    ax.set_title("Broker latency by stage (StageTimings)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.plot(labels, [s["qps"] for s in steps], marker="o", label="throughput")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("searches per second")
    ax2 = ax.twinx()
    ax2.plot(labels, [s["client"]["p99_ms"] for s in steps], marker="s", color="tab:red", label="client p99")
    ax2.plot(labels, [s["client"]["p50_ms"] for s in steps], marker="^", color="tab:orange", label="client p50")
    ax2.set_ylabel("client-side latency, ms")
    ax.set_title("Throughput and client latency", fontsize=9)
    fig.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Full-stack load test (image queries, Triton on CPU); {_subtitle(report)}", fontsize=9)
    fig.tight_layout()
    path = out_dir / f"{stem}-stages.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
