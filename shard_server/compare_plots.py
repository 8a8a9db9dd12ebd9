"""PNG plots and markdown tables of an engine-comparison report (shard_server.compare) and of a load-test
report (broker.loadtest)."""

from __future__ import annotations

import argparse
import json
import re
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
    load = machine.get("load_avg_at_start")
    return f"{size}{machine.get('cores')} cores ({machine.get('cpu', '?')}), load avg {load}"


def plot_comparison(report: dict, out_dir: Path, *, stem: str = "compare") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    engines = {name: e for name, e in report["engines"].items() if not e.get("error") and e.get("sweep")}
    paths = []

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, e in engines.items():
        sweep = e["sweep"]
        ax.plot([p["recall"] for p in sweep], [p["qps"] for p in sweep], marker="o", label=name)
        for p in sweep:
            ax.annotate(
                str(p["knob"]), (p["recall"], p["qps"]), fontsize=6, xytext=(2, 2), textcoords="offset points"
            )
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
        ax.set_ylim(0, 1.3)  # head room for the legend above the bars
        ax.set_title(
            f"Recall under filters, at each engine's recall-{report.get('filter_target')} setting\n"
            f"{_subtitle(report)}",
            fontsize=9,
        )
        ax.legend(fontsize=7, ncol=4, loc="upper center")
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
    xs = list(range(len(steps)))
    ax.plot(xs, [s["qps"] for s in steps], marker="o", label="throughput (left axis)")
    ax.set_xticks(xs)
    ax.set_xticklabels(labels)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("searches per second")
    ax2 = ax.twinx()
    ax2.plot(xs, [s["client"]["p99_ms"] for s in steps], marker="s", color="tab:red", label="client p99")
    ax2.plot(xs, [s["client"]["p50_ms"] for s in steps], marker="^", color="tab:orange", label="client p50")
    ax2.set_ylabel("client-side latency, ms")
    ax.set_title("Throughput and client latency", fontsize=9)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="upper left")
    fig.suptitle(f"Full-stack load test (image queries, Triton on CPU); {_subtitle(report)}", fontsize=9)
    fig.tight_layout()
    path = out_dir / f"{stem}-stages.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


# ------------------------------------------------------------------------------------------ markdown tables


def _ms(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def comparison_tables(report: dict) -> str:
    """Markdown tables of an engine-comparison report (docs/benchmarks.md is written from these)."""
    engines = report["engines"]
    out = [
        "| engine | index | build s | bytes/vector | disk bytes/vector | what the bytes count |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, e in engines.items():
        if e.get("error"):
            out.append(f"| {name} | failed: {e['error']} | | | | |")
            continue
        b = e["build"]
        disk = b.get("disk_bytes_per_vector")
        out.append(
            f"| {name} | {b['index']} | {b['build_s']:.1f} | {b['bytes_per_vector']:.0f} "
            f"| {'-' if disk is None else f'{disk:.0f}'} | {b['bytes_basis']} |"
        )
    conc = report.get("concurrency")
    for target in (f"{t:.2f}" for t in report.get("targets", [])):
        out += [
            "",
            f"**recall@10 >= {target}** (cheapest nprobe that reaches it; 1 client, then {conc} clients)",
            "",
            (f"| engine | nprobe | recall@10 | QPS (1) | p50 ms (1) | p99 ms (1) | QPS ({conc}) "
            f"| p50 ms ({conc}) | p99 ms ({conc}) |"),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, e in engines.items():
            m = e.get("matched", {}).get(target)
            if not m:
                continue
            if not m["reached"]:
                out.append(
                    f"| {name} | - | not reached (best {m['best_recall']:.3f} at {m['knob']}) | | | | | | |"
                )
                continue
            s, c = m["single"], m["concurrent"]
            out.append(
                f"| {name} | {s['knob']} | {s['recall']:.3f} | {s['qps']:.0f} | {_ms(s['p50_ms'])} | "
                f"{_ms(s['p99_ms'])} | {c['qps']:.0f} | {_ms(c['p50_ms'])} | {_ms(c['p99_ms'])} |"
            )
    sels = [f"{s:g}" for s in report.get("selectivities", [])]
    out += [
        "",
        (f"**Filtered recall@10** (price filter keeping the given fraction; each engine at its "
        f"recall-{report.get('filter_target')} nprobe; recall / p50 ms)"),
        "",
        "| engine | nprobe | " + " | ".join(f"{float(s) * 100:g} %" for s in sels) + " |",
        "|---|---:|" + "---:|" * len(sels),
    ]
    for name, e in engines.items():
        f = e.get("filtered") or {}
        if not f:
            continue
        knob = next(iter(f.values()))["knob"]
        cells = [f"{f[s]['recall']:.3f} / {_ms(f[s]['p50_ms'])}" if s in f else "-" for s in sels]
        out.append(f"| {name} | {knob} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def target_check(report: dict, *, target: str = "0.95") -> str:
    """The issue's targets, measured: broker vs in-process faiss latency, filtered recall, QPS."""
    engines = report["engines"]
    lines = []
    faiss_m = engines.get("faiss", {}).get("matched", {}).get(target)
    for name, e in engines.items():
        if not name.startswith("broker-") or e.get("error"):
            continue
        m = e.get("matched", {}).get(target)
        if not (m and m["reached"] and faiss_m and faiss_m["reached"]):
            continue
        for mode in ("single", "concurrent"):
            b, f = m[mode], faiss_m[mode]
            lines.append(
                f"- {name} vs faiss ({mode}, recall {target}): p50 {b['p50_ms']:.2f} / {f['p50_ms']:.2f} ms "
                f"= {b['p50_ms'] / f['p50_ms']:.1f}x (target <= 2x); p99 {b['p99_ms']:.2f} / "
                f"{f['p99_ms']:.2f} ms = {b['p99_ms'] / f['p99_ms']:.1f}x (target <= 3x)"
            )
    for name, e in engines.items():
        f = e.get("filtered") or {}
        if f:
            worst = min(f.items(), key=lambda kv: kv[1]["recall"])
            verdict = "meets" if worst[1]["recall"] >= 0.95 else "misses"
            lines.append(
                f"- {name}: lowest filtered recall@10 {worst[1]['recall']:.3f} "
                f"at {float(worst[0]) * 100:g} % "
                f"selectivity ({verdict} >= 0.95)"
            )
    for hop in report.get("grpc_hop_floor") or ():
        versus = ""
        if faiss_m and faiss_m["reached"]:
            f = faiss_m["single" if hop["concurrency"] == 1 else "concurrent"]
            versus = (f"; two hops (broker) >= {2 * hop['p50_ms']:.2f} ms = "
                      f"{2 * hop['p50_ms'] / f['p50_ms']:.1f}x faiss p50 before any search")
        lines.append(
            f"- one gRPC hop with no search ({hop['concurrency']} client(s), `python -m shard_server.hop_floor`): "
            f"p50 {hop['p50_ms']:.2f} ms, p99 {hop['p99_ms']:.2f} ms{versus}"
        )
    for name, e in engines.items():
        gc_during = e.get("gc")
        if gc_during is not None:  # every search waits for a full collection in its server processes
            longest = (f", longest <= {gc_during['longest_at_most_ms']:g} ms"
                       if gc_during["count"] and gc_during["longest_at_most_ms"] is not None else "")
            lines.append(f"- {name}: full garbage collections in its server processes while measured: "
                         f"{gc_during['count']} ({gc_during['total_ms']:g} ms in all){longest}")
    qps = {
        n: e["matched"][target]["single"]["qps"]
        for n, e in engines.items()
        if not e.get("error") and e.get("matched", {}).get(target, {}).get("reached")
    }
    if qps:
        lines.append(
            f"- single-client QPS at recall {target}: "
            + ", ".join(f"{n} {q:.0f}" for n, q in sorted(qps.items(), key=lambda kv: -kv[1]))
        )
    return "\n".join(lines) + "\n"


def profile_table(report: dict, *, top: int = 5) -> str:
    """The py-spy summaries of a comparison (`--profile-s`): hottest functions per engine and process."""
    out = ["| engine | process | hottest functions (self % of samples) |", "|---|---|---|"]
    for name, e in report["engines"].items():
        for process, summary in ((e.get("profile") or {}).get("processes") or {}).items():
            functions = summary.get("top") or []
            cells = ", ".join(f"`{f['function']}` {f['self_pct']:.0f}" for f in functions[:top])
            out.append(f"| {name} | {process} | {cells or summary.get('error', '-')} |")
    return "\n".join(out) + "\n"


def loadtest_tables(report: dict) -> str:
    stages = list(STAGES)
    out = [
        "| clients | requests | QPS | client p50 / p99 ms | "
        + " | ".join(f"{s} p50 / p99 ms" for s in stages)
        + " | cache | partial | errors |",
        "|---:|---:|---:|---:|" + "---:|" * len(stages) + "---|---:|---|",
    ]
    for s in report["steps"]:
        cells = [f"{_ms(s['stages'][st]['p50_ms'])} / {_ms(s['stages'][st]['p99_ms'])}" for st in stages]
        out.append(
            f"| {s['concurrency']} | {s['requests']} | {s['qps']:.1f} | {_ms(s['client']['p50_ms'])} / "
            f"{_ms(s['client']['p99_ms'])} | "
            + " | ".join(cells)
            + f" | {s['cache']} | {s['partial']} | {s['errors'] or '-'} |"
        )
    by_kind = [
        f"{s['concurrency']} clients: "
        + ", ".join(f"{kind} {_ms(v['p50_ms'])}" for kind, v in s["client_by_kind"].items())
        for s in report["steps"]
        if s.get("client_by_kind")
    ]
    if by_kind:
        out += ["", "Client p50 by query kind (ms), per step: " + "; ".join(by_kind)]
    k = report.get("shard_killed")
    if k:
        out += [
            "",
            f"**{k['victim']} SIGKILLed at t={k['killed_at_s']} s** ({k['concurrency']} clients)",
            "",
            "| window | requests | complete | partial | errors | client p50 / p99 ms | cache |",
            "|---|---:|---:|---:|---|---:|---|",
        ]
        for label in ("before", "after"):
            w = k[label]
            ok = sum(w["cache"].values())
            out.append(
                f"| {label} | {w['requests']} | {ok - w['partial']} | {w['partial']} "
                f"| {w['errors'] or '-'} | "
                f"{_ms(w['client']['p50_ms'])} / {_ms(w['client']['p99_ms'])} | {w['cache']} |"
            )
        out += ["", "| t (s) | complete | partial | errors | p50 ms |", "|---:|---:|---:|---:|---:|"]
        for row in k["timeline"]:
            out.append(
                f"| {row['t_s']} | {row['complete']} | {row['partial']} | {row['errors']} "
                f"| {_ms(row['p50_ms'])} |"
            )
    return "\n".join(out) + "\n"


def run_line(report: dict) -> str:
    """When and under which conditions a report's run happened, as one markdown line."""
    load = (report.get("machine") or {}).get("load_avg_at_start")
    facts = [f"Run {report.get('started_at', '?')}"]
    if report.get("duration_s") is not None:
        facts.append(f"{report['duration_s']:.0f} s")
    if report.get("kind") == "full-stack-loadtest":
        stack, ingest = report.get("stack") or {}, report.get("ingest") or {}
        if "startup_s" in stack:
            facts.append(f"stack up in {stack['startup_s']} s")
        if ingest:
            facts.append(f"{ingest['images']} images ingested in {ingest['seconds']} s "
                         f"({ingest['images_per_s']} images/s)")
    if load:
        facts.append(f"load average at start {load}")
    loops = report.get("event_loops")
    if loops:
        facts.append("event loops: " + ", ".join(f"{who} {loop}" for who, loop in loops.items()))
    if "grpc_experiments" in report:
        facts.append(f"GRPC_EXPERIMENTS={report['grpc_experiments'] or '(unset: EventEngine)'}")
    return ", ".join(facts) + ".\n"


def render(report: dict) -> str:
    """Everything docs/benchmarks.md shows of one report: tables, the target check, the profile summary."""
    if report.get("kind") == "full-stack-loadtest":
        return "\n".join([run_line(report), loadtest_tables(report)])
    parts = [run_line(report), comparison_tables(report), target_check(report)]
    if any((e.get("profile") or {}).get("processes") for e in report["engines"].values()):
        parts.append(profile_table(report))
    return "\n".join(parts)


TABLES_BLOCK = re.compile(r"(<!-- tables from (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- end tables -->)", re.DOTALL)


def update_document(doc: Path, *, root: Path) -> list[str]:
    """Re-render every ``<!-- tables from PATH -->`` ... ``<!-- end tables -->`` block of `doc` from its report
    (PATH relative to `root`), so the tables in the docs are always what the JSON files say; returns the paths."""
    rendered: list[str] = []

    def replace(match: re.Match) -> str:
        path = match["path"]
        rendered.append(path)
        report = json.loads((root / path).read_text())
        return f"{match.group(1)}{render(report)}{match.group(4)}"

    text = doc.read_text()
    updated = TABLES_BLOCK.sub(replace, text)
    if updated != text:
        doc.write_text(updated)
    return rendered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shard_server.compare_plots",
        description="Print the markdown (tables, target check, profile summary) of comparison or load-test "
        "reports, or re-render the marked table blocks of a document from the reports they name.",
    )
    parser.add_argument("reports", nargs="*", type=Path, help="report JSON files to print as markdown")
    parser.add_argument(
        "--update",
        nargs="+",
        type=Path,
        metavar="DOC",
        help="re-render every '<!-- tables from PATH -->' block of DOC (PATH relative to the working directory)",
    )
    args = parser.parse_args(argv)
    if not args.reports and not args.update:
        parser.error("give report files or --update DOC")
    for doc in args.update or ():
        for path in update_document(doc, root=Path.cwd()):
            print(f"{doc}: tables from {path}")
    for path in args.reports:
        print(f"<!-- tables from {path} -->")
        print(render(json.loads(path.read_text())))
        print("<!-- end tables -->")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
