"""The Python sources pass ruff (its default rules as configured in pyproject.toml, the generated code excluded):
`make lint` and this test run the same check, so a lint regression fails `make test`."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> str:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff not installed (it is in the dev extra: make install)"
    return ruff


def test_ruff_check_passes():
    result = subprocess.run([_ruff(), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_code_is_not_linted():
    """The generated protobuf package stays excluded: ruff would otherwise rewrite code that protoc owns."""
    listed = subprocess.run([_ruff(), "check", "--no-cache", "--show-files", "."], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    assert "broker/core.py" in listed
    assert "imgsearch/v1/" not in listed
