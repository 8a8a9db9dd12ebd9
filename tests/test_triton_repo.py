"""The generated Triton model repository, read back with Triton's own model_config_pb2."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from embedder.triton_repo import RepositoryOptions, main, write_model_repository


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    # The repository writer only copies the file; the CLI checks that it is ONNX: a one-node graph is enough.
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["pixels"], ["embedding"])], "tiny",
                              [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1])])
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    onnx.save_model(helper.make_model(graph), str(path))
    return path


def _config(repo: Path, model: str) -> mc.ModelConfig:
    return text_format.Parse((repo / model / "config.pbtxt").read_text(), mc.ModelConfig())


def test_cpu_repository_layout_and_configs(tmp_path, onnx_file):
    repo = write_model_repository(tmp_path / "repo", model_path=onnx_file)
    assert sorted(p.name for p in repo.iterdir()) == ["imgsearch", "imgsearch_embedding", "imgsearch_preprocess"]
    assert (repo / "imgsearch_embedding" / "1" / "model.onnx").read_bytes() == onnx_file.read_bytes()
    assert (repo / "imgsearch_preprocess" / "1" / "model.py").is_file()
    assert (repo / "imgsearch" / "1").is_dir()

    embedding = _config(repo, "imgsearch_embedding")
    assert embedding.name == "imgsearch_embedding"
    assert embedding.backend == "onnxruntime"
    assert embedding.default_model_filename == "model.onnx"
    assert embedding.max_batch_size == 32
    assert [(i.name, i.data_type, list(i.dims)) for i in embedding.input] == [("pixels", mc.TYPE_FP32, [3, 224, 224])]
    assert [(o.name, o.data_type, list(o.dims)) for o in embedding.output] == [("embedding", mc.TYPE_FP32, [512])]
    assert list(embedding.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    assert 0 < embedding.dynamic_batching.max_queue_delay_microseconds <= 5000
    assert [(g.kind, g.count) for g in embedding.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 1)]
    assert not embedding.optimization.execution_accelerators.gpu_execution_accelerator

    preprocess = _config(repo, "imgsearch_preprocess")
    assert preprocess.backend == "python"
    assert [(i.name, i.data_type, list(i.dims)) for i in preprocess.input] == [("image", mc.TYPE_STRING, [1])]
    assert [(o.name, o.data_type, list(o.dims)) for o in preprocess.output] == [("pixels", mc.TYPE_FP32, [3, 224, 224])]
    assert preprocess.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert preprocess.parameters["image_size"].string_value == "224"
    # A request whose deadline (tritonclient's `timeout`, forwarded by the ensemble) passes in a queue is dropped
    # there, before it is decoded: Triton applies a request's timeout only under a non-zero default.
    for config in (preprocess, embedding):
        policy = config.dynamic_batching.default_queue_policy
        assert policy.timeout_action == mc.ModelQueuePolicy.REJECT
        assert policy.allow_timeout_override and policy.default_timeout_microseconds > 0

    ensemble = _config(repo, "imgsearch")
    assert ensemble.platform == "ensemble"
    assert ensemble.max_batch_size <= min(embedding.max_batch_size, preprocess.max_batch_size)
    assert [i.name for i in ensemble.input] == ["image"] and ensemble.input[0].data_type == mc.TYPE_STRING
    assert [o.name for o in ensemble.output] == ["embedding"]
    steps = ensemble.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["imgsearch_preprocess", "imgsearch_embedding"]
    # The tensor produced by step 1 is the one consumed by step 2, and the ensemble's ends are wired.
    assert steps[0].input_map["image"] == "image"
    assert steps[0].output_map["pixels"] == steps[1].input_map["pixels"]
    assert steps[1].output_map["embedding"] == "embedding"


def test_gpu_repository_with_tensorrt_fp16(tmp_path, onnx_file):
    repo = write_model_repository(tmp_path, model_path=onnx_file, instance_kind="KIND_GPU", tensorrt_fp16=True,
                                  options=RepositoryOptions(embedding_instances=2))
    embedding = _config(repo, "imgsearch_embedding")
    assert [(g.kind, g.count) for g in embedding.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, 2)]
    (accelerator,) = embedding.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert accelerator.parameters["precision_mode"] == "FP16"
    # Preprocessing stays on the CPU.
    assert _config(repo, "imgsearch_preprocess").instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU


def test_python_embedding_backend_for_the_pytriton_server(tmp_path, onnx_file):
    repo = write_model_repository(tmp_path, model_path=onnx_file, embedding_backend="python")
    embedding = _config(repo, "imgsearch_embedding")
    assert embedding.backend == "python"
    assert embedding.default_model_filename == ""  # the python backend requires model.py
    assert embedding.parameters["onnx_filename"].string_value == "model.onnx"
    assert embedding.parameters["allow_spinning"].string_value == "0"
    assert (repo / "imgsearch_embedding" / "1" / "model.py").is_file()
    assert (repo / "imgsearch_embedding" / "1" / "model.onnx").is_file()
    # Rewriting as onnxruntime removes the python model file.
    write_model_repository(tmp_path, model_path=onnx_file)
    assert not (repo / "imgsearch_embedding" / "1" / "model.py").exists()


def test_invalid_combinations_are_refused(tmp_path, onnx_file):
    with pytest.raises(ValueError):
        write_model_repository(tmp_path, model_path=onnx_file, tensorrt_fp16=True)  # CPU + TensorRT
    with pytest.raises(ValueError):
        write_model_repository(tmp_path, model_path=onnx_file, instance_kind="KIND_GPU", embedding_backend="python")
    with pytest.raises(FileNotFoundError):
        write_model_repository(tmp_path, model_path=tmp_path / "missing.onnx")


def test_cli(tmp_path, onnx_file, capsys):
    assert main(["--out", str(tmp_path / "r"), "--model", str(onnx_file), "--gpu", "--tensorrt-fp16"]) == 0
    assert _config(tmp_path / "r", "imgsearch_embedding").instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert main(["--out", str(tmp_path / "r2"), "--model", str(tmp_path / "nope.onnx")]) == 2
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "r3"), "--model", str(onnx_file), "--tensorrt-fp16"])
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "r4"), "--model", str(onnx_file), "--preprocess-instances", "0"])
    assert "at least 1" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "r5"), "--model", str(onnx_file), "--preprocess-instances", "3"]) == 0
    assert [g.count for g in _config(tmp_path / "r5", "imgsearch_preprocess").instance_group] == [3]


def test_serve_takes_the_number_of_decoding_instances():
    from embedder.triton_server import ServeConfig

    assert ServeConfig.from_env([]).preprocess_instances == 1
    assert ServeConfig.from_env(["--preprocess-instances", "3"]).preprocess_instances == 3
    with pytest.raises(SystemExit):
        ServeConfig.from_env(["--preprocess-instances", "0"])
