"""embedder.onnx_torch runs the shipped ONNX file like ONNX Runtime does; embedder.precision_check reports it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from embedder import data, precision_check
from embedder.model_files import INPUT_NAME, OUTPUT_NAME, default_model_path
from embedder.onnx_torch import UnsupportedOnnxOperator, load_onnx_as_torch, onnx_torch_embed_fn


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)


def test_the_shipped_model_in_torch_matches_onnx_runtime_on_real_photos(grocery_dir):
    items = data.read_grocery(grocery_dir, "val")[::60]
    pixels = np.stack([data.eval_tensor(data.load_image(item.path)) for item in items])
    session = ort.InferenceSession(str(default_model_path()), providers=["CPUExecutionProvider"])
    reference = session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]

    ours = onnx_torch_embed_fn(load_onnx_as_torch(default_model_path()))(pixels)

    assert ours.shape == reference.shape == (len(items), 512)
    assert np.abs(ours - reference).max() < 1e-5
    # bfloat16 keeps 8 bits of mantissa: close, but measurably not the same embedding.
    half = onnx_torch_embed_fn(load_onnx_as_torch(default_model_path()), dtype=torch.bfloat16)(pixels)
    cosines = np.sum(half * reference, axis=1) / np.linalg.norm(half, axis=1)
    assert 0.98 < cosines.min() < 0.99999


def _graph_with(node: onnx.NodeProto, path):
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_an_operator_it_does_not_implement_is_refused_when_the_module_is_built(tmp_path):
    path = _graph_with(helper.make_node("Softmax", ["x"], ["y"]), tmp_path / "softmax.onnx")
    with pytest.raises(UnsupportedOnnxOperator, match="Softmax"):
        load_onnx_as_torch(path)


def test_a_small_graph_agrees_with_onnx_runtime_op_by_op(tmp_path):
    """Clip with constant bounds, Pad, Conv and the GeM-style Pow/ReduceMean, checked against ONNX Runtime."""
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2, 3, 3, 3], rng.standard_normal(54).astype(np.float32))
    nodes = [
        helper.make_node("Constant", [], ["lo"], value=helper.make_tensor("lo", TensorProto.FLOAT, [], [0.0])),
        helper.make_node("Constant", [], ["hi"], value=helper.make_tensor("hi", TensorProto.FLOAT, [], [6.0])),
        helper.make_node("Constant", [], ["pads"],
                         value=helper.make_tensor("pads", TensorProto.INT64, [8], [0, 0, 0, 1, 0, 0, 1, 2])),
        helper.make_node("Pad", ["x", "pads"], ["padded"], mode="constant"),
        helper.make_node("Conv", ["padded", "w"], ["conv"], strides=[2, 2]),
        helper.make_node("Clip", ["conv", "lo", "hi"], ["clipped"]),
        helper.make_node("Constant", [], ["p"], value=helper.make_tensor("p", TensorProto.FLOAT, [], [3.0])),
        helper.make_node("Pow", ["clipped", "p"], ["cubed"]),
        helper.make_node("ReduceMean", ["cubed"], ["y"], axes=[2, 3], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 9, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])], initializer=[weight])
    path = tmp_path / "small.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = rng.standard_normal((2, 3, 9, 10)).astype(np.float32)

    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.inference_mode():
        ours = load_onnx_as_torch(path)(torch.from_numpy(x)).numpy()

    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


def test_precision_check_on_the_cpu_writes_its_report(grocery_dir, tmp_path, capsys):
    out = tmp_path / "precision.json"
    assert precision_check.main(["--data", str(grocery_dir), "--val-limit", "12", "--train-per-product", "1",
                                 "--device", "cpu", "--out", str(out)]) == 0

    result = json.loads(out.read_text())
    assert result["photos"] == {"val": 12, "train": 81, "iconic": 81}
    reference = result["variants"]["onnxruntime cpu float32 (reference)"]
    same = result["variants"]["torch cpu float32"]
    assert reference["val_vs_iconic"]["top1_changed"] == same["val_vs_iconic"]["top1_changed"] == 0
    assert same["cosine_min"] > 0.99999
    assert same["val_vs_train"]["recall@1"] == reference["val_vs_train"]["recall@1"]
    assert result["variants"]["torch cpu bfloat16"]["cosine_min"] < 0.99999
    assert result["speed"] == []  # model speed is timed on a GPU only
    assert result["preprocess_ms_per_photo"] > 0
    assert "| torch cpu bfloat16 |" in capsys.readouterr().out


def test_a_flip_averaged_export_runs_too(tmp_path):
    """`imgsearch-embed export --flip-average` adds a flip (a negative-step Slice), Gather and Unsqueeze."""
    from embedder.export import FlipAveragedEmbedder, export_onnx
    from embedder.model import build_pretrained_embedder

    path = export_onnx(FlipAveragedEmbedder(build_pretrained_embedder().eval()), tmp_path / "flip.onnx")
    x = np.random.default_rng(1).standard_normal((3, 3, 224, 224)).astype(np.float32)
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {INPUT_NAME: x})[0]
    with torch.inference_mode():
        ours = load_onnx_as_torch(path)(torch.from_numpy(x)).numpy()
    assert np.abs(ours - reference).max() < 1e-5
