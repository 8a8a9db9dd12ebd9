"""`python -m embedder.decode_profile`: what decoding big JPEGs at a reduced scale costs and changes.

Both consumers of a decoded upload want a small image: the model 224 px, the perceptual hashes 256-511 px. So
`embedder.preprocess.preprocess_bytes` and `embedder.hashing.hashes_of_bytes` decode a big JPEG at a reduced DCT
scale (1/2, 1/4 or 1/8) that keeps it at least twice that size. On grocery `val` photos re-saved at phone-camera
sizes (upscaled, JPEG quality 90: the data set has no big originals) this measures, single-threaded:

1. model input: the time of the full and of the reduced decode (each followed by the same resize and
   normalisation) and the cosine between the two embeddings of each photo; for scale, the cosine between a
   photo's embedding and that of the same photo re-saved once as a JPEG of quality 85;
2. hashes (at the first size): the time of both ways of hashing, how far the reduced decode moves a photo's
   hashes, and, for each way, whether re-encoded and resized copies of each photo still fall within the
   duplicate radius (pHash <= 5 and dHash <= 5) and whether any two different photos do.
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
from embedder.hashing import hashes_of_bytes, image_hashes
from embedder.model_files import default_model_path
from embedder.preprocess import decode_image, image_to_tensor, preprocess_bytes

NEAR_BITS = 5  # the broker's default duplicate radius, on pHash and on dHash


def jpeg(img: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def timed(fn, *args, **kwargs) -> tuple[object, float]:
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


def _copies(img: Image.Image) -> dict[str, bytes]:
    def smaller(scale: float) -> Image.Image:
        return img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
    return {"q70": jpeg(img, 70), "q90 x0.6": jpeg(smaller(0.6), 90), "q80 x0.3": jpeg(smaller(0.3), 80)}


def profile_hashes(paths: list[Path], size: tuple[int, int]) -> dict:
    ways = {"full decode": lambda data: image_hashes(decode_image(data)), "reduced decode": hashes_of_bytes}
    images = [Image.open(path).convert("RGB").resize(size, Image.BICUBIC) for path in paths]
    originals = [jpeg(img, 92) for img in images]
    copies = [_copies(img) for img in images]
    out: dict = {"size": f"{size[0]}x{size[1]}", "photos": len(paths)}
    hashes = {}
    for way, fn in ways.items():
        timings = [timed(fn, data) for data in originals]
        hashes[way] = [h for h, _ in timings]
        distances = [hashes[way][i].distance(fn(copy)) for i, group in enumerate(copies) for copy in group.values()]
        pairs = [hashes[way][i].distance(hashes[way][j])
                 for i in range(len(paths)) for j in range(i + 1, len(paths))]
        out[way] = {
            "ms_p50": float(np.median([ms for _, ms in timings])),
            "copies": len(distances),
            "copies_caught": sum(p <= NEAR_BITS and d <= NEAR_BITS for p, d in distances),
            "copy_max_bits": [max(p for p, _ in distances), max(d for _, d in distances)],
            "different_pairs": len(pairs),
            "false_matches": sum(p <= NEAR_BITS and d <= NEAR_BITS for p, d in pairs),
            "closest_different_pair_bits": min(max(p, d) for p, d in pairs) if pairs else None,
        }
    moved = [a.distance(b) for a, b in zip(hashes["full decode"], hashes["reduced decode"])]
    out["reduced_vs_full_max_bits"] = [max(p for p, _ in moved), max(d for _, d in moved)]
    return out


def profile_real_photo(path: Path, embed, repeats: int = 5) -> dict:
    """One real phone photo as taken (not upscaled): median times of both ways for model input and hashes."""
    encoded = path.read_bytes()

    def median_ms(fn) -> tuple[object, float]:
        runs = [timed(fn, encoded) for _ in range(repeats)]
        return runs[0][0], float(np.median([ms for _, ms in runs]))

    full, full_ms = median_ms(lambda data: image_to_tensor(decode_image(data)))
    reduced, reduced_ms = median_ms(preprocess_bytes)
    full_hash, full_hash_ms = median_ms(lambda data: image_hashes(decode_image(data)))
    reduced_hash, reduced_hash_ms = median_ms(hashes_of_bytes)
    a, b = embed(np.stack([full, reduced]))
    return {"path": str(path), "size": "x".join(map(str, decode_image(encoded).size)), "bytes": len(encoded),
            "full_decode_ms_p50": full_ms, "reduced_decode_ms_p50": reduced_ms, "cosine": float(a @ b),
            "full_hash_ms_p50": full_hash_ms, "reduced_hash_ms_p50": reduced_hash_ms,
            "hash_moved_bits": list(full_hash.distance(reduced_hash))}


def markdown(result: dict) -> str:
    lines = [("| photo size | JPEG bytes (median) | full decode + preprocess, ms "
              "| reduced-scale decode + preprocess, ms | embedding cosine, min / mean |"), "|---|---:|---:|---:|---|"]
    for row in result["sizes"]:
        lines.append(f"| {row['size']} | {row['median_bytes']:,} | {row['full_decode_ms_p50']:.1f} "
                     f"| {row['reduced_decode_ms_p50']:.1f} | {row['cosine_min']:.5f} / {row['cosine_mean']:.5f} |")
    r = result["reencode_q85"]
    lines.append(f"\nFor scale: the original photo against itself re-saved as JPEG quality 85: cosine "
                 f"{r['cosine_min']:.5f} min / {r['cosine_mean']:.5f} mean.")
    h = result["hashes"]
    lines += ["", f"Hashes of {h['photos']} photos at {h['size']} (copies: q70, q90 at 0.6x, q80 at 0.3x):", "",
              ("| hashing | ms (p50) | copies within 5/5 bits | copies' farthest pHash / dHash bits "
              "| different-photo pairs within 5/5 | closest different pair (bits) |"),
              "|---|---:|---:|---|---:|---:|"]
    for way in ("full decode", "reduced decode"):
        w = h[way]
        lines.append(f"| {way} | {w['ms_p50']:.1f} | {w['copies_caught']} of {w['copies']} "
                     f"| {w['copy_max_bits'][0]} / {w['copy_max_bits'][1]} | {w['false_matches']} of "
                     f"{w['different_pairs']:,} | {w['closest_different_pair_bits']} |")
    lines.append(f"\nThe reduced decode moves a photo's own hashes by at most {h['reduced_vs_full_max_bits'][0]} "
                 f"(pHash) / {h['reduced_vs_full_max_bits'][1]} (dHash) bits.")
    real = result.get("real_photo")
    if real:
        lines.append(f"\nA real phone photo, {Path(real['path']).name} ({real['size']}, {real['bytes']:,} bytes): model "
                     f"input {real['full_decode_ms_p50']:.1f} -> {real['reduced_decode_ms_p50']:.1f} ms (embedding "
                     f"cosine {real['cosine']:.5f}), hashes {real['full_hash_ms_p50']:.1f} -> "
                     f"{real['reduced_hash_ms_p50']:.1f} ms (moved {real['hash_moved_bits'][0]} / "
                     f"{real['hash_moved_bits'][1]} bits).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=data.grocery_dir(), help="grocery dataset folder")
    parser.add_argument("--photos", type=int, default=12, help="val photos, evenly spaced")
    parser.add_argument("--sizes", default="3000x4000,1200x1600,600x800")
    parser.add_argument("--real-photo", type=Path,
                        default=data.data_dir() / "odd-images" / "pdq" / "reg-test-input" / "exif-rotn" / "exif-rotn-6.jpg",
                        help="a real big phone photo, timed as it is (skipped if missing)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    items = data.read_grocery(args.data, "val")
    paths = [item.path for item in items[::max(1, len(items) // args.photos)][:args.photos]]
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",") if size]
    embed = onnx_embed_fn(default_model_path(), threads=1)
    result = profile(paths, sizes, embed)
    result["hashes"] = profile_hashes(paths, sizes[0])
    if args.real_photo.is_file():
        result["real_photo"] = profile_real_photo(args.real_photo, embed)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
