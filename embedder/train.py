"""`imgsearch-embed train`: fine-tune the embedder with an ArcFace head on a product catalogue.

The catalogue is a CSV (path, product id, category), a folder per product, or the grocery dataset (--grocery).
Whole products are held out for validation, so the validation figures measure open-set retrieval. Writes
`last.pt`, `best.pt` (by validation MAP@R, or the last epoch without validation) and `metrics.json` to --out.
`best.pt` is picked on the held-out products, so report their (open-set) figures from `last.pt`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from embedder import data
from embedder.losses import ArcFaceHead
from embedder.metrics import map_at_r, recall_at_k
from embedder.model import (
    BACKBONES,
    DEFAULT_BACKBONE,
    ImageEmbedder,
    ModelConfig,
    build_pretrained_embedder,
    freeze_backbone_prefix,
    save_checkpoint,
    set_train_mode,
)
from embedder.preprocess import DEFAULT_IMAGE_SIZE


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    out_dir: Path
    backbone: str = DEFAULT_BACKBONE  # EfficientNet-Lite variant: lite0, lite1 or lite2 (ImageNet weights)
    epochs: int = 8
    max_steps: int = 0  # 0 = no limit; a small number makes a smoke run
    batch_size: int = 64
    image_size: int = 224
    lr: float = 1e-3  # head, projection, pooling
    backbone_lr: float = 3e-4  # the fine-tuned top blocks
    weight_decay: float = 1e-4
    warmup_steps: int = 30
    arcface_scale: float = 30.0
    arcface_margin: float = 0.3
    trainable_blocks: int = 0  # top MBConv blocks to fine-tune; the 1x1 head conv is always trained
    # >0: run the frozen part of the backbone once on this many views per image (the first one the serving
    # transform, the others augmented) and train the top on the cached features: several times cheaper per epoch
    # on a CPU. 0: a fresh augmentation of every image at every step.
    feature_views: int = 1
    val_fraction: float = 0.1
    seed: int = 0
    threads: int = 2
    # Processes that augment training images (--feature-views 0) and threads that decode the catalogue; 0 = all
    # in the training process. A GPU trains faster than one CPU core augments.
    workers: int = 0
    device: str = "auto"


def cosine_with_warmup(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def frozen_features(model: ImageEmbedder, images: list, block: int, *, views: int, config: TrainConfig,
                    rng: random.Random, device: torch.device, progress: bool) -> torch.Tensor:
    """(n_images, views, C, H, W) float16 outputs of the frozen backbone part; view 0 is the serving
    transform of the cached decode, the others random training augmentations. With one view the cache holds the
    serving resize itself, so view 0 is serving's input exactly; with more, it is resized from a 1.15x larger
    decode (up to ~35 of 255 levels off serving's one resize on the grocery photos)."""
    from tqdm import tqdm

    model.eval()
    augment_config = data.AugmentConfig(image_size=config.image_size)
    cache: torch.Tensor | None = None
    bar = tqdm(total=len(images) * views, desc="frozen features", unit="img", disable=not progress)
    for view in range(views):
        for start in range(0, len(images), 64):
            batch = images[start:start + 64]
            pixels = np.stack([data.eval_tensor(img, config.image_size) if view == 0
                               else data.augment(img, rng, augment_config) for img in batch])
            features = model.backbone.features_until(torch.from_numpy(pixels).to(device), block).half().cpu()
            if cache is None:
                cache = torch.empty((len(images), views, *features.shape[1:]), dtype=torch.float16)
            cache[start:start + len(batch), view] = features
            bar.update(len(batch))
    bar.close()
    assert cache is not None
    return cache


def cached_batches(cache: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator):
    """One epoch over the cached features, a random view of each image, in a random order."""
    n, views = cache.shape[:2]
    order = torch.randperm(n, generator=generator)
    view = torch.randint(views, (n,), generator=generator)
    usable = n - n % batch_size if n > batch_size else n  # drop the ragged last batch (BatchNorm)
    for start in range(0, usable, batch_size):
        idx = order[start:start + batch_size]
        yield cache[idx, view[idx]].float(), labels[idx]


def online_batches(model: ImageEmbedder, loader: DataLoader, block: int, device: torch.device):
    """One epoch of fresh augmentations, pushed through the frozen part of the backbone."""
    for pixels, labels in loader:
        with torch.no_grad():
            features = model.backbone.features_until(pixels.to(device), block)
        yield features, labels  # outside no_grad: the consumer trains on it


@torch.no_grad()
def validate(model: ImageEmbedder, val_features: torch.Tensor, block: int, labels: list[str],
             device: torch.device) -> dict:
    """Leave-one-out retrieval among the held-out products' photos (serving transform); nothing when no held-out
    product has two photos (the figures were NaN, and no epoch was ever the best, review)."""
    counts = Counter(labels)
    if not any(counts[label] > 1 for label in labels):
        return {}
    model.eval()
    embeddings = torch.cat([model.embed_from_block(val_features[i:i + 64, 0].float().to(device), block).cpu()
                            for i in range(0, len(val_features), 64)]).numpy()
    sims = embeddings @ embeddings.T
    recalls = recall_at_k(sims, labels, labels, exclude_self=True)
    return {**{f"val_recall@{k}": v for k, v in recalls.items()},
            "val_map@r": map_at_r(sims, labels, labels, exclude_self=True)}


def training_split(catalogue: list[data.CatalogueImage], val_fraction: float, seed: int
                   ) -> tuple[list[data.CatalogueImage], list[data.CatalogueImage]]:
    """The photos trained on and those validated on (whole products held out). An image listed twice (e.g.
    packshots repeated to weigh more in training) would find its own copy in the leave-one-out validation: each
    file is validated on once."""
    train_items, val_items = data.split_by_product(catalogue, val_fraction, seed)
    return train_items, list({item.path: item for item in val_items}.values())


def train(config: TrainConfig, catalogue: list[data.CatalogueImage], *, progress: bool = True,
          source: dict | None = None) -> dict:
    """Train on `catalogue`; `source` (how the catalogue was read) is recorded in metrics.json as it is."""
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    torch.set_num_threads(config.threads)
    device = pick_device(config.device)
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    train_items, val_items = training_split(catalogue, config.val_fraction, config.seed)
    products = sorted({item.product_id for item in train_items})
    label_of = {product: i for i, product in enumerate(products)}
    (out / "split.json").write_text(json.dumps({
        "train_products": products,
        "val_products": sorted({item.product_id for item in val_items}),
    }, indent=1))
    train_labels = torch.tensor([label_of[i.product_id] for i in train_items])
    val_labels = [item.product_id for item in val_items]

    model = build_pretrained_embedder(ModelConfig(backbone=config.backbone), seed=config.seed)
    freeze_backbone_prefix(model, config.trainable_blocks)
    block = max(0, model.backbone.num_blocks - config.trainable_blocks)
    head = ArcFaceHead(model.config.embedding_dim, len(products), scale=config.arcface_scale,
                       margin=config.arcface_margin)
    model.to(device)
    head.to(device)

    # Decode once. Random crops want a little more than the crop size; a single serving-transform view wants
    # the serving resize (shorter side = image size), so its features match serving's (within a grey level on some
    # photos: the cache shrinks then crops where serving resizes once; a review measured 1 of 14 photos differing).
    augmented = config.feature_views != 1
    train_images = data.load_cached(
        train_items, round(config.image_size * 1.15) if augmented else config.image_size, progress,
        threads=config.workers)
    val_images = data.load_cached(val_items, config.image_size, progress, threads=config.workers)
    val_features = frozen_features(model, val_images, block, views=1, config=config, rng=rng, device=device,
                                   progress=progress) if val_images else None
    generator = torch.Generator().manual_seed(config.seed)
    if config.feature_views > 0:
        cache = frozen_features(model, train_images, block, views=config.feature_views, config=config, rng=rng,
                                device=device, progress=progress)
        del train_images
        steps_per_epoch = max(1, len(train_items) // config.batch_size)
        epoch_batches = lambda: cached_batches(cache, train_labels, config.batch_size, generator)  # noqa: E731
    else:
        dataset = data.TrainDataset(train_images, train_labels.tolist(),
                                    data.AugmentConfig(image_size=config.image_size), config.seed)
        loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, num_workers=config.workers,
                            drop_last=len(dataset) > config.batch_size, generator=generator,
                            worker_init_fn=data.seed_worker, persistent_workers=config.workers > 0,
                            pin_memory=device.type == "cuda")
        steps_per_epoch = len(loader)
        epoch_batches = lambda: online_batches(model, loader, block, device)  # noqa: E731

    backbone_params = [p for p in model.backbone.parameters() if p.requires_grad]
    new_params = [*model.pool.parameters(), *model.bn.parameters(), *model.proj.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW([
        {"params": backbone_params, "lr": config.backbone_lr},
        {"params": new_params, "lr": config.lr},
    ], weight_decay=config.weight_decay)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_with_warmup(
        step, warmup_steps=min(config.warmup_steps, max(1, total_steps // 10)), total_steps=total_steps))

    from tqdm import tqdm

    history: list[dict] = []
    metrics = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
               "source": source or {},
               "train_images": len(train_items), "train_products": len(products),
               "val_images": len(val_items), "val_products": len(set(val_labels)), "device": str(device),
               "setup_seconds": round(time.monotonic() - started, 1), "epochs": history}
    best_score, step = -1.0, 0
    for epoch in range(1, config.epochs + 1):
        set_train_mode(model)
        head.train()
        epoch_started, loss_sum, correct, seen = time.monotonic(), 0.0, 0, 0
        bar = tqdm(epoch_batches(), total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}", unit="batch",
                   disable=not progress)
        for features, labels in bar:
            features, labels = features.to(device), labels.to(device)
            embeddings = model.embed_from_block(features, block)
            loss = torch.nn.functional.cross_entropy(head(embeddings, labels), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            loss_sum += loss.item() * len(labels)
            with torch.no_grad():
                correct += int((head.cosine(embeddings).argmax(1) == labels).sum())
            seen += len(labels)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.2f}")
            if config.max_steps and step >= config.max_steps:
                break
        bar.close()
        record = {"epoch": epoch, "steps": step, "train_loss": loss_sum / max(seen, 1),
                  "train_accuracy": correct / max(seen, 1), "lr": scheduler.get_last_lr()[1]}
        if val_features is not None:
            record.update(validate(model, val_features, block, val_labels, device))
        record["epoch_seconds"] = round(time.monotonic() - epoch_started, 1)
        history.append(record)
        print(json.dumps(record), flush=True)
        extra = {"epoch": epoch, "train_config": metrics["config"], "products": products}
        save_checkpoint(out / "last.pt", model.cpu(), **extra)
        score = record.get("val_map@r", float(epoch))
        if score >= best_score:
            best_score = score
            save_checkpoint(out / "best.pt", model, **extra)
        model.to(device)
        metrics["total_seconds"] = round(time.monotonic() - started, 1)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        if config.max_steps and step >= config.max_steps:
            break
    return metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgsearch-embed train", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--catalogue", type=Path, help="CSV (path, product id, category) or a folder per product")
    source.add_argument("--grocery", type=Path, nargs="?", const=data.grocery_dir(),
                        help="the grocery dataset folder (its train.txt); default ../shared/data/grocery")
    parser.add_argument("--iconic-copies", type=int, default=0,
                        help="with --grocery: also train on the 81 iconic catalogue packshots, each listed this many "
                             "times (the listing images a shop has for every product); default 0")
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, metrics.json)")
    defaults = TrainConfig(out_dir=Path("."))
    parser.add_argument("--backbone", choices=BACKBONES, default=defaults.backbone,
                        help=f"EfficientNet-Lite variant (ImageNet weights); default {defaults.backbone}")
    for name in ("epochs", "max_steps", "batch_size", "image_size", "lr", "backbone_lr", "weight_decay",
                 "warmup_steps", "arcface_scale", "arcface_margin", "trainable_blocks", "feature_views", "val_fraction",
                 "seed", "threads", "workers", "device"):
        default = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                            help=f"default {default}")
    return parser


def training_catalogue(args: argparse.Namespace) -> list[data.CatalogueImage]:
    if args.grocery is None:
        return data.read_catalogue(args.catalogue)
    return data.read_grocery(args.grocery, "train") + data.read_grocery_iconic(args.grocery) * args.iconic_copies


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.iconic_copies < 0:
        print("--iconic-copies must be >= 0")
        return 2
    if args.iconic_copies and args.grocery is None:
        print("--iconic-copies needs --grocery (list a catalogue's own packshots in its CSV instead)")
        return 2
    catalogue = training_catalogue(args)
    if args.workers < 0:
        print("--workers must be >= 0")
        return 2
    if args.image_size % 32:
        print("--image-size must be a multiple of 32 (the backbone's fixed 'SAME' padding assumes it)")
        return 2
    if args.image_size != DEFAULT_IMAGE_SIZE:
        # Serving (Triton's preprocessing), export and evaluation all crop at 224 px; such a model was exported
        # and measured at 224 px without a word. Export and eval now refuse it (unless told otherwise).
        print(f"warning: --image-size {args.image_size}: serving, export and evaluation crop to {DEFAULT_IMAGE_SIZE} "
              "px; this run is an experiment (`export --any-image-size` exports it anyway)", file=sys.stderr)
    if len({item.product_id for item in catalogue}) < 2:
        print("the catalogue needs at least two products")
        return 2
    for name in ("epochs", "batch_size", "threads"):
        if getattr(args, name) < 1:
            print(f"--{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    if not 0 <= args.val_fraction < 1:
        print(f"--val-fraction must be in [0, 1), got {args.val_fraction}", file=sys.stderr)
        return 2
    train_items, val_items = training_split(catalogue, args.val_fraction, args.seed)
    train_products, val_products = ({i.product_id for i in items} for items in (train_items, val_items))
    if len(train_products) < 2:
        # ArcFace over one class learns nothing, and reported loss 0 and accuracy 1 (review)
        print(f"{len(train_products)} product left to train on after holding out {len(val_products)} for "
              "validation: at least two are needed (lower --val-fraction, or add products)", file=sys.stderr)
        return 2
    if val_products and not any(n > 1 for n in Counter(i.product_id for i in val_items).values()):
        print("warning: no held-out product has two photos, so there is no validation (best.pt is the last "
              "epoch)", file=sys.stderr)
    elif len(val_products) == 1:
        print("warning: one product held out: its validation figures are 1.0 whatever the model (every other "
              "held-out photo is of it); hold out at least two", file=sys.stderr)
    fields = {k: v for k, v in vars(args).items() if k not in ("catalogue", "grocery", "out", "iconic_copies")}
    source = ({"grocery": str(args.grocery), "iconic_copies": args.iconic_copies} if args.grocery is not None
              else {"catalogue": str(args.catalogue)})
    metrics = train(TrainConfig(out_dir=args.out, **fields), catalogue, source=source)
    print(f"done in {metrics.get('total_seconds')} s; checkpoints and metrics.json in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
