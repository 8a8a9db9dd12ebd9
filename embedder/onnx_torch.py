"""Run the shipped ONNX graph in PyTorch, on any device and in any float precision.

Why: the production path is Triton on a GPU, where the embedding model may run in half precision (the
`--tensorrt-fp16` repository option). Whether half precision changes what the catalogue search returns is a
question about *this* file's numerics, not about a retrained checkpoint, and the GPU machines we are lent have
PyTorch but neither a CUDA ONNX Runtime nor TensorRT. So this module interprets the ONNX graph node by node with
torch operators: everything that depends only on weights and constants (the "same" padding amounts, clip bounds)
is folded once on the CPU when the module is built, and only the operators that touch the pixels run per call.

Only the operators the exported EfficientNet-Lite embedder uses are implemented; any other raises
`UnsupportedOnnxOperator` when the module is built, never silently at run time. `embedder.precision_check`
uses it; `tests/test_onnx_torch.py` checks it against ONNX Runtime on real photos.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper


class UnsupportedOnnxOperator(NotImplementedError):
    """The graph uses an operator (or an attribute of one) that this interpreter does not implement."""


def _attributes(node: onnx.NodeProto) -> dict:
    return {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}


def _axes(attrs: dict, inputs: list) -> list[int] | None:
    if len(inputs) > 1 and inputs[1] is not None:
        return [int(a) for a in inputs[1].tolist()]
    return list(attrs["axes"]) if "axes" in attrs else None


def _conv(inputs: list, attrs: dict) -> torch.Tensor:
    x, weight = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise UnsupportedOnnxOperator("Conv auto_pad")
    pads = list(attrs.get("pads", [0] * 4))
    half = len(pads) // 2
    if pads[:half] != pads[half:]:  # the exporter writes "same" padding as a Pad node, never this
        raise UnsupportedOnnxOperator("Conv with asymmetric pads")
    return F.conv2d(x, weight, bias, stride=list(attrs.get("strides", [1, 1])), padding=pads[:half],
                    dilation=list(attrs.get("dilations", [1, 1])), groups=int(attrs.get("group", 1)))


def _pad(inputs: list, attrs: dict) -> torch.Tensor:
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant" or (len(inputs) > 3 and inputs[3] is not None):
        raise UnsupportedOnnxOperator(f"Pad mode={mode} or with axes")
    x, pads = inputs[0], [int(p) for p in inputs[1].tolist()]
    value = float(inputs[2].item()) if len(inputs) > 2 and inputs[2] is not None else 0.0
    half = len(pads) // 2
    # ONNX lists all begins then all ends, first axis first; torch wants (begin, end) pairs, last axis first.
    return F.pad(x, [p for d in reversed(range(half)) for p in (pads[d], pads[d + half])], value=value)


def _clip(inputs: list, attrs: dict) -> torch.Tensor:
    if "_bounds" in attrs:  # resolved to Python numbers when the module was built (no device sync per call)
        low, high = attrs["_bounds"]
    else:
        low, high = (float(inputs[k].item()) if len(inputs) > k and inputs[k] is not None else None
                     for k in (1, 2))
    return torch.clamp(inputs[0], min=low, max=high)


def _slice(inputs: list, attrs: dict) -> torch.Tensor:
    x, starts, ends = inputs[0], inputs[1].tolist(), inputs[2].tolist()
    axes = inputs[3].tolist() if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
    steps = inputs[4].tolist() if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[axis] = slice(start, end, step)  # ONNX clamps out-of-range bounds as Python slicing does
    if all(step > 0 for step in steps):
        return x[tuple(index)]
    # torch has no negative-step slicing (the exporter writes a flip as one): pick the rows Python would.
    for axis, part in enumerate(index):
        if part.step is not None and part.step < 0:
            rows = list(range(x.shape[axis]))[part]
            x = x.index_select(axis, torch.tensor(rows, dtype=torch.long, device=x.device))
        elif part != slice(None):
            x = x[(slice(None),) * axis + (part,)]
    return x


def _reduce(fn: Callable) -> Callable:
    def run(inputs: list, attrs: dict) -> torch.Tensor:
        axes = _axes(attrs, inputs)
        keepdims = bool(attrs.get("keepdims", 1))
        return fn(inputs[0], dim=axes if axes is not None else list(range(inputs[0].dim())), keepdim=keepdims)
    return run


def _batch_norm(inputs: list, attrs: dict) -> torch.Tensor:
    x, scale, bias, mean, var = inputs[:5]
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=float(attrs.get("epsilon", 1e-5)))


def _gather(x: torch.Tensor, indices: torch.Tensor, axis: int) -> torch.Tensor:
    axis %= x.dim()
    picked = torch.index_select(x, axis, (indices.reshape(-1) % x.shape[axis]).to(x.device))
    return picked.reshape(list(x.shape[:axis]) + list(indices.shape) + list(x.shape[axis + 1:]))


def _unsqueezed_shape(shape: list[int], axes: list[int]) -> list[int]:
    rank = len(shape) + len(axes)
    for axis in sorted(a % rank for a in axes):
        shape.insert(axis, 1)
    return shape


_ONNX_TO_TORCH_DTYPE = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.BOOL: torch.bool,
}


def _cast(inputs: list, attrs: dict) -> torch.Tensor:
    target = _ONNX_TO_TORCH_DTYPE.get(int(attrs["to"]))
    if target is None:
        raise UnsupportedOnnxOperator(f"Cast to ONNX type {attrs['to']}")
    return inputs[0].to(target)


def _constant_of_shape(inputs: list, attrs: dict) -> torch.Tensor:
    value = torch.from_numpy(numpy_helper.to_array(attrs["value"]).copy()) if "value" in attrs \
        else torch.zeros(1, dtype=torch.float32)
    return value.reshape(()).expand([int(d) for d in inputs[0].tolist()]).clone()


_OPERATORS: dict[str, Callable[[list, dict], torch.Tensor]] = {
    "Conv": _conv,
    "Pad": _pad,
    "Clip": _clip,
    "Slice": _slice,
    "Cast": _cast,
    "ConstantOfShape": _constant_of_shape,
    "BatchNormalization": _batch_norm,
    "ReduceMean": _reduce(torch.mean),
    "ReduceL2": _reduce(lambda x, dim, keepdim: torch.linalg.vector_norm(x, dim=dim, keepdim=keepdim)),
    "Add": lambda i, a: i[0] + i[1],
    "Mul": lambda i, a: i[0] * i[1],
    "Div": lambda i, a: i[0] / i[1],
    "Pow": lambda i, a: torch.pow(i[0], i[1]),
    "Reciprocal": lambda i, a: torch.reciprocal(i[0]),
    "MatMul": lambda i, a: torch.matmul(i[0], i[1]),
    "Shape": lambda i, a: torch.tensor(list(i[0].shape), dtype=torch.int64),
    "Expand": lambda i, a: torch.broadcast_to(i[0], torch.broadcast_shapes(i[0].shape, tuple(i[1].tolist()))),
    "Reshape": lambda i, a: i[0].reshape([int(d) if d != 0 else i[0].shape[k] for k, d in enumerate(i[1].tolist())]),
    "Concat": lambda i, a: torch.cat(i, dim=int(a["axis"])),
    "Identity": lambda i, a: i[0],
    "Unsqueeze": lambda i, a: i[0].reshape(_unsqueezed_shape(list(i[0].shape), [int(v) for v in i[1].tolist()])),
    "Gather": lambda i, a: _gather(i[0], i[1], int(a.get("axis", 0))),
    "Transpose": lambda i, a: i[0].permute(list(a["perm"])) if "perm" in a else i[0].permute(
        list(reversed(range(i[0].dim())))),
}


class OnnxGraphModule(torch.nn.Module):
    """The ONNX graph's single input -> single output, run with torch operators.

    `to(device)` / `to(dtype)` move the weights like any module: floating-point weights and folded float
    constants take the module's dtype, integer constants (shapes, pads) stay int64 on the CPU.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        graph = model.graph
        if len(graph.input) - len({i.name for i in graph.initializer} & {i.name for i in graph.input}) != 1 \
                or len(graph.output) != 1:
            raise UnsupportedOnnxOperator("only graphs with one input and one output are supported")
        initializers = {init.name for init in graph.initializer}
        self.input_name = next(i.name for i in graph.input if i.name not in initializers)
        self.output_name = graph.output[0].name

        constants: dict[str, torch.Tensor] = {
            init.name: torch.from_numpy(numpy_helper.to_array(init).copy()) for init in graph.initializer}
        self._steps: list[tuple[str, list[str], dict, list[str]]] = []
        for node in graph.node:
            attrs = _attributes(node)
            if node.op_type == "Constant":
                constants[node.output[0]] = torch.from_numpy(numpy_helper.to_array(attrs["value"]).copy())
                continue
            if node.op_type not in _OPERATORS:
                raise UnsupportedOnnxOperator(node.op_type)
            if all(name == "" or name in constants for name in node.input):
                # Depends on weights and constants only: fold it now, on the CPU, in the file's own precision.
                args = [constants[name] if name else None for name in node.input]
                constants[node.output[0]] = _OPERATORS[node.op_type](args, attrs)
            else:
                inputs = list(node.input)
                if node.op_type == "Clip" and all(name == "" or name in constants for name in inputs[1:]):
                    attrs["_bounds"] = tuple(float(constants[name].item()) if name else None
                                             for name in (inputs[1:] + ["", ""])[:2])
                    inputs = inputs[:1]
                self._steps.append((node.op_type, inputs, attrs, list(node.output)))

        used = {name for _, inputs, _, _ in self._steps for name in inputs}
        self._float_names: dict[str, str] = {}
        self._fixed: dict[str, torch.Tensor] = {}
        for index, name in enumerate(sorted(n for n in used if n in constants)):
            value = constants[name]
            if value.is_floating_point():  # weights and float constants follow .to(device, dtype)
                buffer_name = f"c{index}"
                self.register_buffer(buffer_name, value)
                self._float_names[name] = buffer_name
            else:  # shapes and pads: int64 on the CPU, read as Python numbers
                self._fixed[name] = value

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        values: dict[str, torch.Tensor | None] = {self.input_name: pixels, "": None, **self._fixed}
        for name, buffer_name in self._float_names.items():
            values[name] = getattr(self, buffer_name)
        for op_type, inputs, attrs, outputs in self._steps:
            values[outputs[0]] = _OPERATORS[op_type]([values[name] for name in inputs], attrs)
        return values[self.output_name]


def load_onnx_as_torch(path: Path) -> OnnxGraphModule:
    """The ONNX file at `path` as an eval-mode torch module (float32, CPU; move it with `.to`)."""
    return OnnxGraphModule(onnx.load(str(path))).eval()


def onnx_torch_embed_fn(module: OnnxGraphModule, *, device: str = "cpu",
                        dtype: torch.dtype = torch.float32) -> Callable[[np.ndarray], np.ndarray]:
    """An `embedder.evaluate.EmbedFn`: float32 pixels in, float32 embeddings out, computed on `device`/`dtype`."""
    module = module.to(device=device, dtype=dtype)

    def embed(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = module(torch.from_numpy(pixels).to(device=device, dtype=dtype))
        return out.float().cpu().numpy()

    return embed
