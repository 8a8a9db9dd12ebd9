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


class StringColumn(GrowableArray):
    """Row-aligned Python strings (image ids, product ids) in a numpy object array.

    A list would do the same job, but the cyclic garbage collector walks every item of every list on each full
    collection, and a full collection holds the GIL: with two 1M-row lists of ids a shard stopped for 55-65 ms
    (measured with a gc callback; one such pause landed in the 8-client run of a 1M comparison and set its p99).
    numpy arrays are not tracked by the collector, and strings cannot form reference cycles, so nothing is lost.
    """

    def __init__(self, initial: list[str] | None = None):
        super().__init__(object)
        if initial:
            self.extend(initial)

    def extend(self, values) -> None:
        values = list(values)
        block = np.empty(len(values), dtype=object)
        block[:] = values  # one string per cell (np.asarray would build a 2-d array of characters from some inputs)
        super().extend(block)

    def __getitem__(self, row: int) -> str:
        if not -self._len <= row < self._len:
            raise IndexError(row)
        return self._data[row]

    def tolist(self) -> list[str]:
        return self.view.tolist()
