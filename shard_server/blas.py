"""Single-threaded numpy BLAS for the shard's per-query work.

numpy's bundled OpenBLAS (pthreads build) spreads even a 1,000 x 512 mat-vec over every core; with concurrent
searches on a busy machine its spinning threads make a 0.4 ms product take 4 ms. The shard parallelises across
queries instead, so numpy's BLAS gets one thread. faiss links its own OpenMP OpenBLAS, which is governed per
thread by ``faiss.omp_set_num_threads`` and is left alone (training keeps all cores).
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import numpy as np  # noqa: F401 - loads the library this module adjusts

log = logging.getLogger(__name__)
_SETTERS = ("openblas_set_num_threads64_", "openblas_set_num_threads", "scipy_openblas_set_num_threads64_")


def numpy_blas_libraries() -> list[str]:
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return []
    paths = {line.split()[-1] for line in maps.read_text().splitlines() if "openblas" in line.lower()}
    return sorted(p for p in paths if "numpy" in p)


def limit_numpy_blas_threads(threads: int = 1) -> bool:
    """Set numpy's OpenBLAS thread count; False when it cannot be found (other BLAS builds: left as is)."""
    done = False
    for path in numpy_blas_libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _SETTERS:
            setter = getattr(lib, name, None)
            if setter is not None:
                setter(ctypes.c_int(threads))
                done = True
                break
    if not done:
        log.debug("numpy BLAS thread count not adjusted (no OpenBLAS found)")
    return done
