"""Catalogue inputs for the CLI, the demo and the tests: the grocery dataset, folders of images and CSV files.

Synthetic attributes (brand, colour, price, in_stock) are derived deterministically from the ids (crc32), so
every run, and every test, sees the same catalogue.
"""

from __future__ import annotations

import csv
import math
import os
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from embedder.data import grocery_classes, grocery_listing
from shard_server.config import DEFAULT_ATTRIBUTE_SCHEMA

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif"}
# The shards' attribute schema for the grocery catalogue with its packshots (`--attribute-schema`).
GROCERY_ATTRIBUTE_SCHEMA = DEFAULT_ATTRIBUTE_SCHEMA + ",packshot:flag"
BRANDS = ("Arla", "Garant", "ICA", "Oatly", "Alpro", "Valio", "Zeta", "Bravo")
COLOURS = ("red", "green", "yellow", "orange", "white", "brown", "purple")


def default_data_dir() -> Path:
    """../shared/data from the repository root (override: IMGSEARCH_DATA_DIR)."""
    override = os.environ.get("IMGSEARCH_DATA_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


@dataclass(frozen=True, kw_only=True)
class CatalogueFile:
    """One image file to ingest, with its ids and attributes."""

    path: Path
    image_id: str
    product_id: str
    category: str
    attributes: dict[str, str | float | bool] = field(default_factory=dict)


def synthetic_attributes(product_id: str, image_id: str) -> dict[str, str | float | bool]:
    """Brand and colour per product, price and stock per image: deterministic, with known proportions."""
    p = zlib.crc32(product_id.encode())
    i = zlib.crc32(image_id.encode())
    return {
        "brand": BRANDS[p % len(BRANDS)],
        "colour": COLOURS[(p // 7) % len(COLOURS)],
        "price": round(1.0 + (i % 9900) / 100.0, 2),  # 1.00 .. 99.99
        "in_stock": i % 5 != 0,  # 80 % in stock
    }


def grocery_split(data_dir: Path, split: str = "train", *, level: str = "coarse",
                  allow_empty: bool = False) -> list[CatalogueFile]:
    """The grocery photos of a split: product = fine class, category = coarse class (or top class: Fruit,
    Vegetables, Packages, with level="top")."""
    root = data_dir / "grocery"
    files = []
    # a bad line: InputFileError naming the file and line
    for rel, cls in grocery_listing(root, split, allow_empty=allow_empty):
        category = rel.split("/")[1] if level == "top" else cls.coarse_name
        image_id = rel.rsplit(".", 1)[0]
        files.append(
            CatalogueFile(
                path=root / rel,
                image_id=image_id,
                product_id=cls.name,
                category=category,
                attributes=synthetic_attributes(cls.name, image_id),
            )
        )
    return files


def grocery_packshots(data_dir: Path) -> list[CatalogueFile]:
    """The 81 iconic catalogue packshots (one studio image per product, as a shop lists it), filed under the
    product's coarse class with the synthetic attributes and the flag `packshot=True`, which photos lack: a
    `packshot is true` filter searches the listings only. The shards need GROCERY_ATTRIBUTE_SCHEMA for it."""
    root = data_dir / "grocery"
    files = []
    for cls in grocery_classes(root).values():
        image_id = str(cls.iconic_path.relative_to(root).with_suffix(""))
        files.append(
            CatalogueFile(
                path=cls.iconic_path,
                image_id=image_id,
                product_id=cls.name,
                category=cls.coarse_name,
                attributes={**synthetic_attributes(cls.name, image_id), "packshot": True},
            )
        )
    return files


def files_from_folder(folder: Path, *, category: str | None = None, unique_ids: bool = True) -> list[CatalogueFile]:
    """Every image under `folder`: product = parent folder name, category = its parent's name (or `category`),
    image id = path relative to `folder` without suffix (two files of one id refused with ValueError, unless
    `unique_ids` is False: query photos are not stored under their ids). A catalogue image directly in `folder`
    is a product of its own (product = its file name without the suffix; category = the folder's name, or
    `category`): as the folder's name, every image of a flat folder was one product, and distinct-product
    searches answered one of them (docs review of 2026-12-06). Query photos directly in `folder` (`unique_ids`
    False: `imgsearch eval <one product's folder>`) are photos of the product the folder is named after."""
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        rel = path.relative_to(folder)
        if len(rel.parts) == 1 and not unique_ids:
            product = folder.resolve().name
            cat = category or product
        elif len(rel.parts) == 1:
            product = path.stem
            cat = category or folder.resolve().name
        else:
            product = path.parent.name
            cat = category or (path.parent.parent.name if len(rel.parts) >= 3 else product)
        image_id = str(rel.with_suffix(""))
        files.append(CatalogueFile(path=path, image_id=image_id, product_id=product, category=cat))
    if unique_ids:
        # front.jpg and front.png were one image: the later replaced the earlier, and the ingest counted both
        # (review of 2026-12-05).
        _refuse_shared_ids(files, "", "(the path without its suffix): rename one, or ingest them from a CSV with "
                           "an image_id column")
    return files


def _refuse_shared_ids(files: list[CatalogueFile], where: str, fix: str) -> None:
    """ValueError when two different files would get one image id (one would silently replace the other)."""
    seen: dict[str, Path] = {}
    for f in files:
        if f.image_id in seen and seen[f.image_id] != f.path:
            raise ValueError(f"{where}{seen[f.image_id]} and {f.path} would both get image id {f.image_id!r} {fix}")
        seen[f.image_id] = f.path


def files_from_csv(csv_path: Path, *, unique_ids: bool = True,
                   attribute_kinds: Mapping[str, str] | None = None) -> list[CatalogueFile]:
    """CSV with a header: `image` (path, relative to the CSV's folder), `image_id`, `product_id`, `category`;
    any other column is an attribute, empty cells are left out. A column named in `attribute_kinds` (the shards'
    schema: name -> text, number or flag) is read as that kind, a cell that is not one refused with ValueError;
    any other column by its look (numbers become numbers, true/false flags). Typed by look alone, a brand "1664"
    became the number 1664.0 and the shards refused the whole ingest (a text attribute), and "007" lost its zeros.
    Cells are stripped; a row without an image, a product id or (unless `unique_ids` is False) a category is
    refused with ValueError, and so are two files of one image id (a blank or missing image_id is the file name)
    unless `unique_ids` is False (query photos are not stored under their ids)."""
    base = csv_path.parent
    files = []
    # utf-8-sig: a CSV saved by Excel as "CSV UTF-8" starts with a byte-order mark, which became part of the first
    # column's name ("no image column"); names are stripped (`image, product_id, category` is common too).
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        delimiter = _delimiter(f.readline())
        f.seek(0)
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames:
            reader.fieldnames = [name.strip() for name in reader.fieldnames]
        missing = {"image", "product_id", "category"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{csv_path}: no {', '.join(sorted(missing))} column in the header")
        for row in reader:
            if None in row or None in row.values():
                raise ValueError(f"{csv_path}, line {reader.line_num}: expected {len(reader.fieldnames)} fields")
            # Cells as their header names: without the spaces around them (an `a, b, c` CSV stored the id " g1",
            # the category " Milk" and the brand " Arla", which no search or delete by name found: review)
            row = {key: value.strip() for key, value in row.items()}
            # a query's category is used only by `eval --own-category`: not required there
            required = ("image", "product_id", "category") if unique_ids else ("image", "product_id")
            empty = [name for name in required if not row[name]]
            if empty:
                raise ValueError(f"{csv_path}, line {reader.line_num}: empty {' and '.join(empty)}")
            attrs: dict[str, str | float | bool] = {}
            for key, value in row.items():
                if key in ("image", "image_id", "product_id", "category") or not value:
                    continue  # empty, or only spaces
                kind = (attribute_kinds or {}).get(key)
                attrs[key] = _typed(value) if kind is None else _of_kind(
                    value, kind, f"{csv_path}, line {reader.line_num}, column {key!r}",
                    decimal_comma=delimiter == ";")
            path = Path(row["image"])
            files.append(
                CatalogueFile(
                    path=path if path.is_absolute() else base / path,
                    image_id=row.get("image_id") or path.stem,
                    product_id=row["product_id"],
                    category=row["category"],
                    attributes=attrs,
                )
            )
    if unique_ids:
        # The default id is the file name without suffix: two rows of one name would be one image, the later
        # replacing the earlier (sub/front.jpg and sub2/front.jpg: one of them silently lost, CLI review); so
        # would two rows of one image_id, or blank image_id cells of one file name (review of 2026-12-06).
        fix = ("(a blank image_id takes the file name): give each row its own image_id"
               if "image_id" in (reader.fieldnames or ()) else "(the file name): add an image_id column")
        _refuse_shared_ids(files, f"{csv_path}: ", fix)
    return files


_FLAG_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _delimiter(header: str) -> str:
    """The header line's delimiter: a comma, or a semicolon or tab when the line has more of those (Excel writes
    `;` where the decimal separator is a comma, as in most of Europe; such a file read as `,` had no columns)."""
    counts = {delimiter: header.count(delimiter) for delimiter in (",", ";", "\t")}
    most = max(counts, key=counts.__getitem__)
    return most if counts[most] > counts[","] else ","


def _of_kind(value: str, kind: str, where: str, *, decimal_comma: bool = False) -> str | float | bool:
    """A cell of a column the schema declares (see files_from_csv). With `decimal_comma` (a `;`-separated file),
    a number may be written `12,50`."""
    if kind == "text":
        return value
    if kind == "flag":
        flag = _FLAG_WORDS.get(value.strip().lower())
        if flag is None:
            raise ValueError(f"{where}: {value!r} is not a flag (true/false, yes/no, 1/0)")
        return flag
    if decimal_comma and value.count(",") == 1 and "." not in value:
        value = value.replace(",", ".")
    try:
        number = float(value)
    except ValueError:
        hint = "" if decimal_comma else " (a decimal point, not a comma, in a comma-separated file)"
        raise ValueError(f"{where}: {value!r} is not a number{hint}") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}: {value!r} is not a finite number")
    return number


def _typed(value: str) -> str | float | bool:
    low = value.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return float(value)
    except ValueError:
        return value


def checked_items(files: list[CatalogueFile], problems: list[tuple[Path, str]], *, max_image_bytes: int,
                  max_image_pixels: int, on_file=None) -> Iterator:
    """CatalogueItems of the files that can be read and decoded here, with the given limits (the broker's own
    check, embedder.preprocess.decode_image, at a reduced scale: ~1 ms a photo); the others are added to
    `problems` as (path, reason). One unreadable, empty or corrupt file used to fail a whole ingest stream, and
    nothing of it was stored (CLI review of 2026-12-05). `on_file()` is called once per file either way."""
    from broker.types import CatalogueItem
    from embedder.errors import EmbedderError
    from embedder.preprocess import decode_image

    for f in files:
        try:
            data = f.path.read_bytes()
            decode_image(data, max_image_bytes=max_image_bytes, max_image_pixels=max_image_pixels,
                         draft_min_side=64)
        except FileNotFoundError:
            problems.append((f.path, "not found"))
        except OSError as exc:
            problems.append((f.path, f"unreadable: {exc.strerror or exc}"))
        except EmbedderError as exc:
            problems.append((f.path, str(exc)))
        else:
            yield CatalogueItem(image_id=f.image_id, product_id=f.product_id, category=f.category, image=data,
                                attributes=f.attributes)
        if on_file is not None:
            on_file()


def iter_items(files: list[CatalogueFile]) -> Iterator:
    """CatalogueItems with the file bytes read lazily (one file in memory per item in flight)."""
    from broker.types import CatalogueItem

    for f in files:
        yield CatalogueItem(
            image_id=f.image_id,
            product_id=f.product_id,
            category=f.category,
            image=f.path.read_bytes(),
            attributes=f.attributes,
        )
