"""Triton python-backend model `imgsearch_embedding` for servers without Triton's onnxruntime backend.

The `tritonserver` shipped in nvidia-pytriton carries only the python backend, so on such a server the
embedding model runs the very same ONNX file through ONNX Runtime here, with the same tensor names, shapes and
dynamic batching as the onnxruntime-backend configuration used on GPU servers: the ensemble and every client
are identical either way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

INPUT_NAME = "pixels"
OUTPUT_NAME = "embedding"


def _parameters(model_config: dict) -> dict[str, str]:
    return {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = _parameters(config)
        filename = params.get("onnx_filename", "model.onnx")
        path = Path(args["model_repository"]) / args["model_version"] / filename
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_thread_count", "0"))
        options.inter_op_num_threads = int(params.get("inter_op_thread_count", "1"))
        # Spinning intra-op threads burn the cores the preprocessing model needs when they are few.
        options.add_session_config_entry("session.intra_op.allow_spinning", params.get("allow_spinning", "1"))
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def execute(self, requests: list) -> list:
        # The dynamic batcher hands over several requests at once: run them as one ONNX batch.
        batches = [pb_utils.get_input_tensor_by_name(r, INPUT_NAME).as_numpy() for r in requests]
        try:
            embeddings = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.concatenate(batches)})[0]
        except Exception as exc:  # noqa: BLE001 - answered as an error response, never a dead model
            error = pb_utils.TritonError(f"onnxruntime failed: {type(exc).__name__}: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses, start = [], 0
        for batch in batches:
            part = np.ascontiguousarray(embeddings[start : start + len(batch)], dtype=np.float32)
            start += len(batch)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT_NAME, part)]))
        return responses
