"""`python -m embedder.signature_margins`: how far apart a photo's copies are in colour and brightness.

The duplicate cache answers an *exact* match (both hashes identical) without an embedding, so it also compares
the pictures' colour and brightness signatures (`embedder.hashing`: chroma and luma of an 8x8 grid), which the
hashes do not see. The thresholds (`COLOUR_MAX_DIFFERENCE`, `BRIGHTNESS_MAX_DIFFERENCE`) must keep a photo's
re-encodes and resizes together. For the grocery packshots and every n-th train photo this makes such copies
(JPEG quality 40-95, half and three-quarter size, WebP, PNG) and brightness-edited ones (x0.9, 0.95, 1.05, 1.1),
and prints, over the copies whose hashes are identical to the original's (those the cache would answer as exact),
the largest colour and brightness difference, and how many brightness-edited copies stay exact. It also hashes
flat pictures of a few grey levels: they all hash alike, and only the brightness signature tells them apart.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from embedder import data
from embedder.hashing import (
    BRIGHTNESS_MAX_DIFFERENCE,
    COLOUR_MAX_DIFFERENCE,
    ImageHashes,
    hashes_of_bytes,
    same_brightness,
)

BRIGHTNESS_EDITS = (0.9, 0.95, 1.05, 1.1)
FLAT_GREYS = (20, 128, 200, 255)


def encoded(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def copies(img: Image.Image) -> dict[str, bytes]:
    """Re-encoded and resized copies of a photo, as shops' and users' pipelines make them."""
    w, h = img.size
    made = {f"jpeg-q{q}": encoded(img, "JPEG", quality=q) for q in (40, 50, 70, 85, 95)}
    made["half-size"] = encoded(img.resize((w // 2, h // 2), Image.Resampling.LANCZOS), "JPEG", quality=85)
    made["three-quarter-size"] = encoded(img.resize((w * 3 // 4, h * 3 // 4), Image.Resampling.BILINEAR), "JPEG",
                                         quality=75)
    made["webp"] = encoded(img, "WEBP", quality=75)
    made["png"] = encoded(img, "PNG")
    return made


def difference(a: bytes, b: bytes) -> int:
    """The largest difference between two signatures' cells."""
    return int(np.abs(np.frombuffer(a, np.uint8).astype(np.int16) - np.frombuffer(b, np.uint8).astype(np.int16)).max())


def identical_hashes(a: ImageHashes, b: ImageHashes) -> bool:
    return a.phash == b.phash and a.dhash == b.dhash


def measure(paths: list[Path]) -> dict:
    colour, brightness, edits = [], [], {f: [0, 0] for f in BRIGHTNESS_EDITS}  # edits: [hash-identical, exact]
    for path in paths:
        with data.naming(path):
            img = Image.open(path).convert("RGB")
        original = hashes_of_bytes(encoded(img, "PNG"))
        for copy in copies(img).values():
            hashes = hashes_of_bytes(copy)
            if identical_hashes(original, hashes):
                colour.append(difference(original.colour, hashes.colour))
                brightness.append(difference(original.brightness, hashes.brightness))
        for factor in BRIGHTNESS_EDITS:
            hashes = hashes_of_bytes(encoded(ImageEnhance.Brightness(img).enhance(factor), "JPEG", quality=90))
            if identical_hashes(original, hashes):
                edits[factor][0] += 1
                edits[factor][1] += same_brightness(original.brightness, hashes.brightness)
    flats = [hashes_of_bytes(encoded(Image.new("RGB", (300, 200), (g, g, g)), "PNG")) for g in FLAT_GREYS]
    return {
        "photos": len(paths),
        "hash_identical_copies": len(colour),
        "colour_max_difference": max(colour, default=None),
        "colour_threshold": COLOUR_MAX_DIFFERENCE,
        "brightness_max_difference": max(brightness, default=None),
        "brightness_p99_difference": float(np.percentile(brightness, 99)) if brightness else None,
        "brightness_threshold": BRIGHTNESS_MAX_DIFFERENCE,
        "brightness_edits": {str(f): {"hash_identical": n, "still_exact": kept, "copies": len(paths)}
                             for f, (n, kept) in edits.items()},
        "flat_greys": list(FLAT_GREYS),
        "flat_greys_hash_alike": all(identical_hashes(flats[0], f) for f in flats),
        "flat_greys_told_apart": all(not same_brightness(a.brightness, b.brightness)
                                     for i, a in enumerate(flats) for b in flats[i + 1:]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=data.grocery_dir(), help="grocery dataset folder")
    parser.add_argument("--every", type=int, default=20, help="take every n-th train photo (and every packshot)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.every < 1:
        parser.error("--every must be at least 1")
    paths = [item.path for item in data.read_grocery_iconic(args.data)]
    paths += [item.path for item in data.read_grocery(args.data, "train")[::args.every]]
    figures = measure(paths)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
