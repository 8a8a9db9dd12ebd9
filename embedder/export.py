"""`imgsearch-embed export`: a checkpoint (or the untrained ImageNet starting point) to ONNX.

The graph follows the model contract: input `pixels` float32 [N,3,224,224] (embedder.preprocess.image_to_tensor),
output `embedding` float32 [N,512], L2-normalised, dynamic batch axis.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from embedder.errors import CheckpointImageSizeError
from embedder.model import build_pretrained_embedder, load_checkpoint
from embedder.model_files import INPUT_NAME, OUTPUT_NAME
from embedder.preprocess import DEFAULT_IMAGE_SIZE

OPSET = 17


class FlipAveragedEmbedder(torch.nn.Module):
    """Test-time augmentation inside the graph: the embeddings of an image and of its mirror image, summed and
    re-normalised. Every serving path (in-process ONNX Runtime, Triton) then gets it without a code change, at
    twice the model's compute (both halves run as one batch)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        both = self.model(torch.cat([pixels, torch.flip(pixels, dims=[3])]))
        count = pixels.shape[0]
        return torch.nn.functional.normalize(both[:count] + both[count:], dim=1)


def export_onnx(model: torch.nn.Module, out: Path, *, image_size: int = DEFAULT_IMAGE_SIZE) -> Path:
    """Write `model` (eval mode) as a single-file ONNX graph with a dynamic batch axis."""
    model = model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(2, 3, image_size, image_size)
    tmp = out.with_suffix(".onnx.tmp")
    try:
        with torch.no_grad():
            # The TorchScript exporter: the dynamo one needs onnxscript, which this project does not ship.
            torch.onnx.export(
                model, (dummy,), str(tmp), dynamo=False, opset_version=OPSET, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )
        _pin_embedding_width(tmp, _embedding_width(model, image_size))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)  # a failed export left a 16 MB .onnx.tmp behind (review)
    return out


def _embedding_width(model: torch.nn.Module, image_size: int) -> int:
    with torch.no_grad():
        return int(model(torch.zeros(1, 3, image_size, image_size)).shape[1])


def _pin_embedding_width(path: Path, width: int) -> None:
    """The exporter leaves the output's second axis symbolic (shape inference stops at the L2 division);
    pin it so Triton and clients read [batch, 512] from the graph itself."""
    import onnx

    proto = onnx.load(str(path))
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    dims[1].Clear()
    dims[1].dim_value = width
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def max_onnx_deviation(model: torch.nn.Module, onnx_path: Path, pixels: np.ndarray) -> float:
    """1 - min cosine between PyTorch and ONNX Runtime embeddings of `pixels` (N,3,H,W)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_out = session.run([OUTPUT_NAME], {INPUT_NAME: pixels.astype(np.float32)})[0]
    with torch.no_grad():
        torch_out = model.eval()(torch.from_numpy(pixels)).numpy()
    cos = (onnx_out * torch_out).sum(1) / (np.linalg.norm(onnx_out, axis=1) * np.linalg.norm(torch_out, axis=1))
    return float(1.0 - cos.min())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imgsearch-embed export", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="checkpoint written by `imgsearch-embed train`")
    source.add_argument("--pretrained", action="store_true",
                        help="no fine-tuning: ImageNet backbone + GeM + a fixed random orthogonal projection")
    parser.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    parser.add_argument("--seed", type=int, default=0, help="projection seed for --pretrained")
    parser.add_argument("--any-image-size", action="store_true",
                        help="export a checkpoint trained on crops of another size than serving's 224 px")
    parser.add_argument("--flip-average", action="store_true",
                        help="embed each image and its mirror image and average them (2x the compute)")
    args = parser.parse_args(argv)
    if args.out.is_dir():
        parser.error(f"--out {args.out} is a folder: give the ONNX file to write")
    if args.checkpoint is not None and args.out.resolve() == args.checkpoint.resolve():
        parser.error("--out is the checkpoint itself: it would be overwritten")

    torch.manual_seed(args.seed)
    try:
        model = (load_checkpoint(args.checkpoint, any_image_size=args.any_image_size) if args.checkpoint
                 else build_pretrained_embedder(seed=args.seed))
    except ValueError as exc:
        hint = " (--any-image-size exports it anyway)" if isinstance(exc, CheckpointImageSizeError) else ""
        print(f"imgsearch-embed export: {exc}{hint}", file=sys.stderr)
        return 2
    if args.flip_average:
        model = FlipAveragedEmbedder(model.eval())
    export_onnx(model, args.out)
    rng = np.random.default_rng(0)
    deviation = max_onnx_deviation(model, args.out, rng.standard_normal((3, 3, 224, 224)).astype(np.float32))
    size_mb = args.out.stat().st_size / 1e6
    print(f"wrote {args.out} ({size_mb:.1f} MB); max 1-cosine vs PyTorch on random input: {deviation:.2e}")
    if deviation > 1e-4:
        print("ONNX output deviates from PyTorch", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
