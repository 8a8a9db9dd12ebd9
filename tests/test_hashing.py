"""Perceptual hashes on real odd images: stable under re-encodes/resizes/mode changes, EXIF-aware, discriminative."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import imagehash
import pytest
from PIL import Image, ImageOps

from embedder.errors import InvalidImageError
from embedder.hashing import ImageHashes, hamming, hashes_of_bytes, image_hashes
from embedder.preprocess import decode_image

DATA_DIR = Path(os.environ.get("IMGSEARCH_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
ODD = DATA_DIR / "odd-images"
BRIDGE = ODD / "pdq" / "bridge-mods"
NEAR_BITS = 6  # "within a few bits"
FAR_BITS = 16  # unrelated photos differ in about half of the 64 bits


def _hashes(path: Path) -> ImageHashes:
    return hashes_of_bytes(path.read_bytes())


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_hashes_are_unsigned_64_bit_and_match_imagehash_hex():
    img = Image.open(ODD / "imagededup" / "base_images" / "ukbench00120.jpg")  # 640x480, upright: hashed as is
    hashes = image_hashes(img)
    for value in (hashes.phash, hashes.dhash):
        assert 0 <= value < 2**64
    assert hashes.phash == int(str(imagehash.phash(img.convert("RGB"))), 16)
    assert hashes.dhash == int(str(imagehash.dhash(img.convert("RGB"))), 16)
    assert len(hashes.hex()) == 32 and int(hashes.hex()[:16], 16) == hashes.phash


def test_hamming():
    assert hamming(0, 0) == 0
    assert hamming(0, 2**64 - 1) == 64
    assert hamming(0b1011, 0b0001) == 2


@pytest.mark.parametrize(
    "name",
    ["blur-a-little.jpg", "high-contrast.jpg", "high-saturation.jpg", "sharpen-a-little.jpg",
     "shrink-a-little.jpg", "shrink-a-lot.jpg", "square-256x256.jpg"],
)
def test_edits_of_one_photo_stay_within_a_few_bits(name):
    original, edited = _hashes(BRIDGE / "aaa-orig.jpg"), _hashes(BRIDGE / name)
    assert max(original.distance(edited)) <= NEAR_BITS, name


def test_reencodes_and_resizes_stay_within_a_few_bits():
    img = Image.open(ODD / "imagededup" / "base_images" / "ukbench00120.jpg").convert("RGB")
    original = image_hashes(img)
    variants = [
        hashes_of_bytes(_jpeg(img, 30)),
        hashes_of_bytes(_jpeg(img.resize((160, 120)), 90)),
        hashes_of_bytes(_jpeg(img.resize((1280, 960)), 75)),
        _hashes(ODD / "imagededup" / "mixed_images" / "ukbench00120_resize.jpg"),
        _hashes(ODD / "imagededup" / "ukbench00120_gray.jpg"),
    ]
    for variant in variants:
        assert max(original.distance(variant)) <= NEAR_BITS
    # The same photo stored in other formats hashes identically or nearly so.
    formats = sorted((ODD / "imagededup" / "formats_images").glob("ukbench09380.*"))
    assert len(formats) >= 5
    reference = _hashes(ODD / "imagededup" / "base_images" / "ukbench09380.jpg")
    for path in formats:
        assert max(reference.distance(_hashes(path))) <= NEAR_BITS, path.name


def test_every_pil_mode_hashes_like_the_original():
    reference = _hashes(ODD / "pdq" / "misc-images" / "modes" / "original.jpg")
    files = [p for p in sorted((ODD / "pdq" / "misc-images" / "modes").iterdir()) if p.suffix != ".md"]
    assert len(files) >= 14
    for path in files:
        assert max(reference.distance(_hashes(path))) <= NEAR_BITS, path.name


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_files_hash_like_their_upright_originals(orientation):
    path = ODD / "pdq" / "reg-test-input" / "exif-rotn" / f"exif-rotn-{orientation}.jpg"
    raw = Image.open(path)
    assert raw.getexif().get(0x0112) == orientation
    # The upright original: the pixels physically rotated, re-encoded without any EXIF.
    upright = ImageOps.exif_transpose(raw).convert("RGB")
    upright_bytes = _jpeg(upright, 95)
    assert Image.open(io.BytesIO(upright_bytes)).getexif().get(0x0112) is None
    assert max(_hashes(path).distance(hashes_of_bytes(upright_bytes))) <= NEAR_BITS
    # Ignoring the tag would hash the sideways/upside-down pixels: far from the upright photo.
    raw_pixels = Image.frombytes("RGB", raw.size, raw.convert("RGB").tobytes())  # no EXIF attached
    assert hamming(image_hashes(raw_pixels).phash, _hashes(path).phash) >= FAR_BITS


def test_large_images_are_reduced_first_without_changing_the_hash_much():
    img = decode_image((ODD / "pdq" / "reg-test-input" / "exif-rotn" / "exif-rotn-6.jpg").read_bytes())
    assert min(img.size) > 512
    full = (int(str(imagehash.phash(img)), 16), int(str(imagehash.dhash(img)), 16))
    fast = image_hashes(img)
    assert hamming(full[0], fast.phash) <= 3 and hamming(full[1], fast.dhash) <= 3


def test_image_hashes_applies_exif_to_undecoded_images_too():
    path = ODD / "pdq" / "reg-test-input" / "exif-rotn" / "exif-rotn-6.jpg"
    assert image_hashes(Image.open(path)) == image_hashes(decode_image(path.read_bytes()))


def test_a_big_jpeg_is_hashed_from_a_reduced_decode_and_its_copies_still_match():
    """A real 12 MP phone photo: hashes_of_bytes decodes it at 1/4 scale (>= 512 px), a few bits from the full
    decode's hashes; re-saved and shrunk copies (which decode at full or other scales) stay within the radius."""
    path = ODD / "pdq" / "reg-test-input" / "exif-rotn" / "exif-rotn-6.jpg"
    data = path.read_bytes()
    reduced = hashes_of_bytes(data)
    full = image_hashes(decode_image(data))
    assert reduced != full and max(reduced.distance(full)) <= 3
    img = decode_image(data)
    for copy in (_jpeg(img, 70), _jpeg(img.resize((img.width * 6 // 10, img.height * 6 // 10)), 90),
                 _jpeg(img.resize((img.width * 3 // 10, img.height * 3 // 10)), 80)):
        assert max(reduced.distance(hashes_of_bytes(copy))) <= 5  # the broker's default radius


def test_physically_rotated_copies_match_once_turned_back():
    dih = ODD / "pdq" / "reg-test-input" / "dih"
    original = _hashes(dih / "bridge-1-original.jpg")
    turned_back = Image.open(dih / "bridge-2-rotate-90.jpg").transpose(Image.Transpose.ROTATE_270)
    assert max(original.distance(image_hashes(turned_back))) <= NEAR_BITS
    # Hashes are not rotation invariant: a rotated copy is a different key.
    assert original.distance(_hashes(dih / "bridge-3-rotate-180.jpg"))[0] >= FAR_BITS


def test_different_photos_are_far_apart():
    photos = sorted((ODD / "imagededup" / "base_images").glob("*.jpg"))
    assert len(photos) == 10
    hashes = [_hashes(p) for p in photos]
    for i in range(len(hashes)):
        for j in range(i + 1, len(hashes)):
            ph, dh = hashes[i].distance(hashes[j])
            assert ph >= FAR_BITS and dh >= FAR_BITS - 4, (photos[i].name, photos[j].name, ph, dh)


def test_truncated_jpeg_is_a_clear_error():
    with pytest.raises(InvalidImageError):
        _hashes(ODD / "imagededup" / "mixed_images" / "ukbench09268_corrupt.jpg")
    with pytest.raises(InvalidImageError):
        hashes_of_bytes(b"")


def _exif_with_orientation_6_and(extra: bytes) -> bytes:
    """A big-endian EXIF block: Orientation = 6 plus one more IFD0 entry (12 bytes, `extra`)."""
    ifd = struct.pack(">H", 2) + struct.pack(">HHI", 0x0112, 3, 1) + struct.pack(">H", 6) + b"\0\0" + extra
    return b"Exif\0\0MM\0*" + struct.pack(">I", 8) + ifd + b"\0\0\0\0"


@pytest.mark.parametrize(
    "extra",
    [
        struct.pack(">HHI", 0x0100, 2, 4) + b"abc\0",  # ImageWidth as ASCII
        struct.pack(">HHI", 0x0101, 11, 1) + struct.pack(">f", 2.5),  # ImageLength as FLOAT
    ],
    ids=["width-as-ascii", "length-as-float"],
)
def test_exif_that_cannot_be_rewritten_is_hashed_not_a_crash(extra):
    """EXIF that parses but cannot be written back makes PIL's exif_transpose raise a raw struct.error; the
    decoder keeps the stored pixels then, and hashing must too (it reached the broker as INTERNAL)."""
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), (10, 200, 30)).save(buffer, format="JPEG", exif=_exif_with_orientation_6_and(extra))
    hashes = hashes_of_bytes(buffer.getvalue())
    assert hashes == image_hashes(decode_image(buffer.getvalue()))


def test_colours_tell_a_recoloured_copy_from_a_re_encoded_one():
    """pHash and dHash see brightness only: a greyscale or channel-swapped copy hashes like the original. The
    colour signature keeps re-encodes and resizes together (measured: <= 11 apart on 231 grocery photos) and
    such copies apart (the thresholds' measurement is in embedder.hashing)."""
    from embedder.hashing import same_colours

    photo = Image.open(ODD / "imagededup" / "base_images" / "ukbench00120.jpg").convert("RGB")
    original = hashes_of_bytes(_jpeg(photo, 95))
    assert len(original.colour) == 128
    for copy in (_jpeg(photo, 60), _jpeg(photo.resize((320, 240)), 80)):
        assert same_colours(original.colour, hashes_of_bytes(copy).colour)
    y, cb, cr = photo.convert("YCbCr").split()
    swapped = Image.merge("YCbCr", (y, cr, cb)).convert("RGB")  # blue and red tones trade places
    for recoloured in (photo.convert("L").convert("RGB"), swapped):
        copy = hashes_of_bytes(_jpeg(recoloured, 95))
        assert max(original.distance(copy)) <= NEAR_BITS  # the hashes cannot tell them apart
        assert not same_colours(original.colour, copy.colour)
    assert not same_colours(b"", original.colour) and not same_colours(original.colour, b"")


def test_a_packshot_with_its_colour_profile_stripped_hashes_as_the_original():
    """Image pipelines often strip a picture's colour profile and keep its pixels: that copy is the same picture
    to the cache (hashing in sRGB, tried on 2026-12-05, lost 29 of 56 such copies of the grocery packshots)."""
    from PIL import ImageCms

    def profile(path: Path) -> str:
        icc = Image.open(path).info.get("icc_profile")
        return ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc))) if icc else ""

    iconic = sorted((DATA_DIR / "grocery" / "iconic-images-and-descriptions").rglob("*.jpg"))
    tagged = [path for path in iconic if "adobe" in profile(path).lower()][:12]
    assert len(tagged) == 12
    for path in tagged:
        img = Image.open(path)
        img.load()
        img.info.pop("icc_profile")
        stripped = io.BytesIO()
        img.save(stripped, "PNG")  # the same pixels, no profile
        assert "icc_profile" not in Image.open(io.BytesIO(stripped.getvalue())).info
        assert hashes_of_bytes(stripped.getvalue()) == hashes_of_bytes(path.read_bytes()), path.name


def test_brightness_tells_flat_pictures_apart_and_keeps_re_encodes_together():
    """Flat pictures hash alike at any brightness (the hashes are of brightness differences) and have the same
    colours: a grey query was an exact cache hit of a white packshot. The brightness signature tells them apart
    and keeps a photo's re-encodes and resizes together (`python -m embedder.signature_margins` measures that on
    the grocery photos)."""
    from embedder.hashing import same_brightness, same_colours

    def flat(grey: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (300, 200), (grey, grey, grey)).save(buffer, format="PNG")
        return buffer.getvalue()

    white, grey = hashes_of_bytes(flat(255)), hashes_of_bytes(flat(128))
    assert (white.phash, white.dhash) == (grey.phash, grey.dhash) and same_colours(white.colour, grey.colour)
    assert len(white.brightness) == 64 and not same_brightness(white.brightness, grey.brightness)
    photo = Image.open(ODD / "imagededup" / "base_images" / "ukbench00120.jpg").convert("RGB")
    original = hashes_of_bytes(_jpeg(photo, 95))
    for copy in (_jpeg(photo, 60), _jpeg(photo.resize((320, 240)), 80)):
        assert same_brightness(original.brightness, hashes_of_bytes(copy).brightness)
    assert not same_brightness(b"", original.brightness) and not same_brightness(original.brightness, b"")


def test_signature_margins_measures_copies_of_real_photos():
    """`python -m embedder.signature_margins` on two packshots: their hash-identical copies fall within both
    thresholds, and flat greys hash alike but are told apart."""
    from embedder import data, signature_margins

    paths = [item.path for item in data.read_grocery_iconic(DATA_DIR / "grocery")[:2]]
    figures = signature_margins.measure(paths)
    assert figures["photos"] == 2 and figures["hash_identical_copies"] > 0
    assert figures["colour_max_difference"] <= figures["colour_threshold"]
    assert figures["brightness_max_difference"] <= figures["brightness_threshold"]
    assert figures["flat_greys_hash_alike"] and figures["flat_greys_told_apart"]
