"""Write the catalogue CSVs of the packshot (iconic image) selection runs in docs/embedder-eval.md.

    .venv/bin/python -m embedder.selection_sets --out runs/iconic

Every set is drawn from the grocery *training* photos and the 81 iconic packshots; `val.txt` is never read, so
choosing a recipe with these sets leaves val for the final accept/reject check. Rows are `path, product id,
category` as `imgsearch-embed train --catalogue` and `imgsearch-embed eval --queries/--gallery` read them.

- Closed set (every product trained on; what a shop's own catalogue is):
  `half-a.csv` / `half-b.csv` split each product's training photos alternately (train on A, query with B);
  `half-a-plus-iconic4.csv` is A plus every packshot listed 4 times (`half-a-plus-iconic8.csv`: 8 times).
  Neighbouring photos of a product were taken one after the other and look almost alike, so B is easy.
  `early-a.csv` / `late-b.csv` split each product's photos in file order instead (the first two thirds / the
  last third): the queries come from a later stretch of shooting than anything trained on, nearer to how unseen
  photos differ. `early-a-plus-iconic4.csv` adds the packshots x4.
- Open set (the 8 products `imgsearch-embed train --val-fraction 0.1 --seed 0` holds out):
  `heldout-train-photos.csv` are their training photos (the queries); `train-plus-iconic4.csv` is every training
  photo plus every packshot 4 times (train holds the 8 products out again, packshots included);
  `photos-without-heldout-plus-iconic4.csv` keeps all 81 packshots but not the 8 products' photos (products known
  only by their packshot).
- `iconic.csv`: the 81 packshots, the gallery.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from embedder import data

PACKSHOT_COPIES = 4


def write_catalogue(path: Path, items: Sequence[data.CatalogueImage]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        for item in items:
            writer.writerow([str(item.path.resolve()), item.product_id, item.category])


def selection_sets(root: Path) -> dict[str, list[data.CatalogueImage]]:
    photos = data.read_grocery(root, "train")
    packshots = data.read_grocery_iconic(root)
    by_product: dict[str, list[data.CatalogueImage]] = defaultdict(list)
    for photo in photos:
        by_product[photo.product_id].append(photo)
    half_a = [p for product_photos in by_product.values() for p in product_photos[0::2]]
    half_b = [p for product_photos in by_product.values() for p in product_photos[1::2]]
    # train.txt lists each product's photos in file-number order, i.e. the order they were taken.
    cut = {product: (2 * len(product_photos) + 2) // 3 for product, product_photos in by_product.items()}
    early_a = [p for product, product_photos in by_product.items() for p in product_photos[:cut[product]]]
    late_b = [p for product, product_photos in by_product.items() for p in product_photos[cut[product]:]]
    _, heldout = data.split_by_product(photos, 0.1, 0)  # the products `train --val-fraction 0.1` holds out
    heldout_products = {p.product_id for p in heldout}
    return {
        "half-a.csv": half_a,
        "half-b.csv": half_b,
        "half-a-plus-iconic4.csv": half_a + packshots * PACKSHOT_COPIES,
        "half-a-plus-iconic8.csv": half_a + packshots * 2 * PACKSHOT_COPIES,
        "early-a.csv": early_a,
        "late-b.csv": late_b,
        "early-a-plus-iconic4.csv": early_a + packshots * PACKSHOT_COPIES,
        "heldout-train-photos.csv": heldout,
        "train-plus-iconic4.csv": photos + packshots * PACKSHOT_COPIES,
        "photos-without-heldout-plus-iconic4.csv": [p for p in photos if p.product_id not in heldout_products]
        + packshots * PACKSHOT_COPIES,
        "iconic.csv": packshots,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedder.selection_sets", description=__doc__.splitlines()[0])
    parser.add_argument("--grocery", type=Path, default=data.grocery_dir(), help="grocery dataset folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the CSVs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, items in selection_sets(args.grocery).items():
        write_catalogue(args.out / name, items)
        print(f"{args.out / name}: {len(items)} images, {len({i.product_id for i in items})} products")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
