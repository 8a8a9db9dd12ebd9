"""Triton python-backend model `imgsearch_preprocess`: encoded image bytes -> model pixels.

It calls embedder.preprocess, the code training and evaluation use, so serving sees exactly the training
transform. A bad image fails only its own request, with a message starting with the error's class name
(`InvalidImageError: ...`, `ImageTooLargeError: ...`) that clients map back to embedder.errors; the model
itself keeps serving.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from embedder.errors import ImageTooLargeError, InvalidImageError
from embedder.preprocess import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    preprocess_bytes,
)

INPUT_NAME = "image"
OUTPUT_NAME = "pixels"


def _parameters(model_config: dict) -> dict[str, str]:
    return {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = _parameters(json.loads(args["model_config"]))
        self.image_size = int(params.get("image_size", DEFAULT_IMAGE_SIZE))
        self.limits = {
            "max_image_bytes": int(params.get("max_image_bytes", DEFAULT_MAX_IMAGE_BYTES)),
            "max_image_pixels": int(params.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)),
        }

    def _pixels(self, request) -> np.ndarray:
        encoded = pb_utils.get_input_tensor_by_name(request, INPUT_NAME).as_numpy().reshape(-1)
        return np.stack([preprocess_bytes(bytes(item), self.image_size, **self.limits) for item in encoded])

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                pixels = self._pixels(request)
            except (InvalidImageError, ImageTooLargeError) as exc:
                error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}", pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            except Exception as exc:  # noqa: BLE001 - never let one request take the model down
                error = pb_utils.TritonError(f"preprocessing failed: {type(exc).__name__}: {exc}")
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT_NAME, pixels)]))
        return responses
