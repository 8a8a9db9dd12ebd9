"""`imgsearch demo` / `make demo`: a local stack, the grocery train photos and the 81 product packshots as the
catalogue, a few val photos as queries (also against the packshots only: "find the listing"), every val photo
through `imgsearch eval` (Recall@1/5/10 against the catalogue, against the packshots and within its own category),
every test photo where the grocery folder has a test.txt (the dataset's own held-out split) against the catalogue,
one re-encoded catalogue photo (the duplicate-cache path), then shut down."""

from __future__ import annotations

import asyncio
import io
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from broker.evaluate import evaluate, format_report, summarise
from shard_server.types import Condition, Filter, Is, Range


def reencode_jpeg(data: bytes, *, quality: int = 80, scale: float = 1.0) -> bytes:
    """The same picture as a shop's CDN would serve it: decoded, optionally resized, saved again as JPEG."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if scale != 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


EVAL_TOP_K = 10


async def _evaluate(address: str, queries, only: Filter, own_category: bool):
    from broker.client import BrokerClient

    async with BrokerClient(address) as client:
        return await evaluate(client, queries, top_k=EVAL_TOP_K, filter=only, own_category=own_category,
                              concurrency=2, timeout_s=30, progress=True)


def pick_queries(val, n: int):
    """n val photos spread evenly over the split (so over many products), deterministic."""
    if n <= 0 or not val:
        return []
    step = max(1, len(val) // n)
    return val[step // 2 :: step][:n]


def run_demo(*, data_dir: Path, shards: int = 2, queries: int = 6, limit: int = 0) -> int:
    from tqdm import tqdm

    from broker.catalogue import GROCERY_ATTRIBUTE_SCHEMA, grocery_packshots, grocery_split, iter_items
    from broker.cli import print_answer
    from broker.client import SyncBrokerClient
    from broker.stack import LocalStack, StackConfig

    if not (data_dir / "grocery" / "train.txt").exists():
        print(f"no grocery data under {data_dir} (expected {data_dir}/grocery/train.txt)", file=sys.stderr)
        return 1
    train = grocery_split(data_dir, "train")
    if limit:
        train = train[:: max(1, len(train) // limit)][:limit]
    val = grocery_split(data_dir, "val")
    # the held-out split is optional: absent or empty, the demo skips it
    test = grocery_split(data_dir, "test", allow_empty=True) if (data_dir / "grocery" / "test.txt").is_file() else []
    products = {f.product_id for f in train}
    packshots = [f for f in grocery_packshots(data_dir) if f.product_id in products]
    with tempfile.TemporaryDirectory(prefix="imgsearch-demo-") as work:
        t0 = time.perf_counter()
        print(f"starting redis, Triton (CPU), {shards} shards and the broker in {work} ...", flush=True)
        with LocalStack(StackConfig(
            work_dir=Path(work),
            shards=shards,
            search_timeout_s=10.0,
            shard_args=("--attribute-schema", GROCERY_ATTRIBUTE_SCHEMA),
        )) as stack:
            print(f"stack up in {time.perf_counter() - t0:.1f}s:")
            for key, value in stack.describe().items():
                print(f"  {key:15s} {value}")
            with SyncBrokerClient(stack.broker_address) as client:
                t1 = time.perf_counter()
                with tqdm(total=len(train) + len(packshots), unit="img", desc="ingest") as bar:

                    def items():
                        for item in iter_items(train + packshots):
                            yield item
                            bar.update(1)

                    summary = client.ingest_stream(items(), timeout_s=3600)
                took = time.perf_counter() - t1
                print(
                    f"ingested {summary.ingested} images ({len(train)} photos and {len(packshots)} packshots of "
                    f"{len(products)} products in {len({f.category for f in train})} categories) in {took:.1f}s "
                    f"({summary.ingested / took:.1f} images/s); cache pending: {summary.cache_pending}"
                )

                found = 0
                picked = pick_queries(val, queries)
                for q in picked:
                    answer = client.search(image=q.path.read_bytes(), top_k=5, timeout_s=30)
                    found += any(h.product_id == q.product_id for h in answer.hits)
                    print_answer(
                        answer,
                        title=f"query {q.image_id} (product {q.product_id})",
                        expected_product=q.product_id,
                    )
                if picked:
                    print(f"right product in the top 5 for {found} of {len(picked)} val queries")

                # A shopper's photo against the listings only: the packshots carry the flag packshot=True.
                listings = Filter(all_of=(Condition(field="packshot", predicate=Is(value=True)),))
                # (only products with a listing: with --limit some have none)
                shelf_photos = [f for f in val if f.product_id in products]
                if shelf_photos:
                    q = shelf_photos[len(shelf_photos) // 2]
                    answer = client.search(image=q.path.read_bytes(), top_k=3, filter=listings, timeout_s=30)
                    print_answer(
                        answer,
                        title=f"query {q.image_id}: its listing (packshots only: filter packshot is true)",
                        expected_product=q.product_id,
                    )
                    # What `imgsearch eval` reports, over every val photo: the whole catalogue, the listings, and
                    # the photo's own category only (a shop's category page).
                    for title, only, own_category in (
                        ("the whole catalogue", Filter(), False),
                        ("the packshots only", listings, False),
                        ("its own category only", Filter(), True),
                    ):
                        outcomes = asyncio.run(_evaluate(stack.broker_address, shelf_photos, only, own_category))
                        report = summarise(outcomes, top_k=EVAL_TOP_K)
                        print(f"\nimgsearch eval: {len(shelf_photos)} val photos against {title}")
                        print(format_report(report))
                # The dataset's own held-out split, where the folder has one (a test.txt beside val.txt).
                held_out = [f for f in test if f.product_id in products]
                if held_out:
                    outcomes = asyncio.run(_evaluate(stack.broker_address, held_out, Filter(), False))
                    print(f"\nimgsearch eval: {len(held_out)} test photos (grocery/test.txt) against the whole "
                          "catalogue")
                    print(format_report(summarise(outcomes, top_k=EVAL_TOP_K)))

                q = picked[0] if picked else val[0]
                answer = client.search(image=q.path.read_bytes(), top_k=5, distinct_products=True, timeout_s=30)
                print_answer(
                    answer,
                    title=f"query {q.image_id}: the 5 best products, one image each (distinct_products)",
                    expected_product=q.product_id,
                )
                item = train[len(train) // 3]
                answer = client.search(image_id=item.image_id, top_k=5, distinct_products=True, timeout_s=30)
                print_answer(answer, title=f"products like catalogue image {item.image_id} (image_id, no embedding)")
                answer = client.search(
                    image=q.path.read_bytes(),
                    top_k=5,
                    categories=[q.category],
                    filter=Filter(all_of=(Condition(field="price", predicate=Range(min=10, max=50)),)),
                    timeout_s=30,
                )
                print_answer(
                    answer,
                    title=f"query {q.image_id}, category {q.category}, price 10..50",
                    expected_product=q.product_id,
                )

                item = train[len(train) // 2]
                copy = reencode_jpeg(item.path.read_bytes(), quality=75)
                answer = client.search(image=copy, top_k=5, timeout_s=30)
                print_answer(
                    answer,
                    title=f"re-encoded copy of catalogue photo {item.image_id}",
                    expected_product=item.product_id,
                )
            print("stopping the stack ...", flush=True)
    print(f"demo done in {time.perf_counter() - t0:.1f}s")
    return 0
