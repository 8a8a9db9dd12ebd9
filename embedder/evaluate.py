"""`imgsearch-embed eval`: Recall@1/5/10, MAP@R and a "same product" threshold sweep, query photos vs a gallery.

On the grocery data (default): val photos against the train photos, and val photos against the 81 iconic
catalogue images. The model is an ONNX file (default: the shipped artifact), a training checkpoint, or the
no-fine-tuning baseline (ImageNet backbone + GeM, 1280-d, no projection).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from embedder import data
from embedder.errors import CheckpointImageSizeError, InputFileError
from embedder.metrics import cosine_similarities, retrieval_report
from embedder.model_files import INPUT_NAME, OUTPUT_NAME, default_model_path
from embedder.preprocess import preprocess_bytes

EmbedFn = Callable[[np.ndarray], np.ndarray]  # (N,3,224,224) float32 -> (N,D) float32


def onnx_embed_fn(path: Path, threads: int = 2) -> EmbedFn:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda pixels: session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]


def torch_embed_fn(model, device: str = "cpu") -> EmbedFn:
    import torch

    model = model.eval().to(device)

    def embed(pixels: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(pixels).to(device)).cpu().numpy()

    return embed


def embed_catalogue(embed: EmbedFn, items: Sequence[data.CatalogueImage], batch_size: int = 32,
                    progress: bool = True) -> np.ndarray:
    """Decode each file exactly as serving does (embedder.preprocess), embed in batches."""
    from tqdm import tqdm

    chunks = []
    bar = tqdm(total=len(items), desc="embedding", unit="img", disable=not progress)
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        # preprocess_bytes, not load_image: serving decodes big JPEGs at a reduced scale (a 12 MP photo's pixels
        # differ by ~2 levels, its embedding by cosine 0.994).
        pixels = []
        for item in batch:
            with data.naming(item.path):
                pixels.append(preprocess_bytes(item.path.read_bytes()))
        pixels = np.stack(pixels)
        chunks.append(np.asarray(embed(pixels), dtype=np.float32))
        bar.update(len(batch))
    bar.close()
    return np.concatenate(chunks)


def evaluate_pair(query_emb: np.ndarray, query_labels: Sequence[str], gallery_emb: np.ndarray,
                  gallery_labels: Sequence[str]) -> dict:
    return retrieval_report(cosine_similarities(query_emb, gallery_emb), query_labels, gallery_labels)


def evaluate_grocery(embed: EmbedFn, root: Path, *, heldout_products: set[str] | None = None,
                     batch_size: int = 32, progress: bool = True, split: str = "val") -> dict:
    """`split` (val, or test where the folder has a test.txt) vs train photos and vs iconic images; also
    restricted to held-out products when given. The protocols are named after the split (val_vs_train...)."""
    queries = data.read_grocery(root, split)
    gallery_photos = data.read_grocery(root, "train")
    iconic = data.read_grocery_iconic(root)
    q = embed_catalogue(embed, queries, batch_size, progress)
    g = embed_catalogue(embed, gallery_photos, batch_size, progress)
    ic = embed_catalogue(embed, iconic, batch_size, progress)
    q_labels = [i.product_id for i in queries]
    g_labels = [i.product_id for i in gallery_photos]
    ic_labels = [i.product_id for i in iconic]
    results = {
        f"{split}_vs_train": evaluate_pair(q, q_labels, g, g_labels),
        f"{split}_vs_iconic": evaluate_pair(q, q_labels, ic, ic_labels),
    }
    if heldout_products:
        keep = np.array([label in heldout_products for label in q_labels])
        kept_labels = [label for label, k in zip(q_labels, keep) if k]
        # Queries of products the model never trained on, against the whole gallery (all 81 products).
        results[f"heldout_{split}_vs_train"] = evaluate_pair(q[keep], kept_labels, g, g_labels)
        results[f"heldout_{split}_vs_iconic"] = evaluate_pair(q[keep], kept_labels, ic, ic_labels)
    return results


def summary_table(results: dict) -> str:
    lines = [(f"{'protocol':24s} {'queries':>7s} {'gallery':>7s} {'R@1':>6s} {'R@5':>6s} {'R@10':>6s} "
             f"{'MAP@R':>6s} {'best-F1 thr':>11s} {'P':>5s} {'R':>5s} {'F1':>5s}")]
    for name, r in results.items():
        b = r["best_f1"]
        if not r.get("answerable_queries", r["queries"]):
            lines.append(f"{name:24s} {r['queries']:7d} {r['gallery']:7d} {NOTHING_TO_MEASURE}")
            continue
        lines.append(f"{name:24s} {r['queries']:7d} {r['gallery']:7d} {r['recall@1']:6.3f} {r['recall@5']:6.3f} "
                     f"{r['recall@10']:6.3f} {r['map@r']:6.3f} {b['threshold']:11.2f} {b['precision']:5.3f} "
                     f"{b['recall']:5.3f} {b['f1']:5.3f}")
    return "\n".join(lines + _answerable_notes(results))


# A protocol none of whose queries has a right answer in its gallery: its figures were printed as NaN (review).
NOTHING_TO_MEASURE = "no query has a right answer in the gallery: nothing to measure"


def _answerable_notes(results: dict) -> list[str]:
    """Where only part of the queries have a right answer in the gallery, what the figures average over (they
    read as if over every query: 20 queries against a gallery of one of their products gave R@1 1.000, review)."""
    return [f"{name}: {r['answerable_queries']} of {r['queries']} queries have a right answer in the gallery; "
            "the figures are over those" for name, r in results.items()
            if 0 < r.get("answerable_queries", r["queries"]) < r["queries"]]


def summary_markdown(results: dict) -> str:
    lines = ["| protocol | queries | gallery | R@1 | R@5 | R@10 | MAP@R | best-F1 threshold | P | R | F1 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        b = r["best_f1"]
        if not r.get("answerable_queries", r["queries"]):
            cells = [name, str(r["queries"]), str(r["gallery"]), NOTHING_TO_MEASURE, *[""] * 7]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        lines.append(f"| {name} | {r['queries']} | {r['gallery']} | {r['recall@1']:.3f} | {r['recall@5']:.3f} | "
                     f"{r['recall@10']:.3f} | {r['map@r']:.3f} | {b['threshold']:.2f} | {b['precision']:.3f} | "
                     f"{b['recall']:.3f} | {b['f1']:.3f} |")
    notes = _answerable_notes(results)
    return "\n".join(lines + ([""] + notes if notes else []))


def _nan_to_none(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imgsearch-embed eval", description=__doc__.splitlines()[0])
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--onnx", type=Path, help="ONNX model (default: the shipped artifact / $IMGSEARCH_MODEL)")
    model.add_argument("--checkpoint", type=Path, help="checkpoint written by `imgsearch-embed train`")
    model.add_argument("--baseline", action="store_true",
                       help="ImageNet backbone + GeM (p=3), no fine-tuning, no projection")
    parser.add_argument("--any-image-size", action="store_true",
                        help="evaluate a --checkpoint trained on crops of another size than serving's 224 px")
    parser.add_argument("--grocery", type=Path, default=data.grocery_dir(), help="grocery dataset folder")
    parser.add_argument("--grocery-split", default="val",
                        help="the grocery photos of this split as queries against train and the packshots (val, "
                             "or test where the folder has a test.txt, such as the dataset's own held-out split)")
    parser.add_argument("--queries", type=Path, help="query catalogue CSV/folder (instead of the grocery data)")
    parser.add_argument("--gallery", type=Path,
                        help="gallery catalogue CSV/folder; without it, --queries are searched among themselves, "
                             "each leaving itself out (leave-one-out)")
    parser.add_argument("--heldout", type=Path,
                        help="a run's split.json: also report queries of the products held out of training")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--markdown", action="store_true", help="print the summary as a Markdown table")
    parser.add_argument("--show", type=Path, help="only print the summary of a results JSON written by --out")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu",
                        help="torch device for --checkpoint / --baseline (e.g. cuda); ONNX always runs on the CPU")
    args = parser.parse_args(argv)
    if args.show:
        saved = json.loads(args.show.read_text())
        try:
            table = summary_markdown(saved["results"]) if args.markdown else summary_table(saved["results"])
            print(f"model: {saved['model']}")
        except (KeyError, TypeError, AttributeError) as exc:  # JSON, but not eval's (a metrics.json, a list...)
            raise InputFileError(f"{args.show}: not a results file written by eval --out ({type(exc).__name__}: "
                                 f"{exc})") from exc
        print(table)
        return 0
    if args.gallery and not args.queries:
        parser.error("--gallery needs --queries")
    if args.heldout and args.queries:
        parser.error("--heldout goes with the grocery data, not --queries")
    if args.grocery_split == "train":
        parser.error("--grocery-split train: the train photos are the gallery (every query would find itself)")
    if args.batch_size < 1 or args.threads < 1:
        parser.error("--batch-size and --threads must be at least 1")
    if args.out is not None and args.out.is_dir():
        parser.error(f"--out {args.out} is a folder: give the JSON file to write")

    if args.checkpoint or args.baseline:
        import torch

        from embedder.model import GeMBaseline, load_checkpoint

        torch.set_num_threads(args.threads)
        try:  # a tensor on it: torch.device() accepts every type it knows of, whether this build has it or not
            torch.empty(1, device=torch.device(args.device)).tolist()
        except (RuntimeError, AssertionError, NotImplementedError) as exc:
            parser.error(f"--device {args.device!r}: this torch cannot use it ({type(exc).__name__}: {exc})")
        try:
            net = GeMBaseline() if args.baseline else load_checkpoint(args.checkpoint,
                                                                      any_image_size=args.any_image_size)
        except ValueError as exc:  # trained on crops of another size than serving's
            hint = " (--any-image-size evaluates it anyway)" if isinstance(exc, CheckpointImageSizeError) else ""
            parser.error(f"{exc}{hint}")
        embed, model_name = torch_embed_fn(net, args.device), ("imagenet-gem-baseline" if args.baseline else str(args.checkpoint))
    else:
        onnx_path = args.onnx or default_model_path()
        embed, model_name = onnx_embed_fn(onnx_path, args.threads), str(onnx_path)

    started = time.monotonic()
    if args.queries and args.gallery:
        queries, gallery = data.read_catalogue(args.queries), data.read_catalogue(args.gallery)
        # A query that is also a gallery image finds itself: Recall@1 1.0 that says nothing (review).
        shared = sorted({q.path.resolve() for q in queries} & {g.path.resolve() for g in gallery})
        if shared:
            parser.error(f"{len(shared)} query file(s) are in the gallery too (e.g. {shared[0]}): each would find "
                         "itself. Leave them out of one of the two, or give --queries alone (leave-one-out)")
        results = {"queries_vs_gallery": evaluate_pair(
            embed_catalogue(embed, queries, args.batch_size), [i.product_id for i in queries],
            embed_catalogue(embed, gallery, args.batch_size), [i.product_id for i in gallery])}
    elif args.queries:
        queries = data.read_catalogue(args.queries)
        listed = Counter(item.path.resolve() for item in queries)
        twice = sorted(path for path, count in listed.items() if count > 1)
        if twice:  # leaving a query out left its copy in: it found itself (review)
            parser.error(f"{len(twice)} file(s) listed more than once in --queries (e.g. {twice[0]}): leave-one-out "
                         "would find the copy")
        q, labels = embed_catalogue(embed, queries, args.batch_size), [i.product_id for i in queries]
        results = {"queries_leave_one_out": retrieval_report(cosine_similarities(q, q), labels, labels,
                                                             exclude_self=True)}
    else:
        heldout = None
        if args.heldout:
            try:
                heldout = set(json.loads(args.heldout.read_text())["val_products"])
            except (ValueError, KeyError, TypeError) as exc:
                parser.error(f"--heldout {args.heldout}: not a training run's split.json ({type(exc).__name__}: "
                             f"{exc})")
            if not heldout:  # a run with --val-fraction 0 trained on every product: no heldout rows would appear
                parser.error(f"--heldout {args.heldout}: the run held no product out of training (val_products is "
                             "empty)")
        if not (args.grocery / f"{args.grocery_split}.txt").is_file():
            parser.error(f"no grocery split {args.grocery_split!r}: {args.grocery / (args.grocery_split + '.txt')} "
                         "does not exist")
        results = evaluate_grocery(embed, args.grocery, heldout_products=heldout, batch_size=args.batch_size,
                                   split=args.grocery_split)
    print(f"model: {model_name}  ({time.monotonic() - started:.0f} s)")
    print(summary_markdown(results) if args.markdown else summary_table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        # NaN (a protocol with nothing to measure) is not JSON: null instead
        args.out.write_text(json.dumps(_nan_to_none({"model": model_name, "results": results}), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
