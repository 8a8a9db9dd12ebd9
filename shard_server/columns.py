"""Growable numpy columns (amortised O(1) appends) used for row-aligned per-partition data."""

from __future__ import annotations

import numpy as np


class GrowableArray:
    """A 1-d or 2-d numpy array that grows along axis 0 by doubling its capacity.

    Capacity past the filled rows is never read, so it is allocated uninitialised: its pages stay untouched, and
    out of the process's resident memory, until rows are written there (a bulk load's vectors would otherwise
    be resident up to twice over).
    """

    def __init__(self, dtype, row_shape: tuple[int, ...] = (), initial: np.ndarray | None = None):
        self._dtype = np.dtype(dtype)
        self._row_shape = row_shape
        if initial is not None:
            self._data = np.array(initial, dtype=self._dtype, copy=True)
            self._len = len(initial)
        else:
            self._data = np.empty((16, *row_shape), dtype=self._dtype)
            self._len = 0

    def __len__(self) -> int:
        return self._len

    def extend(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=self._dtype)
        need = self._len + len(values)
        if need > len(self._data):
            self._grow_to(max(need, 2 * len(self._data)))
        self._data[self._len : need] = values
        self._len = need

    def reserve(self, extra_rows: int) -> None:
        """Make room for ``extra_rows`` more rows in one step. A bulk write that knows its size reserves first:
        growing by doubling copies the filled rows each time, and while the copy is made the old and the new
        array are both resident (up to twice the final size)."""
        if self._len + extra_rows > len(self._data):
            self._grow_to(self._len + extra_rows)

    def _grow_to(self, capacity: int) -> None:
        grown = np.empty((capacity, *self._row_shape), dtype=self._dtype)
        grown[: self._len] = self._data[: self._len]
        self._data = grown

    @property
    def view(self) -> np.ndarray:
        """The filled part (a view: valid until the next extend)."""
        return self._data[: self._len]

    @property
    def nbytes(self) -> int:
        """Bytes of the filled rows: the spare capacity is allocated but untouched, so not resident."""
        return int(self.view.nbytes)
