"""`python -m embedder.decode_profile`: what decoding big JPEGs at a reduced scale costs and changes.

`embedder.preprocess.preprocess_bytes` decodes a JPEG at a reduced DCT scale when it is at least twice as big
as the model needs (`DRAFT_FACTOR`). This measures, on grocery `val` photos re-saved at phone-camera sizes
(JPEG quality 90, upscaled: the data set has no big originals), the single-thread time of the full decode and of
the reduced one (each followed by the same resize and normalisation), and the cosine between the two embeddings
of each photo. For scale, it also gives the cosine between a photo's embedding and that of the same photo
re-saved once as a JPEG of quality 85, a change every catalogue sees.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from embedder import data
from embedder.evaluate import onnx_embed_fn
from embedder.model_files import default_model_path
from embedder.preprocess import decode_image, image_to_tensor, preprocess_bytes


def jpeg(img: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def timed(fn, *args, **kwargs) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - start) * 1e3


def profile(paths: list[Path], sizes: list[tuple[int, int]], embed) -> dict:
    rows = []
    for width, height in sizes:
        full_ms, draft_ms, cosines, nbytes = [], [], [], []
        for path in paths:
            encoded = jpeg(Image.open(path).convert("RGB").resize((width, height), Image.BICUBIC), 90)
            full, t_full = timed(lambda data: image_to_tensor(decode_image(data)), encoded)
            reduced, t_draft = timed(preprocess_bytes, encoded)
            a, b = embed(np.stack([full, reduced]))
            full_ms.append(t_full)
            draft_ms.append(t_draft)
            cosines.append(float(a @ b))
            nbytes.append(len(encoded))
        rows.append({"size": f"{width}x{height}", "photos": len(paths), "median_bytes": int(np.median(nbytes)),
                     "full_decode_ms_p50": float(np.median(full_ms)), "reduced_decode_ms_p50": float(np.median(draft_ms)),
                     "cosine_min": float(min(cosines)), "cosine_mean": float(np.mean(cosines))})
    reencoded = []
    for path in paths:
        original = decode_image(path.read_bytes())
        a, b = embed(np.stack([image_to_tensor(original), image_to_tensor(decode_image(jpeg(original, 85)))]))
        reencoded.append(float(a @ b))
    return {"sizes": rows, "reencode_q85": {"cosine_min": float(min(reencoded)),
                                            "cosine_mean": float(np.mean(reencoded))}}


def markdown(result: dict) -> str:
    lines = [("| photo size | JPEG bytes (median) | full decode + preprocess, ms "
              "| reduced-scale decode + preprocess, ms | embedding cosine, min / mean |"), "|---|---:|---:|---:|---|"]
    for row in result["sizes"]:
        lines.append(f"| {row['size']} | {row['median_bytes']:,} | {row['full_decode_ms_p50']:.1f} "
                     f"| {row['reduced_decode_ms_p50']:.1f} | {row['cosine_min']:.5f} / {row['cosine_mean']:.5f} |")
    r = result["reencode_q85"]
    lines.append(f"\nFor scale: the original photo against itself re-saved as JPEG quality 85: cosine "
                 f"{r['cosine_min']:.5f} min / {r['cosine_mean']:.5f} mean.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=data.grocery_dir(), help="grocery dataset folder")
    parser.add_argument("--photos", type=int, default=12, help="val photos, evenly spaced")
    parser.add_argument("--sizes", default="3000x4000,1200x1600,600x800")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    items = data.read_grocery(args.data, "val")
    paths = [item.path for item in items[::max(1, len(items) // args.photos)][:args.photos]]
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",") if size]
    result = profile(paths, sizes, onnx_embed_fn(default_model_path(), threads=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
