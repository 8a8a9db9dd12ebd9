"""Image decoding and preprocessing in one place, shared by training, evaluation, export checks and serving
(the Triton preprocessing model imports this module too).

Decoding applies EXIF orientation, converts any PIL mode (CMYK, LA, P, I;16, RGBA...) to RGB, and refuses
decompression bombs and truncated files with a clear error instead of a crash. Besides Pillow's own formats
(JPEG, PNG, WebP, AVIF, GIF, TIFF, BMP...) it reads HEIF/HEIC, the format iPhones save photos in, through pi-heif.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps

from embedder.errors import ImageTooLargeError, InvalidImageError

try:  # a dependency of the package and of the Triton image; tools run under a bare Python (the GPU check) lack it
    from pi_heif import register_heif_opener
except ImportError:  # pragma: no cover - tests/test_preprocess.py asserts it is there
    HEIF_SUPPORTED = False
else:
    register_heif_opener()
    HEIF_SUPPORTED = True

# ImageNet statistics: the backbone's pretrained weights expect them.
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
DEFAULT_IMAGE_SIZE = 224
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024

# Never silently decode a truncated file as a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# The longest side accepted. Pixels alone bound memory badly for thin images: a 78 KB PNG of 1 x 40,000,000 pixels
# (within the pixel limit) took 850 MB to decode (a row pointer per pixel) and 2.7 GB and 20 s to hash.
MAX_IMAGE_SIDE = 20_000
# Steps Pillow takes in Python while it opens a file: JPEG segments, fill and junk bytes before the first scan;
# PNG chunks; GIF extension sub-blocks before the first image. A 10 MiB JPEG of 2.6 million empty comment markers
# took ~4 s to open, three times per search (decode budget, hashing, Triton). Real files take a few dozen (a PNG
# written in 8 KiB data chunks: about one per 8 KiB).
MAX_HEADER_STEPS = 10_000
# Scans of one JPEG. A progressive JPEG is decoded scan after scan over the whole image: a 377 KB file of 4,000
# tiny repeated scans of 36 Mpx took ~10 s to decode, in the broker and again in Triton, stalling the searches
# behind it (review). Encoders write a dozen or so (libjpeg's progressive script: 10); start-of-scan markers
# inside metadata (an EXIF thumbnail's) count too, which leaves room to spare.
MAX_JPEG_SCANS = 128

# Strips or tiles of a TIFF. Pillow makes a Python tile of each when it opens the file and decodes them one by one:
# a 10 MB file of a 1x2-pixel image in 1.3 million strips took 8 s and ~330 MB in the broker per search, and the
# decode budget counted 2 pixels (review of 2026-12-06). Four times the longest side accepted: a strip per row of
# each plane (planar CMYK or RGBA stores one plane after another) even of the tallest image passes (40,000
# strips took 0.19 s to hash; 80,000 about twice that).
MAX_TIFF_STRIPS = 4 * MAX_IMAGE_SIDE
# The magic numbers Pillow opens as TIFF: II*\0 and MM\0*, BigTIFF's II+\0 and MM\0+, and two it reads as TIFF
# anyway ("invalid header, assume ...-endian"), which let a file past a check of the first two (review).
_TIFF_MAGIC = frozenset((b"II*\x00", b"MM\x00*", b"MM*\x00", b"II\x00*", b"II+\x00", b"MM\x00+"))
_TIFF_STRIP_TAGS = frozenset((273, 279, 324, 325))  # StripOffsets, StripByteCounts, TileOffsets, TileByteCounts
# ImageWidth, ImageLength, SamplesPerPixel, RowsPerStrip, PlanarConfiguration, TileWidth, TileLength
_TIFF_LAYOUT_TAGS = frozenset((256, 257, 277, 278, 284, 322, 323))
_TIFF_INTEGER_FORMATS = {3: "H", 4: "I", 16: "Q"}  # SHORT, LONG, LONG8: a single value sits left-justified

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start of frame: baseline, extended, progressive, lossless..., not DHT (C4), JPG (C8) or DAC (CC).
_JPEG_FRAME_MARKERS = frozenset(0xFFC0 + n for n in range(16)) - {0xFFC4, 0xFFC8, 0xFFCC}


def check_header_segments(data: bytes, *, limit: int = MAX_HEADER_STEPS) -> None:
    """Raise InvalidImageError for a JPEG, PNG or GIF whose header would take Pillow more than `limit` steps to
    read; walks it the way Pillow does, lengths only. Anything malformed is left to the decoder to report."""
    is_jpeg = data.startswith(b"\xff\xd8\xff")
    if is_jpeg:
        walk = _jpeg_steps(data)
    elif data.startswith(_PNG_SIGNATURE):
        walk = _png_steps(data)
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        walk = _gif_steps(data)
    elif data[:4] in _TIFF_MAGIC:
        _check_tiff_strips(data, limit=limit)
        return
    else:
        return
    for steps, _ in enumerate(walk, start=1):
        if steps > limit:
            raise InvalidImageError(f"image header of more than {limit} segments (or chunks, or padding bytes): "
                                    "not a real image")
    # After the header: the scans, each a pass of the decoder over the whole image.
    if is_jpeg and _jpeg_scans(data, stop_after=MAX_JPEG_SCANS) > MAX_JPEG_SCANS:
        raise InvalidImageError(f"JPEG of more than {MAX_JPEG_SCANS} scans: not a real photo (each scan is a pass "
                                "over the whole image)")


# The next marker from a position, junk and fill bytes skipped at C speed: in entropy-coded data a 0xFF byte is
# followed by 0x00 (an escaped 0xFF) or a restart marker (0xD0-0xD7), which start no segment; in a run of 0xFF
# (fill) the code is the byte after the last one. No `\xff+`: a long run not followed by a code cost quadratic
# time (40,000 bytes of 0xFF took 11 s, review).
_JPEG_NEXT_MARKER = re.compile(rb"\xff([^\x00\xd0-\xd7\xff])")
# Markers followed by a length-prefixed segment (as libjpeg reads them): SOFn, DHT, DAC, SOS, DQT, DNL, DRI, DHP,
# EXP, APPn, COM. libjpeg reads no length after the others (where it expects a restart marker, it skips a
# reserved one and scans on), so neither may this walk: skipping one as a segment hid scans behind it (review).
_JPEG_SEGMENT_CODES = frozenset([*range(0xC0, 0xD0), *range(0xDA, 0xF0), 0xFE])


def _jpeg_scans(data: bytes, *, stop_after: int, max_segments: int = MAX_HEADER_STEPS) -> int:
    """Start-of-scan markers of the image, up to its end-of-image marker (not those in metadata, nor in what
    follows the image: a phone's motion photo appends a video, whose bytes held one b"\xff\xda" per 64 KiB and
    got 12 MB photos refused, review); counting stops past `stop_after`. More than `max_segments` segments in
    all is refused (InvalidImageError): this walk is Python, and real files have a few dozen."""
    scans, pos, segments = 0, 2, 0
    while scans <= stop_after:
        found = _JPEG_NEXT_MARKER.search(data, pos)
        if found is None:
            break
        code, pos = found.group(1)[0], found.end()  # just past the marker's code
        if code == 0xD9:  # end of image
            break
        segments += 1
        if segments > max_segments:
            raise InvalidImageError(f"JPEG of more than {max_segments} segments: not a real image")
        if code not in _JPEG_SEGMENT_CODES:  # TEM, SOI, reserved: no length
            continue
        pos += int.from_bytes(data[pos:pos + 2], "big")  # past the segment (a scan's header)
        if code == 0xDA:  # start of scan: its entropy-coded data runs to the next marker
            scans += 1
    return scans


def _jpeg_steps(data: bytes) -> Iterator[None]:
    """JpegImagePlugin's loop: one step per junk byte, fill byte, escaped 0xFF and segment, up to start of scan."""
    from PIL.JpegImagePlugin import MARKER

    pos, end = 2, len(data)  # at the 0xFF after start of image, where Pillow's loop starts
    while pos < end:
        yield
        if data[pos] != 0xFF:
            pos += 1  # junk
            continue
        if pos + 1 >= end:
            return
        code = 0xFF00 | data[pos + 1]
        if code in MARKER:
            if code == 0xFFDA:  # start of scan: the header is over
                return
            if code in _JPEG_FRAME_MARKERS and pos + 10 <= end:
                # Pillow adds a component for every 3 bytes of the frame header, whatever its count says: 160
                # oversized ones took 0.9 s and 366 MB to open.
                length, components = int.from_bytes(data[pos + 2:pos + 4], "big"), data[pos + 9]
                if length != 8 + 3 * components:
                    raise InvalidImageError(f"JPEG frame header of {length} bytes for {components} components")
            # a marker with a handler reads its length-prefixed segment; the others (SOI, EOI, RSTn) nothing
            pos += 2 + (int.from_bytes(data[pos + 2:pos + 4], "big") if MARKER[code][2] is not None else 0)
        elif code == 0xFFFF:
            pos += 1  # a fill byte
        elif code == 0xFF00:
            pos += 2  # an escaped 0xFF
        else:
            return  # Pillow refuses it: "no marker found"


def _check_tiff_strips(data: bytes, *, limit: int) -> None:
    """Refuse a TIFF (or BigTIFF) whose first directory, the one Pillow opens, has more than `limit` entries, more
    than MAX_TIFF_STRIPS strips or tiles, or more of them than its own layout has (rows per strip, or tile size,
    and planes): Pillow decodes every strip it is given, starting again from the top of the image when they run
    past the bottom, so 80,000 strips of 999 rows of a 1,000-row image decoded it 40,000 times (4 s for a 1.6 MB
    file; 75 s for a 16 Mpx one, review of 2026-12-06). Lengths and values only; anything malformed is left to the
    decoder."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2] == 0x2B  # as Pillow reads it (TiffImagePlugin: ifh[2] == 43; MM\0+ is read as classic TIFF)
    count_size, entry_size, offset_at, value_at = (8, 20, 8, 12) if big else (2, 12, 4, 8)
    offset_format, count_format = (f"{order}Q", f"{order}Q") if big else (f"{order}I", f"{order}H")
    try:
        (ifd,) = struct.unpack_from(offset_format, data, offset_at)
        if ifd >= len(data):  # an offset past the file (2**63 overflowed unpack_from's offset)
            return
        (entries,) = struct.unpack_from(count_format, data, ifd)
    except struct.error:
        return
    if entries > limit:
        raise InvalidImageError(f"TIFF directory of {entries} entries: not a real image")
    value_count_format = f"{order}Q" if big else f"{order}I"
    pieces = 0  # the most strips or tiles any of their tags lists
    layout: dict[int, int] = {}  # single SHORT/LONG/LONG8 values of the layout tags
    for i in range(entries):
        at = ifd + count_size + i * entry_size
        if at >= len(data):
            return
        try:
            tag, kind = struct.unpack_from(f"{order}HH", data, at)
            (values,) = struct.unpack_from(value_count_format, data, at + 4)
            if tag in _TIFF_LAYOUT_TAGS and values == 1 and kind in _TIFF_INTEGER_FORMATS:
                (layout[tag],) = struct.unpack_from(f"{order}{_TIFF_INTEGER_FORMATS[kind]}", data, at + value_at)
        except struct.error:
            return
        if tag in _TIFF_STRIP_TAGS:
            pieces = max(pieces, values)
    if pieces > MAX_TIFF_STRIPS:
        raise InvalidImageError(f"TIFF of {pieces} strips or tiles (at most {MAX_TIFF_STRIPS}): not a real "
                                "image (each is decoded on its own)")
    width, height = layout.get(256, 0), layout.get(257, 0)
    if not width or not height:
        return  # the decoder says what is wrong
    planes = layout.get(277, 1) if layout.get(284, 1) == 2 else 1
    if layout.get(322) and layout.get(323):  # tiles
        expected = -(-width // layout[322]) * -(-height // layout[323]) * planes
    else:
        rows = min(layout.get(278) or height, height)
        expected = -(-height // rows) * planes
    if pieces > expected:
        raise InvalidImageError(f"TIFF of {pieces} strips or tiles where its layout has {expected}: not a real "
                                "image (the decoder would decode the image again for every extra one)")


def _png_steps(data: bytes) -> Iterator[None]:
    """Every chunk up to IEND (Pillow reads those after the image data too, when it loads); a compressed text
    chunk counts as 100 (Pillow inflates up to 1 MB of each, 64 MB in all), and a second colour profile is refused
    (the format allows one; Pillow inflated each of 9,000 for 20 s)."""
    pos, end, profiles = len(_PNG_SIGNATURE), len(data), 0
    while pos + 8 <= end:
        kind = data[pos + 4:pos + 8]
        if kind == b"iCCP":
            profiles += 1
            if profiles > 1:
                raise InvalidImageError("PNG with more than one colour profile (iCCP chunk)")
        for _ in range(100 if kind in (b"zTXt", b"iTXt") else 1):
            yield
        if kind == b"IEND":
            return
        pos += 12 + int.from_bytes(data[pos:pos + 4], "big")


def _gif_steps(data: bytes) -> Iterator[None]:
    """Extension blocks and their sub-blocks before the first image (GifImagePlugin reads them in Python)."""
    end = len(data)
    if end < 13:
        return
    pos = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)  # the global colour table
    while pos < end and data[pos] not in (0x2C, 0x3B):  # up to the first image, or the end
        yield
        if data[pos] != 0x21:
            pos += 1  # a stray byte: Pillow skips it, one by one
            continue
        pos += 2  # an extension: its sub-blocks
        while pos < end and data[pos]:
            yield
            pos += 1 + data[pos]
        pos += 1


def decode_image(
    data: bytes,
    *,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    draft_min_side: int | None = None,
) -> Image.Image:
    """Decode encoded bytes into an upright RGB image, or raise InvalidImageError / ImageTooLargeError.

    `draft_min_side`: for callers that only need a small image (the model's input), JPEGs are decoded at a
    reduced DCT scale (1/2, 1/4 or 1/8) that keeps both sides >= draft_min_side: several times faster on
    12 MP phone photos. None (the default; perceptual hashing uses it) decodes at full resolution.
    """
    if not data:
        raise InvalidImageError("empty image")
    if len(data) > max_image_bytes:
        raise ImageTooLargeError(f"image is {len(data)} bytes, limit is {max_image_bytes}")
    check_header_segments(data)
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise _too_many_pixels(exc, max_image_pixels) from exc
    except Exception as exc:  # PIL raises many types for garbage input
        raise InvalidImageError("not a decodable image (unknown format or corrupt header)") from exc
    width, height = img.size
    if width <= 0 or height <= 0:
        raise InvalidImageError("image has no pixels")
    if width * height > max_image_pixels:
        raise ImageTooLargeError(f"image is {width}x{height} pixels, limit is {max_image_pixels} pixels")
    if max(width, height) > MAX_IMAGE_SIDE:
        raise ImageTooLargeError(f"image is {width}x{height} pixels, the longest side accepted is {MAX_IMAGE_SIDE}")
    if draft_min_side and img.format in ("JPEG", "MPO"):  # MPO: phone JPEGs with a multi-picture block
        img.draft(None, (draft_min_side, draft_min_side))
    # A PNG's tRNS colour key is given at the image's bit depth, which Pillow decodes to 8 bits but leaves the key
    # as it is: keyed 16-bit truecolour (high bytes only: the key matched other pixels, a review: cosine 0.91 with
    # the 8-bit file) and 2- and 4-bit greyscale (scaled to 0..255) are matched at their own depth.
    rawmode = str(img.tile[0][3]) if img.format == "PNG" and len(img.tile) == 1 else ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            if "transparency" in img.info and rawmode in _LOW_DEPTH_GREY_SCALE:
                img.info["transparency"] = int(img.info["transparency"]) * _LOW_DEPTH_GREY_SCALE[rawmode]
            elif rawmode == "RGB;16B" and isinstance(img.info.get("transparency"), tuple):
                img = _keyed_16_bit_rgb(img, data)
            img = _upright(img)
            return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_many_pixels(exc, max_image_pixels) from exc
    except Exception as exc:
        raise InvalidImageError(f"could not decode image: {exc}") from exc


# Pillow's 8-bit levels of 2- and 4-bit greyscale PNG samples.
_LOW_DEPTH_GREY_SCALE = {"L;2": 85, "L;4": 17}


def _keyed_16_bit_rgb(img: Image.Image, data: bytes) -> Image.Image:
    """A 16-bit truecolour PNG with a tRNS colour key, composited on white (as `to_rgb` does transparency): white
    exactly where all 16 bits of a pixel equal the key (as browsers and libpng compare it). Pillow decodes the
    high bytes only; the low bytes are decoded by reading the same samples as little-endian. Channel by channel,
    against scalars: whole-array comparisons with an int64 key took 2 s and 1 GB for 7000x7000 (review)."""
    key = [int(level) for level in img.info["transparency"]]
    low = Image.open(io.BytesIO(data))
    low.tile = [tile._replace(args="RGB;16L") for tile in low.tile]
    low.load()
    low_bytes = np.asarray(low)
    keyed = low_bytes[..., 0] == (key[0] & 255)
    for channel in (1, 2):
        keyed &= low_bytes[..., channel] == (key[channel] & 255)
    del low_bytes, low
    out = np.array(img)
    for channel in range(3):
        keyed &= out[..., channel] == (key[channel] >> 8)
    out[keyed] = 255
    rgb = Image.fromarray(out, mode="RGB")
    rgb.info = {k: v for k, v in img.info.items() if k != "transparency"}  # EXIF orientation, ICC profile
    return rgb


def _too_many_pixels(exc: Exception, max_image_pixels: int) -> ImageTooLargeError:
    """Pillow's own refusal, told with our limit: its message named Pillow's (178,956,970 pixels), not the one
    the caller configured (review of 2026-12-05)."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(found.group(1))} pixels" if found else "more pixels than Pillow decodes"
    return ImageTooLargeError(f"image is {size}, limit is {max_image_pixels} pixels")


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a malformed EXIF block leaves the pixels as stored rather than
    rejecting an image whose pixels decoded fine."""
    try:
        if img.getexif().get(ExifTags.Base.Orientation, 1) not in _TURNING_ORIENTATIONS:
            return img  # exif_transpose would return a copy: 160 MB more for a 40 Mpx RGBA image
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - PIL raises several types on corrupt EXIF (struct.error, SyntaxError, ...)
        return img


_TURNING_ORIENTATIONS = frozenset(range(2, 9))  # EXIF orientations 2-8 flip or rotate; 1 and others leave as is


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white, as shops show packshots."""
    if "transparency" in img.info and img.mode in ("1", "L", "RGB", "I;16", "I;16B", "I;16L", "I;16N", "I"):
        # A tRNS colour key (PNG greyscale/truecolour) is transparency too: composite it on white like alpha.
        key = img.info["transparency"]
        rgb = to_rgb(_without_transparency(img))
        mask = _key_mask(img, key)
        if mask is not None:
            out = np.asarray(rgb).copy()
            out[mask] = 255
            return Image.fromarray(out, mode="RGB")
        return rgb
    if img.mode == "RGB":
        return img
    # Whole-image float64 arrays took 1.1-1.3 GB for a 40 Mpx 16-bit or float image of ~100 KB (a review: a dev
    # broker's 1 GiB limit passed at one search), where the decode budget counts ~12 bytes a pixel: 16-bit levels
    # go through a lookup table, and scaled ranges are computed a block of rows at a time.
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit levels are absolute (0..65535), as a browser shows them: no per-image auto-contrast, and
        # values of at most 255 are near black, not 8-bit levels.
        return Image.fromarray(_LEVELS_16_TO_8[np.asarray(img)], mode="L").convert("RGB")
    if img.mode == "I":
        # 32-bit integers. Decoded from a file (16-bit PGM/PPM, which Pillow scales to 0..65535): 16-bit levels,
        # absolute like I;16's. Converted in memory from an 8-bit mode: 0..255 as they are. Values outside
        # 0..65535 have no known scale and are stretched to their own range.
        arr = np.asarray(img)
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0 or hi > 65535:
            out = _stretched(arr, float(lo), float(hi), rounded=True)
        elif img.format is not None or hi > 255:
            out = _LEVELS_16_TO_8[arr]
        else:
            out = arr.astype(np.uint8)
        return Image.fromarray(out, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img)
        finite = np.isfinite(arr)
        if not finite.all() and not finite.any():
            raise InvalidImageError("float image without a single finite pixel")
        # One NaN or inf pixel made the whole range NaN, and the image black (review): the range comes from the
        # finite pixels, and the others take its ends (NaN the low one).
        lo = float(np.min(arr, where=finite, initial=np.inf)) if arr.size else 0.0
        hi = float(np.max(arr, where=finite, initial=-np.inf)) if arr.size else 0.0
        return Image.fromarray(_stretched(arr, lo, hi, rounded=False), mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")  # convert() to the same mode copies
        composite = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return composite.convert("RGB")
    return img.convert("RGB")


# round(v / 257) for every 16-bit level v (no ties: 257k + 128.5 is never a whole number)
_LEVELS_16_TO_8 = ((np.arange(65536, dtype=np.uint32) * 2 + 257) // 514).astype(np.uint8)
# Pixels scaled at a time by _stretched (its float64 temporaries: ~8 MB each)
_STRETCH_BLOCK_PIXELS = 1 << 20


def _stretched(arr: np.ndarray, lo: float, hi: float, *, rounded: bool) -> np.ndarray:
    """`arr` (2-d) mapped from lo..hi to 0..255 as uint8 (NaN to lo's level, infinities to the ends), computed in
    float64 one block of rows at a time."""
    out = np.empty(arr.shape, dtype=np.uint8)
    rows = max(1, _STRETCH_BLOCK_PIXELS // max(1, arr.shape[1] if arr.ndim == 2 else 1))
    for start in range(0, arr.shape[0], rows):
        block = arr[start:start + rows].astype(np.float64)
        if not np.isfinite(block).all():
            block = np.nan_to_num(block, nan=lo, posinf=hi, neginf=lo)
        block = (block - lo) / ((hi - lo) or 1.0) * 255.0
        if rounded:
            block = block.round()
        out[start:start + rows] = block.clip(0, 255).astype(np.uint8)
    return out


def _without_transparency(img: Image.Image) -> Image.Image:
    copy = img.copy()
    copy.info = {k: v for k, v in img.info.items() if k != "transparency"}
    return copy


def _key_mask(img: Image.Image, key) -> np.ndarray | None:
    """Pixels equal to a tRNS colour key (int for greyscale, RGB tuple for truecolour)."""
    arr = np.asarray(img)
    if arr.ndim == 2 and isinstance(key, int):
        return arr == key
    if arr.ndim == 3 and isinstance(key, tuple) and len(key) == arr.shape[2]:
        if max(key) > np.iinfo(arr.dtype).max:  # a key no pixel can have (cast, 256 wrapped to 0: review)
            return None
        return (arr == np.asarray(key, dtype=arr.dtype)).all(axis=2)
    return None


def resize_for_model(img: Image.Image, size: int = DEFAULT_IMAGE_SIZE) -> Image.Image:
    """Shorter side to `size`, then centre crop to size x size (the evaluation transform).

    Only the centre crop is resampled (PIL's `box`), which gives the same pixels (at most 1 level apart) as
    resizing the whole image first, but never allocates the full resized image: a 1x10000 strip would
    otherwise become 224x2240000 pixels.
    """
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    sx, sy = w / new_w, h / new_h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return img.resize((size, size), Image.BILINEAR, box=box)


def normalise(img: Image.Image) -> np.ndarray:
    """RGB image -> float32 CHW array normalised with the ImageNet statistics."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - MEAN) / STD
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def image_to_tensor(img: Image.Image, size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """Decoded RGB image -> model input, float32 (3, size, size)."""
    return normalise(resize_for_model(to_rgb(img), size))


# A JPEG whose shorter side is at least twice this factor times the model's input is decoded at a reduced DCT
# scale that keeps it >= DRAFT_FACTOR * size, then resized as usual. A 12 MP photo then decodes in ~20 ms instead
# of ~120 ms, and its embedding stays within cosine 0.995 of the full decode's (0.999 on average; 99 val photos
# at phone sizes, `python -m embedder.decode_profile`), several times closer than re-saving the photo as a JPEG
# moves it (0.985 / 0.993). Smaller photos (the grocery data set's 348x464 included) decode exactly as before.
DRAFT_FACTOR = 2


def preprocess_bytes(data: bytes, size: int = DEFAULT_IMAGE_SIZE, **limits) -> np.ndarray:
    """Encoded bytes -> model input, float32 (3, size, size); big JPEGs are decoded at a reduced scale."""
    return image_to_tensor(decode_image(data, draft_min_side=DRAFT_FACTOR * size, **limits), size)
