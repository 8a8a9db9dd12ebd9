"""`python -m embedder.precision_check`: does the shipped model retrieve the same on a GPU and in half precision?

Production serves the embedder from Triton on GPUs, possibly with TensorRT FP16 (`imgsearch-embed triton-repo
--gpu --tensorrt-fp16`). This check answers, for the shipped ONNX file, on the machine it runs on:

1. numerics: the cosine between each photo's embedding computed on the device in float32, TF32, float16 and
   bfloat16 (`embedder.onnx_torch`: the ONNX graph run with torch operators) and the reference, ONNX Runtime in
   float32 on the CPU (what `make demo` and the tests serve);
2. retrieval: Recall@1/5 and MAP@R of the grocery `val` photos against the `train` photos and against the
   iconic packshots, per precision, and how often the top-1 result differs from the reference's;
3. speed: model-only throughput on the device per batch size and precision, eager and replayed as a CUDA graph
   (which removes the Python per-operator overhead, as a compiled engine does), plus the CPU cost of decoding and
   preprocessing one photo, which a GPU server must pay on its CPUs.

Without a GPU it runs the CPU variants only (float32 and bfloat16) and skips the speed table; the tests run it so.
Writes one JSON file and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from embedder import data
from embedder.evaluate import onnx_embed_fn
from embedder.metrics import cosine_similarities, retrieval_report
from embedder.model_files import default_model_path
from embedder.onnx_torch import load_onnx_as_torch, onnx_torch_embed_fn

DTYPES = {"float32": torch.float32, "tf32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def limit_per_product(items: list[data.CatalogueImage], per_product: int | None) -> list[data.CatalogueImage]:
    """The first `per_product` photos of each product, in file order (a deterministic, smaller gallery)."""
    if not per_product:
        return items
    seen: dict[str, int] = defaultdict(int)
    kept = []
    for item in items:
        if seen[item.product_id] < per_product:
            seen[item.product_id] += 1
            kept.append(item)
    return kept


def preprocess_all(items: list[data.CatalogueImage], workers: int) -> tuple[np.ndarray, float]:
    """Pixels of every item, decoded as serving decodes; also the median single-thread ms per photo."""
    def one(item: data.CatalogueImage) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        pixels = data.eval_tensor(data.load_image(item.path))
        return pixels, (time.perf_counter() - start) * 1e3

    timed = [one(item)[1] for item in items[:100]]  # one at a time, so the figure is one core's cost
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pixels = [p for p, _ in pool.map(one, items)]
    return np.stack(pixels), float(np.median(timed))


def embed_in_batches(embed, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    return np.concatenate([np.asarray(embed(pixels[i:i + batch_size]), dtype=np.float32)
                           for i in range(0, len(pixels), batch_size)])


def gpu_preprocess(paths: list[Path], *, device: str, size: int = 224) -> tuple[np.ndarray, float]:
    """JPEG files -> model input on the GPU: nvJPEG decode (torchvision) and an antialiased bilinear resize of the
    shorter side + centre crop, like `embedder.preprocess` does with PIL on the CPU. Returns the pixels and the
    photos per second of this (simple, per-image) implementation, files already in memory. EXIF orientation is
    not applied: the grocery photos carry none."""
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    from embedder.preprocess import MEAN, STD

    encoded = [torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8) for path in paths]
    mean = torch.tensor(MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(STD, device=device).view(3, 1, 1)

    def run(batch: list[torch.Tensor]) -> torch.Tensor:
        out = []
        for image in decode_jpeg(batch, mode=ImageReadMode.RGB, device=device):
            height, width = image.shape[1:]
            scale = size / min(height, width)
            new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
            resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear", antialias=True,
                                    align_corners=False)[0].clamp(0, 255).round()
            top, left = (new_h - size) // 2, (new_w - size) // 2
            out.append((resized[:, top:top + size, left:left + size] / 255.0 - mean) / std)
        return torch.stack(out)

    run(encoded[:8])
    torch.cuda.synchronize()
    start = time.perf_counter()
    chunks = [run(encoded[i:i + 64]) for i in range(0, len(encoded), 64)]
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return torch.cat(chunks).cpu().numpy(), len(encoded) / elapsed


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def retrieval(embeddings: dict[str, np.ndarray], labels: dict[str, list[str]]) -> dict:
    out = {}
    for name, gallery in (("val_vs_train", "train"), ("val_vs_iconic", "iconic")):
        sims = cosine_similarities(embeddings["val"], embeddings[gallery])
        report = retrieval_report(sims, labels["val"], labels[gallery])
        out[name] = {k: report[k] for k in ("queries", "gallery", "recall@1", "recall@5", "recall@10", "map@r")}
        out[name]["top1"] = np.argmax(sims, axis=1)
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def compare(variant: dict, reference: dict, emb: dict[str, np.ndarray], ref_emb: dict[str, np.ndarray]) -> dict:
    # Normalised again in float32: a float16/bfloat16 embedding cast back is not unit length, and a plain dot
    # product mixed that length error (up to 0.4 % in bfloat16) into the "cosine".
    cosines = np.concatenate([np.sum(_unit(emb[k]) * _unit(ref_emb[k]), axis=1) for k in emb])
    lengths = np.concatenate([np.linalg.norm(emb[k].astype(np.float32), axis=1) for k in emb])
    row = {"cosine_min": float(cosines.min()), "cosine_p01": float(np.percentile(cosines, 1)),
           "cosine_mean": float(cosines.mean()),
           "length_deviation_max": float(np.abs(lengths - 1.0).max())}
    for protocol in ("val_vs_train", "val_vs_iconic"):
        ours, ref = variant[protocol], reference[protocol]
        row[protocol] = {k: v for k, v in ours.items() if k != "top1"}
        row[protocol]["top1_changed"] = int(np.sum(ours["top1"] != ref["top1"]))
    return row


def time_model(module, *, device: str, dtype: torch.dtype, batch: int, iterations: int, graph: bool) -> dict:
    """Model-only latency of one batch on the device (inputs already there), eager or as a replayed CUDA graph."""
    x = torch.randn(batch, 3, 224, 224, device=device).to(dtype)
    with torch.inference_mode():
        if graph:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    module(x)
            torch.cuda.current_stream().wait_stream(stream)
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                module(x)
            run = cuda_graph.replay
        else:
            def run():
                module(x)
        for _ in range(5):
            run()
        torch.cuda.synchronize()
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            run()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    p50 = float(np.median(times))
    return {"batch": batch, "p50_ms": p50 * 1e3, "p99_ms": float(np.percentile(times, 99)) * 1e3,
            "images_per_s": batch / p50}


def markdown(result: dict) -> str:
    lines = [("| variant | cosine min / p1 / mean vs reference | val vs train R@1 / MAP@R | top-1 changed "
              "| val vs packshots R@1 / MAP@R | top-1 changed |"), "|---|---|---|---:|---|---:|"]
    for name, row in result["variants"].items():
        t, i = row["val_vs_train"], row["val_vs_iconic"]
        lines.append(f"| {name} | {row['cosine_min']:.5f} / {row['cosine_p01']:.5f} / {row['cosine_mean']:.6f} "
                     f"| {t['recall@1']:.3f} / {t['map@r']:.3f} | {t['top1_changed']} of {t['queries']} "
                     f"| {i['recall@1']:.3f} / {i['map@r']:.3f} | {i['top1_changed']} of {i['queries']} |")
    if result.get("speed"):
        lines += ["", "| precision | mode | " + " | ".join(f"batch {b}" for b in result["batches"]) + " |",
                  "|---|---|" + "---:|" * len(result["batches"])]
        for (precision, mode), rows in sorted(_group_speed(result["speed"]).items()):
            cells = [f"{r['p50_ms']:.2f} ms, {r['images_per_s']:,.0f}/s" for r in rows]
            lines.append(f"| {precision} | {mode} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Decode + preprocess on the CPU: {result['preprocess_ms_per_photo']:.2f} ms per photo, one core.")
    rate = result.get("gpu_preprocess_photos_per_s")
    if isinstance(rate, float):
        lines.append(f"Decode (nvJPEG) + resize on the GPU: {rate:,.0f} photos/s.")
    elif rate:
        lines.append(f"Decode + resize on the GPU: {rate}")
    return "\n".join(lines)


def _group_speed(rows: list[dict]) -> dict:
    grouped: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        grouped[(row["precision"], row["mode"])].append(row)
    return grouped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=data.grocery_dir(), help="grocery dataset folder")
    parser.add_argument("--model", type=Path, default=None, help="ONNX file (default: the shipped model)")
    parser.add_argument("--train-per-product", type=int, default=None,
                        help="gallery: only the first N train photos of each product (default: all)")
    parser.add_argument("--val-limit", type=int, default=None, help="only the first N val photos")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default="1,8,32,128,256", help="batch sizes for the GPU speed table")
    parser.add_argument("--iterations", type=int, default=50, help="timed batches per speed cell")
    parser.add_argument("--out", type=Path, default=Path("precision_check.json"))
    args = parser.parse_args(argv)

    model_path = args.model or default_model_path()
    workers = os.cpu_count() or 1
    items = {"val": data.read_grocery(args.data, "val")[:args.val_limit],
             "train": limit_per_product(data.read_grocery(args.data, "train"), args.train_per_product),
             "iconic": data.read_grocery_iconic(args.data)}
    labels = {k: [item.product_id for item in v] for k, v in items.items()}
    pixels, preprocess_ms = {}, []
    for name, group in items.items():
        pixels[name], ms = preprocess_all(group, workers)
        preprocess_ms.append(ms)
    print(f"{', '.join(f'{len(v)} {k}' for k, v in items.items())} photos decoded", flush=True)

    onnx_cpu = onnx_embed_fn(model_path, threads=workers)
    ref_emb = {k: embed_in_batches(onnx_cpu, v) for k, v in pixels.items()}
    reference = retrieval(ref_emb, labels)

    cuda = args.device.startswith("cuda")
    precisions = ["float32", "tf32", "float16", "bfloat16"] if cuda else ["float32", "bfloat16"]
    module = load_onnx_as_torch(model_path)
    variants = {"onnxruntime cpu float32 (reference)": compare(reference, reference, ref_emb, ref_emb)}
    for precision in precisions:
        if cuda:
            set_tf32(precision == "tf32")
        embed = onnx_torch_embed_fn(module, device=args.device, dtype=DTYPES[precision])
        emb = {k: embed_in_batches(embed, v) for k, v in pixels.items()}
        variants[f"torch {args.device} {precision}"] = compare(retrieval(emb, labels), reference, emb, ref_emb)
        print(f"{precision}: done", flush=True)

    gpu_preprocess_rate: float | str | None = None
    if cuda:
        try:
            gpu_pixels = dict(pixels)
            rates = []
            for name in ("val", "train"):  # phone photos, all JPEG; the packshots keep the CPU path
                gpu_pixels[name], rate = gpu_preprocess([item.path for item in items[name]], device=args.device)
                rates.append(rate)
            gpu_preprocess_rate = float(np.median(rates))
            set_tf32(False)
            embed = onnx_torch_embed_fn(module, device=args.device, dtype=torch.float16)
            emb = {k: embed_in_batches(embed, v) for k, v in gpu_pixels.items()}
            variants[f"nvJPEG + GPU resize, torch {args.device} float16"] = compare(
                retrieval(emb, labels), reference, emb, ref_emb)
            print("GPU preprocessing: done", flush=True)
        except (ImportError, RuntimeError) as exc:  # no torchvision, or one without nvJPEG
            gpu_preprocess_rate = f"not run: {type(exc).__name__}: {exc}"

    import onnxruntime

    if cuda and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        session = onnxruntime.InferenceSession(str(model_path), providers=["CUDAExecutionProvider"])
        emb = {k: embed_in_batches(lambda x: session.run(None, {session.get_inputs()[0].name: x})[0], v)
               for k, v in pixels.items()}
        variants["onnxruntime cuda float32"] = compare(retrieval(emb, labels), reference, emb, ref_emb)

    speed, batches = [], [int(b) for b in args.batches.split(",") if b]
    if cuda and batches:
        torch.backends.cudnn.benchmark = True  # pick the fastest kernels per shape, as an inference engine does
        for precision in precisions:
            set_tf32(precision == "tf32")
            moved = module.to(device=args.device, dtype=DTYPES[precision])
            for graph in (False, True):
                for batch in batches:
                    row = time_model(moved, device=args.device, dtype=DTYPES[precision], batch=batch,
                                     iterations=args.iterations, graph=graph)
                    speed.append({"precision": precision, "mode": "cuda graph" if graph else "eager", **row})
            print(f"{precision}: timed", flush=True)

    result = {
        "model": str(model_path), "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(), "cpu_count": workers,
        "photos": {k: len(v) for k, v in items.items()}, "preprocess_ms_per_photo": float(np.median(preprocess_ms)),
        "variants": variants, "batches": batches, "speed": speed,
        "gpu_preprocess_photos_per_s": gpu_preprocess_rate,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
