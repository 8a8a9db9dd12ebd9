"""64-bit perceptual hashes (pHash and dHash, via imagehash) used by the broker as exact-match cache keys.

Images go through the same normalisation as the embedding model (EXIF orientation applied, any PIL mode to RGB,
see :mod:`embedder.preprocess`), so a photo and its EXIF-rotated or CMYK/palette/alpha twin hash alike.
Hashes are unsigned 64-bit ints: bit 63 is the first cell of imagehash's 8x8 grid, row-major, which is also the
order of imagehash's hex string (``int(str(imagehash.phash(img)), 16)`` gives the same number for an image
whose shorter side is at most 512 px; larger ones are box-reduced first, for speed).
"""

from __future__ import annotations

from dataclasses import dataclass

import imagehash
import numpy as np
import scipy.fftpack  # noqa: F401  imagehash.phash imports it on its first call: 0.2-0.5 s inside the first search
from PIL import ExifTags, Image, ImageOps

from embedder.preprocess import decode_image, to_rgb

HASH_BITS = 64
_HASH_SIZE = 8  # 8x8 grid -> 64 bits
_MAX_HASH_INPUT_SIDE = 512
_COLOUR_GRID = 8
# Two pictures are the same picture's colours when no cell of their colour signatures differs by more than this
# (in YCbCr units, 0-255). Measured on 231 grocery photos and packshots (scratch script of 2026-12-05): JPEG
# re-encodes at quality 40-70, resizes, WebP, PNG and 2 % crops differ by at most 11; channel-swapped copies by
# 5-170 (5 % of them under 20), greyscale copies by 11-101, a 45 degree hue shift by 7-71. Copies edited for
# brightness, contrast or saturation (up to 23) may fall outside: they are then found through the index.
COLOUR_MAX_DIFFERENCE = 12
# Two pictures are equally bright when no cell of their brightness signatures (luma, Y of the same grid) differs by
# more than this. Re-encodes and resizes whose hashes are identical differ by at most 7 (`python -m
# embedder.signature_margins`); flat or nearly flat pictures of different brightness have identical hashes and
# colours (a flat grey and a flat white square: pHash 0x8000000000000000, dHash 0), which only this tells apart.
BRIGHTNESS_MAX_DIFFERENCE = 12


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageHashes:
    phash: int
    dhash: int
    # The picture's colours: Cb and Cr of an 8x8 grid (128 bytes; see colour_signature). pHash and dHash see
    # brightness only, so a recoloured copy (a product's colour variant, a greyscale copy) hashes alike.
    colour: bytes = b""
    # Its brightness: Y of the same grid (64 bytes; see brightness_signature). The hashes are of brightness
    # *differences*: a flat or nearly flat picture hashes alike at any brightness.
    brightness: bytes = b""

    def hex(self) -> str:
        """32 hex digits, pHash then dHash: a stable string key (for Redis and logs)."""
        return f"{self.phash:016x}{self.dhash:016x}"

    def distance(self, other: ImageHashes) -> tuple[int, int]:
        """Hamming distances (pHash, dHash) to another pair of hashes."""
        return hamming(self.phash, other.phash), hamming(self.dhash, other.dhash)


def _to_uint64(h: imagehash.ImageHash) -> int:
    bits = np.asarray(h.hash, dtype=bool).reshape(-1)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def _upright(img: Image.Image) -> Image.Image:
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001 - corrupt EXIF: the pixels as stored (decode_image does the same)
        return img
    if orientation in (None, 1):
        return img
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - EXIF that parses but cannot be rewritten: as decode_image, keep the pixels
        return img


def image_hashes(img: Image.Image) -> ImageHashes:
    """pHash and dHash of an image (decoded by embedder.preprocess.decode_image, or any PIL image: EXIF
    orientation and mode are normalised here too)."""
    return _hashes_of_upright(to_rgb(_upright(img)))


def _hashes_of_upright(upright: Image.Image) -> ImageHashes:
    """Hashes of an RGB image already turned upright (orientation is never applied twice). The pixels as stored,
    whatever colour profile they carry: a copy with its profile stripped (what many image pipelines do) is then an
    exact match, an sRGB re-export of a profiled image (most grocery packshots carry Adobe RGB) often is not and is
    found through the index. Hashing in sRGB was tried and turned that around (56 of 56 stripped copies matched,
    27 after; 28 of 56 re-exports matched, 56 after): a review of 2026-12-05; the model reads stored pixels too."""
    shorter = min(upright.size)
    if shorter > _MAX_HASH_INPUT_SIDE:
        # imagehash shrinks to 32x32 with Lanczos, which costs ~0.3 s on a 12 MP phone photo; a box
        # reduction to a shorter side of 256-511 px first changes at most 2 of 64 bits on the test images.
        upright = upright.reduce(shorter // (_MAX_HASH_INPUT_SIDE // 2))
    grid = _grid(upright)
    return ImageHashes(
        phash=_to_uint64(imagehash.phash(upright, hash_size=_HASH_SIZE)),
        dhash=_to_uint64(imagehash.dhash(upright, hash_size=_HASH_SIZE)),
        colour=grid[..., 1:].tobytes(),  # colour_signature
        brightness=grid[..., 0].tobytes(),  # brightness_signature
    )


def _grid(rgb: Image.Image) -> np.ndarray:
    """The picture's 8x8 box-averaged grid in YCbCr, (8, 8, 3) uint8."""
    cells = rgb.resize((_COLOUR_GRID, _COLOUR_GRID), Image.Resampling.BOX).convert("YCbCr")
    return np.asarray(cells, dtype=np.uint8)


def colour_signature(rgb: Image.Image) -> bytes:
    """Chroma (Cb, Cr) of the picture's 8x8 box-averaged grid, row-major, 2 bytes a cell. Chroma, not RGB: a
    brighter or darker copy keeps its colours."""
    return _grid(rgb)[..., 1:].tobytes()


def brightness_signature(rgb: Image.Image) -> bytes:
    """Luma (Y) of the same 8x8 grid, row-major, 1 byte a cell."""
    return _grid(rgb)[..., 0].tobytes()


def _within(a: bytes, b: bytes, max_difference: int) -> bool:
    if not a or len(a) != len(b):
        return False
    diff = np.abs(np.frombuffer(a, np.uint8).astype(np.int16) - np.frombuffer(b, np.uint8).astype(np.int16))
    return int(diff.max()) <= max_difference


def same_colours(a: bytes, b: bytes) -> bool:
    """Whether two colour signatures are of the same picture's colours (False when either is missing: an entry
    written before signatures existed cannot be vouched for)."""
    return _within(a, b, COLOUR_MAX_DIFFERENCE)


def same_brightness(a: bytes, b: bytes) -> bool:
    """Whether two brightness signatures are of equally bright pictures (False when either is missing)."""
    return _within(a, b, BRIGHTNESS_MAX_DIFFERENCE)


def hashes_of_bytes(data: bytes, **limits: int) -> ImageHashes:
    """Hashes of encoded image bytes, as the broker computes them for queries and catalogue images alike; raises
    InvalidImageError / ImageTooLargeError like decode_image (`limits`: max_image_bytes, max_image_pixels).

    A JPEG at least twice `_MAX_HASH_INPUT_SIDE` on its shorter side is decoded at a reduced DCT scale that keeps
    it >= 512 px, then box-reduced as `image_hashes` does: a 12 MP photo hashes in ~20 ms instead of ~90 ms. That
    moves a big photo's hashes by up to 2-3 bits from `image_hashes(decode_image(data))`, but re-encoded and
    resized copies stay as close to it as before and different photos as far (`python -m
    embedder.decode_profile`), so every key is computed this one way."""
    return _hashes_of_upright(decode_image(data, draft_min_side=_MAX_HASH_INPUT_SIDE, **limits))


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two 64-bit hashes."""
    return (a ^ b).bit_count()
