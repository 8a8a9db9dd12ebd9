"""Calibrate the near-duplicate confirmation threshold (`--near-min-similarity`) for the current model.

    .venv/bin/python -m broker.near_threshold --photos 20

For catalogue photos it prints the cosine similarity between a photo and edited copies of it (re-encode,
resize, contrast, brightness, 2 % crop: what the hash radius lets through), between the photo and photos of
*other products of its category* (look-alikes: a confirmed match would answer with the wrong product), and
between the photo and *other photos of its own product* (the next shots of the same shelf). The threshold must sit
above the other products and below the copies; above the other photos of the product too where the model allows,
though confirming one of those still answers with the right product. Run it again after changing the embedding
model: the similarity scale is the model's.
"""

from __future__ import annotations

import argparse
import asyncio
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from broker.catalogue import default_data_dir, grocery_split
from broker.demo import reencode_jpeg

EDITS = ("jpeg_q70", "resize_0.6", "contrast_1.3", "brightness_1.15", "crop_2pct")


def edited(data: bytes, edit: str) -> bytes:
    if edit == "jpeg_q70":
        return reencode_jpeg(data, quality=70)
    if edit == "resize_0.6":
        return reencode_jpeg(data, quality=90, scale=0.6)
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    if edit == "contrast_1.3":
        img = ImageEnhance.Contrast(img).enhance(1.3)
    elif edit == "brightness_1.15":
        img = ImageEnhance.Brightness(img).enhance(1.15)
    elif edit == "crop_2pct":
        img = img.crop((w // 50, h // 50, w - w // 50, h - h // 50))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


async def calibrate(data_dir: Path, photos: int, model_path: Path | None) -> dict[str, list[float]]:
    from embedder.client import OnnxEmbedder

    embedder = OnnxEmbedder(model_path)
    train = grocery_split(data_dir, "train")
    picks = train[:: max(1, len(train) // photos)][:photos]
    sims: dict[str, list[float]] = {e: [] for e in (*EDITS, "other_photo_same_product", "other_product_same_category")}
    try:
        for f in picks:
            data = f.path.read_bytes()
            others = [g for g in train if g.product_id == f.product_id and g.image_id != f.image_id][:3]
            # three photos of each other product of the category, spread over its shots
            look_alikes = [g for product in sorted({g.product_id for g in train if g.category == f.category} - {f.product_id})
                           for g in [h for h in train if h.product_id == product][::20][:3]]
            batch = [data, *(edited(data, e) for e in EDITS), *(g.path.read_bytes() for g in others + look_alikes)]
            v = await embedder.embed(batch, timeout_s=300)
            n = 1 + len(EDITS)
            for e, vec in zip(EDITS, v[1:n], strict=True):
                sims[e].append(float(v[0] @ vec))
            sims["other_photo_same_product"] += [float(v[0] @ vec) for vec in v[n : n + len(others)]]
            sims["other_product_same_category"] += [float(v[0] @ vec) for vec in v[n + len(others) :]]
    finally:
        await embedder.close()
    return sims


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m broker.near_threshold", description=__doc__)
    p.add_argument("--photos", type=int, default=20)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument(
        "--model", type=Path, default=None, help="ONNX model (default: the deployed default model)"
    )
    args = p.parse_args(argv)
    sims = asyncio.run(calibrate(args.data or default_data_dir(), args.photos, args.model))
    for name, values in sims.items():
        a = np.asarray(values)
        print(
            f"{name:26s} n={a.size:3d} min={a.min():.3f} p5={np.percentile(a, 5):.3f} "
            f"median={np.median(a):.3f} max={a.max():.3f}"
        )
    copies = np.concatenate([np.asarray(sims[e]) for e in EDITS])
    print(
        f"edited copies min {copies.min():.3f}, other products of the category max "
        f"{max(sims['other_product_same_category'], default=float('nan')):.3f}, other photos of the product max "
        f"{max(sims['other_photo_same_product']):.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
