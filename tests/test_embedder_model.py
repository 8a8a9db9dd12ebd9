"""The embedding model: pretrained weights, ONNX export parity, the shipped artifact, and a tiny training run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from embedder import data, export, train
from embedder.errors import InputFileError
from embedder.losses import ArcFaceHead
from embedder.model import (
    BACKBONES,
    NUM_BLOCKS,
    EfficientNetLite,
    ImageEmbedder,
    ModelConfig,
    build_pretrained_embedder,
    freeze_backbone_prefix,
    load_checkpoint,
    load_pretrained_backbone,
    save_checkpoint,
    set_train_mode,
)
from embedder.model_files import INPUT_NAME, MODEL_ENV_VAR, OUTPUT_NAME, default_model_path

GROCERY = data.grocery_dir()
IMAGENET_BANANA, IMAGENET_LEMON, IMAGENET_ORANGE = 954, 951, 950


def photos(product: str, n: int, split: str = "train") -> list[Path]:
    return [item.path for item in data.read_grocery(GROCERY, split) if item.product_id == product][:n]


def pixels_of(paths: list[Path]) -> np.ndarray:
    return np.stack([data.eval_tensor(data.load_image(p)) for p in paths])


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def backbone():
    return load_pretrained_backbone()


@pytest.fixture(scope="module", params=BACKBONES)
def any_backbone(request):
    return load_pretrained_backbone(variant=request.param)


@pytest.mark.parametrize("product, imagenet_class", [
    ("Banana", IMAGENET_BANANA), ("Lemon", IMAGENET_LEMON), ("Orange", IMAGENET_ORANGE)])
def test_pretrained_weights_classify_fruit(any_backbone, product, imagenet_class):
    """The ImageNet weights of lite0, lite1 and lite2 really loaded (strict: every key and shape of the layer
    tables matched): grocery photos get their fruit among the top-5 ImageNet labels."""
    with torch.no_grad():
        logits = any_backbone(torch.from_numpy(pixels_of(photos(product, 3))))
    top5 = logits.topk(5, dim=1).indices
    assert all(imagenet_class in row.tolist() for row in top5), top5


def test_random_weights_do_not_classify_fruit():
    """Guards the test above: an uninitialised backbone does not pass it by chance."""
    torch.manual_seed(0)
    with torch.no_grad():
        logits = EfficientNetLite().eval()(torch.from_numpy(pixels_of(photos("Banana", 3))))
    assert not all(IMAGENET_BANANA in row.tolist() for row in logits.topk(5, dim=1).indices)


def test_backbone_variants_have_their_depth_and_are_checked():
    assert [EfficientNetLite(v).num_blocks for v in BACKBONES] == [16, 21, 21]
    with pytest.raises(ValueError, match="unknown backbone"):
        EfficientNetLite("lite9")
    with pytest.raises(ValueError, match="does not match"):
        ImageEmbedder(ModelConfig(backbone="lite2"), EfficientNetLite("lite0"))


def test_checkpoint_keeps_its_backbone_and_old_checkpoints_load_as_lite0(tmp_path):
    """A lite2 embedder comes back as lite2 from its checkpoint; a checkpoint written before the backbone was a
    setting (no `backbone` in its model_config) loads as lite0, which it is."""
    torch.manual_seed(0)
    lite2 = ImageEmbedder(ModelConfig(backbone="lite2")).eval()
    save_checkpoint(tmp_path / "lite2.pt", lite2)
    loaded = load_checkpoint(tmp_path / "lite2.pt")
    assert loaded.backbone.variant == "lite2" and loaded.backbone.num_blocks == 21
    pixels = torch.from_numpy(pixels_of(photos("Banana", 1)))
    with torch.no_grad():
        assert torch.allclose(loaded(pixels), lite2(pixels))
    lite0 = ImageEmbedder().eval()
    payload = {"model": lite0.state_dict(), "model_config": {"embedding_dim": 512, "gem_p": 3.0}}
    torch.save(payload, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").backbone.variant == "lite0"


def test_checkpoints_leave_out_the_imagenet_classifier_but_nothing_else(tmp_path):
    """The classifier is never part of an embedding: checkpoints skip it (older ones with it still load); a
    checkpoint missing any other weight is refused."""
    torch.manual_seed(0)
    model = ImageEmbedder().eval()
    save_checkpoint(tmp_path / "m.pt", model)
    weights = torch.load(tmp_path / "m.pt", weights_only=False)["model"]
    assert not any(k.startswith("backbone._fc.") for k in weights)
    assert set(weights) == {k for k in model.state_dict() if not k.startswith("backbone._fc.")}
    pixels = torch.from_numpy(pixels_of(photos("Banana", 1)))
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path / "m.pt")(pixels), model(pixels))
    del weights["proj.weight"]
    torch.save({"model": weights, "model_config": vars(model.config)}, tmp_path / "broken.pt")
    with pytest.raises(InputFileError, match="proj.weight"):  # the user's file: one line in the CLI
        load_checkpoint(tmp_path / "broken.pt")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, backbone):
    """An embedder with non-trivial head statistics, exported to ONNX."""
    torch.manual_seed(0)
    model = build_pretrained_embedder()
    with torch.no_grad():
        model.bn.running_mean.uniform_(0.0, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.2, 0.2)
        model.pool.p.fill_(2.5)
    path = export.export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx")
    return model.eval(), path


def test_flip_averaged_export_embeds_a_photo_and_its_mirror_image_alike(exported, tmp_path):
    model, plain_path = exported
    path = export.export_onnx(export.FlipAveragedEmbedder(model), tmp_path / "flip.onnx")
    pixels = pixels_of(photos("Arla-Standard-Milk", 1) + photos("Banana", 1))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]
    mirrored = session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(pixels[:, :, :, ::-1])})[0]
    assert out.shape == (2, 512) and session.get_outputs()[0].shape == ["batch", 512]
    np.testing.assert_allclose(out, mirrored, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # The average of the two plain embeddings, re-normalised.
    plain = ort.InferenceSession(str(plain_path), providers=["CPUExecutionProvider"])
    both = plain.run([OUTPUT_NAME], {INPUT_NAME: np.concatenate([pixels, pixels[:, :, :, ::-1]])})[0]
    expected = both[:2] + both[2:]
    np.testing.assert_allclose(out, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_matches_pytorch_on_real_photos(exported, batch):
    model, path = exported
    paths = (photos("Banana", 1) + photos("Arla-Standard-Milk", 1) + photos("Granny-Smith", 1))[:batch]
    pixels = pixels_of(paths)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]
    with torch.no_grad():
        torch_out = model(torch.from_numpy(pixels)).numpy()
    assert onnx_out.shape == (batch, 512)
    cosines = (onnx_out * torch_out).sum(1) / np.linalg.norm(onnx_out, axis=1) / np.linalg.norm(torch_out, axis=1)
    assert cosines.min() >= 0.9999


def test_default_artifact_follows_the_contract(monkeypatch):
    monkeypatch.delenv(MODEL_ENV_VAR, raising=False)
    path = default_model_path()
    assert path.name == "model.onnx" and path.is_file()
    assert path.stat().st_size < 25 * 1024 * 1024
    graph = onnx.load(str(path), load_external_data=False).graph
    (inp,), (out,) = graph.input, graph.output
    assert inp.name == INPUT_NAME and out.name == OUTPUT_NAME
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert isinstance(in_dims[0], str) and in_dims[1:] == [3, 224, 224]  # dynamic batch axis
    assert isinstance(out_dims[0], str) and out_dims[1:] == [512]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 4):
        paths = (photos("Banana", 2) + photos("Oatly-Oat-Milk", 2))[:batch]
        emb = session.run([OUTPUT_NAME], {INPUT_NAME: pixels_of(paths)})[0]
        assert emb.shape == (batch, 512) and emb.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]  # two bananas are closer than a banana and oat milk


def test_model_path_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv(MODEL_ENV_VAR, str(tmp_path / "other.onnx"))
    assert default_model_path() == tmp_path / "other.onnx"


def test_arcface_margin_lowers_only_the_true_class_logit():
    torch.manual_seed(0)
    head = ArcFaceHead(8, 4, scale=10.0, margin=0.5)
    emb = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    labels = torch.tensor([0, 1, 2, 3, 0])
    logits, plain = head(emb, labels), head.scale * head.cosine(emb)
    true = torch.nn.functional.one_hot(labels, 4).bool()
    assert torch.allclose(logits[~true], plain[~true])
    assert (logits[true] < plain[true]).all()


def test_freezing_keeps_early_layers_and_their_statistics():
    model = ImageEmbedder()
    freeze_backbone_prefix(model, trainable_blocks=4)
    assert not model.backbone._conv_stem.weight.requires_grad
    assert not model.backbone._blocks[NUM_BLOCKS - 5]._project_conv.weight.requires_grad
    assert model.backbone._blocks[NUM_BLOCKS - 4]._project_conv.weight.requires_grad
    set_train_mode(model)
    assert not model.backbone._bn0.training and model.backbone._bn1.training and model.bn.training


def test_group_split_holds_out_whole_products():
    items = data.read_grocery(GROCERY, "train")
    train_items, val_items = data.split_by_product(items, 0.1, seed=0)
    train_products = {i.product_id for i in train_items}
    val_products = {i.product_id for i in val_items}
    assert not train_products & val_products
    assert len(val_products) == 8 and len(train_products) == 73
    assert len(train_items) + len(val_items) == len(items)


def test_augment_gives_normalised_training_views():
    import random

    img = data.load_image(photos("Banana", 1)[0])
    config = data.AugmentConfig(image_size=96)
    views = [data.augment(img, random.Random(seed), config) for seed in range(3)]
    assert all(v.shape == (3, 96, 96) and v.dtype == np.float32 for v in views)
    assert not np.allclose(views[0], views[1])  # random crops differ
    assert -3 < views[0].mean() < 3


def test_threaded_decode_matches_serial():
    items = data.read_grocery(GROCERY, "train")[:12]
    serial = data.load_cached(items, 96)
    threaded = data.load_cached(items, 96, threads=3)
    assert [img.size for img in threaded] == [img.size for img in serial]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(serial, threaded))


@pytest.mark.parametrize("init", [None, data.seed_worker], ids=["unseeded", "seed_worker"])
def test_loader_workers_draw_their_own_augmentations(init):
    """Each DataLoader worker starts with a copy of the dataset's generator: unseeded, two workers hand out the
    same crops of the same image; data.seed_worker gives each worker its own stream."""
    from torch.utils.data import DataLoader

    img = data.load_image(photos("Banana", 1)[0])
    dataset = data.TrainDataset([img] * 4, [0] * 4, data.AugmentConfig(image_size=64), seed=0)
    loader = DataLoader(dataset, batch_size=1, num_workers=2, worker_init_fn=init)
    views = [pixels[0].numpy() for pixels, _ in loader]  # workers alternate: items 0, 2 from one, 1, 3 the other
    same = np.array_equal(views[0], views[1]) and np.array_equal(views[2], views[3])
    assert same == (init is None)
    if init is not None:
        assert len({v.tobytes() for v in views}) == 4


def test_catalogue_from_folders_per_product(tmp_path):
    for product in ("sku-1", "sku-2"):
        (tmp_path / "drinks" / product).mkdir(parents=True)
        for i, src in enumerate(photos("Oatly-Oat-Milk", 2)):
            (tmp_path / "drinks" / product / f"{i}.jpg").write_bytes(src.read_bytes())
    items = data.read_catalogue(tmp_path)
    assert sorted({(i.product_id, i.category) for i in items}) == [("sku-1", "drinks"), ("sku-2", "drinks")]
    assert len(items) == 4


@pytest.mark.parametrize("mode", [
    ["--feature-views", "1", "--trainable-blocks", "0"],  # cached frozen features (the default)
    ["--feature-views", "0", "--trainable-blocks", "1"],  # fresh augmentations every step, a block fine-tuned
    # the GPU recipe's shape: every block fine-tuned, augmented in worker processes, decoded in threads
    ["--feature-views", "0", "--trainable-blocks", "16", "--workers", "2"],
], ids=["cached-features", "online-augmentation", "whole-backbone-workers"])
def test_tiny_training_run_end_to_end(tmp_path, mode):
    """A handful of steps on 5 products from a CSV catalogue: checkpoints, metrics JSON, exportable."""
    products = ["Banana", "Lemon", "Granny-Smith", "Oatly-Oat-Milk", "Arla-Standard-Milk"]
    rows = [f"{p},{product},test" for product in products for p in photos(product, 4)] * 2  # every file twice
    catalogue = tmp_path / "catalogue.csv"
    catalogue.write_text("path,product_id,category\n" + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    code = train.main(["--catalogue", str(catalogue), "--out", str(out), "--epochs", "2", "--max-steps", "3",
                       "--batch-size", "6", "--image-size", "64", "--val-fraction", "0.4", "--warmup-steps", "1", *mode])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_products"] == 3 and metrics["val_products"] == 2
    # repeated files weigh more in training but are validated once (a copy would be its own nearest neighbour)
    assert metrics["train_images"] == 3 * 4 * 2 and metrics["val_images"] == 2 * 4
    assert metrics["source"] == {"catalogue": str(catalogue)}
    epochs = metrics["epochs"]
    assert epochs and epochs[-1]["steps"] == 3
    assert np.isfinite(epochs[-1]["train_loss"]) and 0 <= epochs[-1]["val_map@r"] <= 1
    split = json.loads((out / "split.json").read_text())
    assert len(split["val_products"]) == 2 and not set(split["val_products"]) & set(split["train_products"])
    # Trained on 64 px crops (to be quick): export refuses it, as serving crops to 224 px, unless told
    with pytest.raises(ValueError, match="64 px"):
        load_checkpoint(out / "best.pt")
    model = load_checkpoint(out / "best.pt", any_image_size=True)
    start = build_pretrained_embedder()
    assert not torch.equal(model.proj.weight, start.proj.weight)  # training changed the projection
    onnx_path = tmp_path / "model.onnx"
    assert export.main(["--checkpoint", str(out / "best.pt"), "--out", str(onnx_path)]) == 2
    assert export.main(["--checkpoint", str(out / "best.pt"), "--out", str(onnx_path), "--any-image-size"]) == 0
    pixels = pixels_of(photos("Banana", 2))
    assert export.max_onnx_deviation(model, onnx_path, pixels) < 1e-4


def test_grocery_training_catalogue_adds_the_iconic_packshots():
    args = train.build_parser().parse_args(["--grocery", str(GROCERY), "--out", "x", "--iconic-copies", "3"])
    items = train.training_catalogue(args)
    photos_only = data.read_grocery(GROCERY, "train")
    packshots = [i for i in items if i.path.name.endswith("_Iconic.jpg")]
    assert len(items) == len(photos_only) + 3 * 81 and len(packshots) == 3 * 81
    assert {i.product_id for i in packshots} == {i.product_id for i in photos_only}
    assert train.main(["--catalogue", "x.csv", "--out", "x", "--iconic-copies", "2"]) == 2  # grocery only
    assert train.main(["--grocery", str(GROCERY), "--out", "x", "--iconic-copies", "-1"]) == 2
    assert train.main(["--grocery", str(GROCERY), "--out", "x", "--workers", "-1"]) == 2


def test_default_model_embeds_every_odd_image_or_rejects_it_clearly():
    """../shared/data/odd-images: every format, PIL mode and EXIF orientation embeds to a unit vector; only the
    truncated JPEG is refused, with InvalidImageError. (The `.svg` there is a JPEG by content and decodes.)"""
    from embedder.errors import InvalidImageError
    from embedder.preprocess import preprocess_bytes

    files = sorted(p for p in (data.data_dir() / "odd-images").rglob("*")
                   if p.is_file() and p.suffix.lower() not in {".md", ".pkl", ""} and p.name != "LICENSE")
    assert len(files) > 50
    pixels, refused = [], []
    for path in files:
        try:
            pixels.append(preprocess_bytes(path.read_bytes()))
        except InvalidImageError as exc:
            assert str(exc)
            refused.append(path.name)
    assert sorted(refused) == sorted(p.name for p in files if "corrupt" in p.name)
    session = ort.InferenceSession(str(default_model_path()), providers=["CPUExecutionProvider"])
    emb = np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: np.stack(pixels[i:i + 16])})[0]
                          for i in range(0, len(pixels), 16)])
    assert emb.shape == (len(files) - len(refused), 512) and np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
