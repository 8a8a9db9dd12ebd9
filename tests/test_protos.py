"""The committed generated code matches the .proto files, and the protos pass `buf lint`."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GEN = ROOT / "protos" / "imgsearch" / "v1"


def test_generated_code_is_up_to_date(tmp_path):
    protos = sorted(GEN.glob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}",
         f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
         *[str(p.relative_to(ROOT / "protos")) for p in protos]],
        check=True, cwd=ROOT / "protos",
    )
    generated = sorted((tmp_path / "imgsearch" / "v1").glob("*_pb2*"))
    assert generated, "protoc produced nothing"
    committed = sorted(GEN.glob("*_pb2*"))
    assert [p.name for p in generated] == [p.name for p in committed]
    for fresh in generated:
        assert fresh.read_text() == (GEN / fresh.name).read_text(), f"{fresh.name} is stale: run `make proto`"


def test_buf_lint():
    buf = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    assert buf, "buf not installed (pip install buf-bin)"
    result = subprocess.run([buf, "lint", "protos"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_code_imports_with_installed_protobuf():
    from imgsearch.v1 import broker_pb2, broker_pb2_grpc, shard_pb2, shard_pb2_grpc  # noqa: F401

    req = shard_pb2.ShardServiceSearchRequest(top_k=3)
    assert shard_pb2.ShardServiceSearchRequest.FromString(req.SerializeToString()).top_k == 3
