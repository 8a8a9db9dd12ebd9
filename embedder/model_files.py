"""Where the shipped embedding model lives; everything that loads a model by default goes through here."""

from __future__ import annotations

import os
from pathlib import Path

MODEL_ENV_VAR = "IMGSEARCH_MODEL"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "models" / "default"
INPUT_NAME = "pixels"
OUTPUT_NAME = "embedding"


def default_model_path() -> Path:
    """The ONNX model to serve: $IMGSEARCH_MODEL when set, else the artifact shipped in the package."""
    override = os.environ.get(MODEL_ENV_VAR)
    return Path(override) if override else DEFAULT_MODEL_DIR / "model.onnx"
