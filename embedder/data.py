"""Catalogues of product photos (CSV, folders per product, the grocery dataset), the group-aware split, the
in-memory image cache and the training augmentations (PIL/numpy only: the project ships no torchvision).
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from embedder.errors import InputFileError
from embedder.preprocess import decode_image, image_to_tensor, normalise
from imgsearch.errors import ImgsearchError

DATA_DIR_ENV_VAR = "IMGSEARCH_DATA_DIR"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def data_dir() -> Path:
    """The shared data folder: $IMGSEARCH_DATA_DIR, else ../shared/data next to the repository."""
    override = os.environ.get(DATA_DIR_ENV_VAR)
    return Path(override) if override else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def grocery_dir() -> Path:
    return data_dir() / "grocery"


@dataclass(frozen=True, kw_only=True)
class CatalogueImage:
    path: Path
    product_id: str
    category: str = ""


def read_catalogue_csv(csv_path: Path) -> list[CatalogueImage]:
    """Rows `path, product_id[, category]`; a header row is allowed; relative paths are relative to the CSV."""
    try:
        return _read_catalogue_csv(csv_path)
    except UnicodeDecodeError as exc:  # Excel's plain "CSV (Comma delimited)" is cp1252
        raise InputFileError(f"{csv_path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as "
                             "\"CSV UTF-8\"") from exc


def _read_catalogue_csv(csv_path: Path) -> list[CatalogueImage]:
    items = []
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which made its header row a file name.
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        for row in csv.reader(handle):
            row = [cell.strip() for cell in row]
            # a header row: `path, product_id, ...`, or `image, ...` as `imgsearch ingest` reads it
            if not row or not row[0] or row[0].startswith("#") or row[0].lower() in ("path", "image"):
                continue
            if len(row) < 2 or not row[1]:  # an empty product id was one product "" of every such row (review)
                raise InputFileError(f"{csv_path}: row {row!r} needs at least path and product id")
            path = Path(row[0])
            items.append(CatalogueImage(path=path if path.is_absolute() else csv_path.parent / path,
                                        product_id=row[1], category=row[2] if len(row) > 2 else ""))
    return items


def read_catalogue_dir(root: Path) -> list[CatalogueImage]:
    """One folder per product (`root/<product_id>/*.jpg`); the folder's parent names the category if nested."""
    items = []
    loose = [p.name for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if loose:  # they were skipped without a word, and the figures covered the rest alone (review)
        raise InputFileError(f"{root}: images at the top of the folder ({', '.join(loose[:3])}...): a catalogue folder "
                         "holds a folder per product (<product>/<image>, or <category>/<product>/<image>)")
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and path.parent != root:
            category = path.parent.parent.name if path.parent.parent != root else ""
            items.append(CatalogueImage(path=path, product_id=path.parent.name, category=category))
    return items


def read_catalogue(source: Path) -> list[CatalogueImage]:
    """A CSV or a folder per product; ValueError (a message for the user) when it lists no image."""
    items = read_catalogue_dir(source) if source.is_dir() else read_catalogue_csv(source)
    if not items:
        raise InputFileError(f"{source}: no images (a CSV of `path, product_id[, category]` rows, or a folder per "
                         "product)")
    return items


@dataclass(frozen=True, kw_only=True)
class GroceryClass:
    name: str
    class_id: int
    coarse_name: str
    iconic_path: Path


def grocery_classes(root: Path) -> dict[int, GroceryClass]:
    classes = {}
    with open(root / "classes.csv", newline="") as handle:
        reader = csv.reader(handle)
        next(reader)  # header
        for row in reader:
            classes[int(row[1])] = GroceryClass(name=row[0], class_id=int(row[1]), coarse_name=row[2],
                                                iconic_path=root / row[4].lstrip("/"))
    return classes


def grocery_listing(root: Path, split: str = "train", *, allow_empty: bool = False) -> list[tuple[str, GroceryClass]]:
    """The (path relative to `root`, class) of each photo a split's listing (`train.txt`, `val.txt`, `test.txt`)
    names. A line that is not `path, fine class id, coarse class id` of a class in classes.csv, or a listing that
    names no photo (unless `allow_empty`), raises InputFileError naming the file and line. A byte-order mark (a
    file saved by Excel or Notepad) is not part of the first path."""
    classes = grocery_classes(root)
    listing = root / f"{split}.txt"
    photos = []
    for number, line in enumerate(listing.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if line.strip():
            try:
                rel, fine, _coarse = (part.strip() for part in line.split(","))
                photos.append((rel, classes[int(fine)]))
            except (ValueError, KeyError) as exc:
                raise InputFileError(f"{listing}, line {number}: {line!r} is not `path, fine class id, coarse "
                                     "class id` of a class in classes.csv") from exc
    if not photos and not allow_empty:
        raise InputFileError(f"{listing} lists no photos")
    return photos


def read_grocery(root: Path, split: str = "train") -> list[CatalogueImage]:
    """The grocery dataset's `train`/`val`/`test` photos: product = fine class name, category = coarse class
    name."""
    return [CatalogueImage(path=root / rel, product_id=cls.name, category=cls.coarse_name)
            for rel, cls in grocery_listing(root, split)]


def read_grocery_iconic(root: Path) -> list[CatalogueImage]:
    """The 81 iconic catalogue packshots, one per product."""
    return [CatalogueImage(path=c.iconic_path, product_id=c.name, category=c.coarse_name)
            for c in grocery_classes(root).values()]


def split_by_product(items: Sequence[CatalogueImage], val_fraction: float, seed: int = 0
                     ) -> tuple[list[CatalogueImage], list[CatalogueImage]]:
    """Hold out whole products, so validation measures retrieval of products the model never trained on."""
    if not 0 <= val_fraction < 1:
        raise InputFileError(f"the validation fraction must be in [0, 1), got {val_fraction}")
    products = sorted({item.product_id for item in items})
    n_val = round(len(products) * val_fraction)
    if val_fraction > 0 and len(products) > 1:
        n_val = min(max(n_val, 1), len(products) - 1)
    val_products = set(random.Random(seed).sample(products, n_val))
    train = [item for item in items if item.product_id not in val_products]
    val = [item for item in items if item.product_id in val_products]
    return train, val


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Our errors raised inside (a file that does not decode) name `path`."""
    try:
        yield
    except ImgsearchError as exc:
        raise type(exc)(f"{path}: {exc}") from exc


def load_image(path: Path) -> Image.Image:
    """Decode a file the way serving decodes uploads (EXIF orientation, any mode to RGB); a file that does not
    decode is named in the error."""
    with naming(path):
        return decode_image(path.read_bytes())


def shrink(img: Image.Image, shorter_side: int) -> Image.Image:
    """Downscale so the shorter side is `shorter_side` (never upscale): keeps the cache small."""
    w, h = img.size
    scale = shorter_side / min(w, h)
    if scale >= 1:
        return img
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)


def load_cached(items: Sequence[CatalogueImage], shorter_side: int, progress: bool = False,
                threads: int = 0) -> list[Image.Image]:
    """Decode every image once; training epochs then augment from memory instead of re-reading JPEGs.
    `threads` > 1 decodes in a thread pool (Pillow releases the GIL while it decodes and resizes)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    def load(item: CatalogueImage) -> Image.Image:
        return shrink(load_image(item.path), shorter_side)

    def bar(images):
        return tqdm(images, total=len(items), desc="decoding", unit="img", disable=not progress)

    if threads <= 1:
        return list(bar(load(item) for item in items))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(bar(pool.map(load, items)))  # in order, counted as they finish


@dataclass(frozen=True, kw_only=True)
class AugmentConfig:
    image_size: int = 224
    min_crop_area: float = 0.35
    max_aspect_ratio: float = 4 / 3
    flip_probability: float = 0.5
    # Mild: colour separates products (Granny Smith vs Golden Delicious), so hue is never jittered.
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.2


def random_resized_crop(img: Image.Image, rng: random.Random, size: int, min_area: float,
                        max_ratio: float) -> Image.Image:
    """Crop a random area fraction in [min_area, 1] with a random aspect ratio, resized to size x size."""
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(min_area, 1.0)
        ratio = math.exp(rng.uniform(-math.log(max_ratio), math.log(max_ratio)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return img.resize((size, size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    side = min(w, h)  # fallback: centre square
    left, top = (w - side) // 2, (h - side) // 2
    return img.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))


def colour_jitter(img: Image.Image, rng: random.Random, brightness: float, contrast: float,
                  saturation: float) -> Image.Image:
    enhancers = [(ImageEnhance.Brightness, brightness), (ImageEnhance.Contrast, contrast),
                 (ImageEnhance.Color, saturation)]
    rng.shuffle(enhancers)
    for enhancer, strength in enhancers:
        if strength > 0:
            img = enhancer(img).enhance(rng.uniform(1 - strength, 1 + strength))
    return img


def augment(img: Image.Image, rng: random.Random, config: AugmentConfig) -> np.ndarray:
    """Training view of a decoded RGB image -> float32 (3, size, size), normalised like serving."""
    img = random_resized_crop(img, rng, config.image_size, config.min_crop_area, config.max_aspect_ratio)
    if rng.random() < config.flip_probability:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    img = colour_jitter(img, rng, config.brightness, config.contrast, config.saturation)
    return normalise(img)


class TrainDataset:
    """Map-style dataset over cached images: (augmented pixels, product label)."""

    def __init__(self, images: Sequence[Image.Image], labels: Sequence[int], config: AugmentConfig, seed: int):
        self.images, self.labels, self.config = images, list(labels), config
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return augment(self.images[index], self.rng, self.config), self.labels[index]


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: every worker process starts with a copy of the dataset, random generator
    included, so without this all workers would draw the same augmentations (and, unless the workers persist,
    again every epoch). torch gives each worker its own seed, drawn from the loader's generator when it starts."""
    import torch.utils.data

    info = torch.utils.data.get_worker_info()
    if info is not None:
        info.dataset.rng = random.Random(info.seed)


def eval_tensor(img: Image.Image, size: int = 224) -> np.ndarray:
    """The serving transform (shorter side + centre crop + ImageNet normalisation)."""
    return image_to_tensor(img, size)
