"""Every command-line module answers --help with its usage (two crashed with a ValueError traceback, one started
its hour-long computation)."""

from __future__ import annotations

import contextlib
import io
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    f"{path.parent.name}.{path.stem}"
    for package in ("broker", "shard_server", "embedder")
    for path in (ROOT / package).glob("*.py")
    if 'if __name__ == "__main__"' in path.read_text()
)


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
@pytest.mark.parametrize("module", MODULES)
def test_help(module, monkeypatch):
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    out = io.StringIO()
    with pytest.raises(SystemExit) as exited, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exited.value.code in (0, None) and "usage:" in out.getvalue().lower(), out.getvalue()[-500:]
