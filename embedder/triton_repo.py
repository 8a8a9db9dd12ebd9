"""Write a Triton model repository that serves the embedding model from encoded image bytes.

Three models:

- ``imgsearch_preprocess`` (python backend): ``image`` TYPE_STRING [1] (encoded bytes) -> ``pixels`` FP32
  [3,224,224], through embedder.preprocess, so training and serving preprocess identically.
- ``imgsearch_embedding``: ``pixels`` -> ``embedding`` FP32 [512], the ONNX file, dynamic batching. On GPU
  servers (the NGC Triton image) it uses the onnxruntime backend, optionally with the TensorRT FP16
  accelerator. The tritonserver shipped in nvidia-pytriton has only the python backend, so for it
  (``embedding_backend="python"``) the same ONNX file runs through ONNX Runtime inside a python-backend model
  with the same tensors and batching.
- ``imgsearch`` (ensemble): ``image`` bytes in, ``embedding`` out. Clients only ever talk to this one.

Configs are built as ``model_config_pb2.ModelConfig`` messages and written as protobuf text, so they are
valid by construction and tests read them back with the same schema.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from embedder.model_files import INPUT_NAME, OUTPUT_NAME, default_model_path
from embedder.preprocess import DEFAULT_IMAGE_SIZE, DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS

ENSEMBLE_MODEL = "imgsearch"
PREPROCESS_MODEL = "imgsearch_preprocess"
EMBEDDING_MODEL = "imgsearch_embedding"
IMAGE_INPUT = "image"
EMBEDDING_DIM = 512
ONNX_FILENAME = "model.onnx"
_SOURCES = Path(__file__).resolve().parent / "triton_models"

InstanceKind = Literal["KIND_CPU", "KIND_GPU"]
EmbeddingBackend = Literal["onnxruntime", "python"]


@dataclass(frozen=True, kw_only=True)
class RepositoryOptions:
    """Serving knobs of the generated repository (defaults suit a small CPU box and a single GPU alike)."""

    max_batch_size: int = 32
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32)
    # Short: the client already batches concurrent calls; the server only evens out bursts.
    max_queue_delay_us: int = 2000
    # Longest a request waits in a model's queue; a request's own `timeout` (the client's deadline) overrides it
    # when shorter. Triton honours a request timeout only when this default is non-zero.
    queue_timeout_us: int = 60_000_000
    embedding_instances: int = 1
    preprocess_instances: int = 1
    intra_op_threads: int = 0  # 0: ONNX Runtime picks (all cores)
    # ONNX Runtime's spin-waiting threads steal the few cores that decoding needs (python backend only);
    # compare with `imgsearch-embed bench --allow-spinning` on a small shared box.
    allow_spinning: bool = False
    image_size: int = DEFAULT_IMAGE_SIZE
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


def _params(config: mc.ModelConfig, **values: object) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = str(value)


def _dynamic_batching(config: mc.ModelConfig, options: RepositoryOptions) -> None:
    sizes = [s for s in options.preferred_batch_sizes if s <= options.max_batch_size]
    config.dynamic_batching.preferred_batch_size.extend(sizes)
    config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    policy = config.dynamic_batching.default_queue_policy
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.default_timeout_microseconds = options.queue_timeout_us
    policy.allow_timeout_override = True


def preprocess_config(options: RepositoryOptions) -> mc.ModelConfig:
    config = mc.ModelConfig(name=PREPROCESS_MODEL, backend="python", max_batch_size=options.max_batch_size)
    config.input.add(name=IMAGE_INPUT, data_type=mc.TYPE_STRING, dims=[1])
    size = options.image_size
    config.output.add(name=INPUT_NAME, data_type=mc.TYPE_FP32, dims=[3, size, size])
    _dynamic_batching(config, options)
    # Decoding is CPU work whatever the embedding model runs on.
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=options.preprocess_instances)
    _params(config, image_size=size, max_image_bytes=options.max_image_bytes,
            max_image_pixels=options.max_image_pixels)
    return config


def embedding_config(
    options: RepositoryOptions,
    *,
    instance_kind: InstanceKind,
    tensorrt_fp16: bool,
    embedding_backend: EmbeddingBackend,
) -> mc.ModelConfig:
    if tensorrt_fp16 and (instance_kind != "KIND_GPU" or embedding_backend != "onnxruntime"):
        raise ValueError("the TensorRT FP16 accelerator needs instance_kind=KIND_GPU and the onnxruntime backend")
    if embedding_backend == "python" and instance_kind != "KIND_CPU":
        raise ValueError("the python-backend embedding model runs ONNX Runtime on the CPU only")
    config = mc.ModelConfig(name=EMBEDDING_MODEL, backend=embedding_backend, max_batch_size=options.max_batch_size)
    if embedding_backend == "onnxruntime":
        config.default_model_filename = ONNX_FILENAME
    else:  # the python backend insists its default_model_filename is the model.py; it finds the ONNX by name
        _params(config, onnx_filename=ONNX_FILENAME, allow_spinning=int(options.allow_spinning))
    size = options.image_size
    config.input.add(name=INPUT_NAME, data_type=mc.TYPE_FP32, dims=[3, size, size])
    config.output.add(name=OUTPUT_NAME, data_type=mc.TYPE_FP32, dims=[EMBEDDING_DIM])
    _dynamic_batching(config, options)
    config.instance_group.add(kind=mc.ModelInstanceGroup.Kind.Value(instance_kind), count=options.embedding_instances)
    # Both backends read these names (the onnxruntime backend documents them; ours mirrors it).
    _params(config, intra_op_thread_count=options.intra_op_threads, inter_op_thread_count=1)
    if tensorrt_fp16:
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        accelerator.parameters["precision_mode"] = "FP16"
        accelerator.parameters["max_workspace_size_bytes"] = str(1 << 30)
        accelerator.parameters["trt_engine_cache_enable"] = "1"
    return config


def ensemble_config(options: RepositoryOptions) -> mc.ModelConfig:
    config = mc.ModelConfig(name=ENSEMBLE_MODEL, platform="ensemble", max_batch_size=options.max_batch_size)
    config.input.add(name=IMAGE_INPUT, data_type=mc.TYPE_STRING, dims=[1])
    config.output.add(name=OUTPUT_NAME, data_type=mc.TYPE_FP32, dims=[EMBEDDING_DIM])
    steps = config.ensemble_scheduling.step
    preprocess = steps.add(model_name=PREPROCESS_MODEL, model_version=-1)
    preprocess.input_map[IMAGE_INPUT] = IMAGE_INPUT
    preprocess.output_map[INPUT_NAME] = "preprocessed_pixels"
    embed = steps.add(model_name=EMBEDDING_MODEL, model_version=-1)
    embed.input_map[INPUT_NAME] = "preprocessed_pixels"
    embed.output_map[OUTPUT_NAME] = OUTPUT_NAME
    return config


def _write_config(model_dir: Path, config: mc.ModelConfig) -> None:
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config))


def write_model_repository(
    dest: str | Path,
    *,
    model_path: str | Path | None = None,
    instance_kind: InstanceKind = "KIND_CPU",
    tensorrt_fp16: bool = False,
    embedding_backend: EmbeddingBackend = "onnxruntime",
    options: RepositoryOptions | None = None,
) -> Path:
    """Write the three models under `dest` (created; existing files of these models are replaced)."""
    options = options or RepositoryOptions()
    model_path = Path(model_path) if model_path else default_model_path()
    if not model_path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {model_path}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)

    preprocess_dir = dest / PREPROCESS_MODEL
    _write_config(preprocess_dir, preprocess_config(options))
    shutil.copyfile(_SOURCES / "preprocess_model.py", preprocess_dir / "1" / "model.py")

    embedding_dir = dest / EMBEDDING_MODEL
    config = embedding_config(options, instance_kind=instance_kind, tensorrt_fp16=tensorrt_fp16,
                              embedding_backend=embedding_backend)
    _write_config(embedding_dir, config)
    shutil.copyfile(model_path, embedding_dir / "1" / ONNX_FILENAME)
    stale = embedding_dir / "1" / "model.py"
    if embedding_backend == "python":
        shutil.copyfile(_SOURCES / "onnx_python_model.py", stale)
    elif stale.exists():
        stale.unlink()

    _write_config(dest / ENSEMBLE_MODEL, ensemble_config(options))
    return dest


def read_config(model_dir: str | Path) -> mc.ModelConfig:
    """Parse a model's config.pbtxt with Triton's own schema."""
    return text_format.Parse(Path(model_dir, "config.pbtxt").read_text(), mc.ModelConfig())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imgsearch-embed triton-repo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="repository directory to write")
    parser.add_argument("--model", type=Path, default=None, help="ONNX file (default: the shipped model)")
    parser.add_argument("--gpu", action="store_true", help="GPU instance group for the embedding model")
    parser.add_argument("--tensorrt-fp16", action="store_true", help="TensorRT FP16 accelerator (needs --gpu)")
    parser.add_argument("--embedding-backend", choices=["onnxruntime", "python"], default="onnxruntime",
                        help="python: ONNX Runtime inside a python-backend model, for a tritonserver that has "
                             "no onnxruntime backend (the one in nvidia-pytriton)")
    parser.add_argument("--max-batch-size", type=int, default=RepositoryOptions.max_batch_size)
    parser.add_argument("--max-queue-delay-us", type=int, default=RepositoryOptions.max_queue_delay_us)
    parser.add_argument("--instances", type=int, default=1, help="embedding model instances")
    parser.add_argument("--preprocess-instances", type=int, default=RepositoryOptions.preprocess_instances,
                        help="decoding instances (processes, one core each): a GPU embeds far faster than one "
                             "core decodes, so give it about as many as the server has cores")
    args = parser.parse_args(argv)
    if args.instances < 1 or args.preprocess_instances < 1:
        parser.error("--instances and --preprocess-instances must be at least 1")
    if args.max_batch_size < 1 or args.max_queue_delay_us < 0:
        parser.error("--max-batch-size must be at least 1 and --max-queue-delay-us at least 0")
    if args.model is not None and args.model.is_file():
        try:
            import onnx
        except ImportError:
            parser.error("checking --model needs the onnx package: pip install 'onnx>=1.16' (or the train extra)")

        try:  # a PyTorch checkpoint was copied in as model.onnx, and Triton failed only when it loaded it (review)
            onnx.load_model(str(args.model), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and others for what is not ONNX
            parser.error(f"--model {args.model} is not an ONNX model ({type(exc).__name__}); export a checkpoint "
                         "with `imgsearch-embed export` first")
    if args.tensorrt_fp16 and not args.gpu:
        parser.error("--tensorrt-fp16 needs --gpu")
    options = RepositoryOptions(max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
                                embedding_instances=args.instances, preprocess_instances=args.preprocess_instances)
    try:
        out = write_model_repository(
            args.out, model_path=args.model, instance_kind="KIND_GPU" if args.gpu else "KIND_CPU",
            tensorrt_fp16=args.tensorrt_fp16, embedding_backend=args.embedding_backend, options=options,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
