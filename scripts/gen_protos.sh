#!/usr/bin/env bash
# Regenerates the Python code for protos/imgsearch/v1 in place. grpcio-tools is pinned (pyproject) to 1.81.x:
# newer releases emit code that refuses to import under protobuf 6, which tritonclient still requires.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
rm -f protos/imgsearch/v1/*_pb2*.py protos/imgsearch/v1/*_pb2*.pyi
"$PY" -m grpc_tools.protoc -I protos \
  --python_out=protos --pyi_out=protos --grpc_python_out=protos \
  protos/imgsearch/v1/*.proto
