"""Which queries a model change wins and loses: per-query product ranks of two ONNX models, side by side.

    .venv/bin/python -m embedder.compare_models --old OLD.onnx [--new NEW.onnx] [--json out.json]

On the grocery data: the val photos as queries against the whole catalogue (train photos + packshots) and
against the packshots only. A query's rank is its product's place among all products ordered by their best
image's cosine, as `imgsearch eval` counts it through the services with `distinct_products` (equal, since the
shards scan these small partitions exactly). Prints Recall@1/5/10 and MRR of both models, then, per product, how
many queries entered or left the first k (--k, default 10).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from embedder import data
from embedder.evaluate import embed_catalogue, onnx_embed_fn
from embedder.metrics import product_ranks, rank_summary
from embedder.model_files import default_model_path


def changes(old: np.ndarray, new: np.ndarray, labels: Sequence[str], k: int) -> dict:
    """Per product: queries whose product left the first k with the new model, and queries it brought in."""
    left = Counter(label for label, o, n in zip(labels, old, new) if o <= k < n)
    entered = Counter(label for label, o, n in zip(labels, old, new) if n <= k < o)
    return {"left_top_k": dict(left.most_common()), "entered_top_k": dict(entered.most_common())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedder.compare_models", description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="ONNX model before the change")
    parser.add_argument("--new", type=Path, default=None, help="ONNX model after it (default: the shipped model)")
    parser.add_argument("--grocery", type=Path, default=data.grocery_dir(), help="grocery dataset folder")
    parser.add_argument("--k", type=int, default=10, help="the cut-off whose entries and exits are listed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write every query's ranks and the summaries here")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error("--k must be >= 1")

    queries = data.read_grocery(args.grocery, "val")
    photos, packshots = data.read_grocery(args.grocery, "train"), data.read_grocery_iconic(args.grocery)
    labels = [q.product_id for q in queries]
    galleries = {"catalogue": photos + packshots, "packshots": packshots}
    ranks: dict[str, dict[str, np.ndarray]] = {name: {} for name in galleries}
    for which, path in (("old", args.old), ("new", args.new or default_model_path())):
        embed = onnx_embed_fn(path, args.threads)
        q = embed_catalogue(embed, queries)
        g = embed_catalogue(embed, photos + packshots)
        for name, items in galleries.items():
            emb = g if name == "catalogue" else g[len(photos):]
            ranks[name][which] = product_ranks(q, labels, emb, [i.product_id for i in items])

    report: dict = {"old": str(args.old), "new": str(args.new or default_model_path()), "k": args.k, "galleries": {}}
    for name in galleries:
        old, new = ranks[name]["old"], ranks[name]["new"]
        entry = {"old": rank_summary(old), "new": rank_summary(new), **changes(old, new, labels, args.k),
                 "queries": [{"path": str(q.path), "product": q.product_id, "old_rank": int(o), "new_rank": int(n)}
                             for q, o, n in zip(queries, old, new)]}
        report["galleries"][name] = entry
        print(f"\n{name}: {len(queries)} val photos")
        for which in ("old", "new"):
            s = entry[which]
            print(f"  {which}: R@1 {s['recall@1']:.3f}  R@5 {s['recall@5']:.3f}  R@10 {s['recall@10']:.3f}  "
                  f"MRR {s['mrr']:.3f}")
        for key, verb in (("left_top_k", "left"), ("entered_top_k", "entered")):
            counts = entry[key]
            listed = ", ".join(f"{product} {n}" for product, n in counts.items()) or "none"
            print(f"  {sum(counts.values())} queries {verb} the top {args.k}: {listed}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
