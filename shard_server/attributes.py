"""Per-partition columnar attributes and filter evaluation.

Text fields are dictionary-encoded (int32 codes, -1 = missing), numbers are float64 (NaN = missing), flags are
int8 (-1 = missing). A filter becomes a boolean row mask with vectorised comparisons; the engine caches masks
per (filter, write version), so the per-query cost is paid once per distinct filter between writes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from imgsearch.errors import quoted
from shard_server.columns import GrowableArray
from shard_server.errors import InvalidRequestError
from shard_server.types import MAX_ID_CHARS, AnyOf, Attributes, Condition, Equals, Filter, Is, Range

_PREDICATE_KIND = {Equals: "text", AnyOf: "text", Range: "number", Is: "flag"}


# A filter states what a shop lets its users pick (brands, colours, a price range): more conditions or values
# than these are a mistake or an attack, and every one costs each shard a pass over its attribute columns.
# The limits hold for the whole filter: 64 conditions of 4,096 values each (10.9 MB a search) took a shard to
# 2.2 GB through its mask cache, and stalled the broker's and shards' event loops.
MAX_FILTER_CONDITIONS = 64
MAX_ANY_OF_VALUES = 4096  # over all the filter's any_of conditions
MAX_FILTER_TEXT_CHARS = 64 * 1024  # the filter's text values together
# Attributes are for filtering (brand, colour): a longer text is a mistake, and each distinct text stays in memory.
MAX_TEXT_ATTRIBUTE_CHARS = 1024


# Categories one search may name. Each costs the broker a routing step and each shard a lookup, on their event
# loops: a search of a million unknown names (10 MB) held the broker's loop 1.2-2.9 s, other clients' searches
# with it (review of 2026-12-06). A search of every category names none.
MAX_SEARCH_CATEGORIES = 1024


def check_search_categories(categories: Sequence[str]) -> None:
    """A search's category names: at most MAX_SEARCH_CATEGORIES, each at most MAX_ID_CHARS long (a longer one was
    never stored: writes refuse it, so it could never match)."""
    if len(categories) > MAX_SEARCH_CATEGORIES:
        raise InvalidRequestError(f"a search names {len(categories)} categories; the limit is {MAX_SEARCH_CATEGORIES}"
                                  " (name none to search them all)")
    for name in categories:
        if len(name) > MAX_ID_CHARS:
            raise InvalidRequestError(f"a category name of {len(name)} characters; categories hold at most "
                                      f"{MAX_ID_CHARS}, so it could never match")


def check_filter_size(conditions: int, any_of_sizes: Iterable[int]) -> None:
    if conditions > MAX_FILTER_CONDITIONS:
        raise InvalidRequestError(f"a filter has {conditions} conditions; the limit is {MAX_FILTER_CONDITIONS}")
    total = sum(any_of_sizes)
    if total > MAX_ANY_OF_VALUES:
        raise InvalidRequestError(f"a filter lists {total} any_of values; the limit is {MAX_ANY_OF_VALUES} over all "
                                  "its conditions")


def check_filter_text(values: Iterable[str]) -> None:
    """The filter's text values (after check_filter_size bounded their number)."""
    total = 0
    for value in values:
        if len(value) > MAX_TEXT_ATTRIBUTE_CHARS:
            raise InvalidRequestError(f"a filter value of {len(value)} characters; text attributes hold at most "
                                      f"{MAX_TEXT_ATTRIBUTE_CHARS}, so it could never match")
        total += len(value)
    if total > MAX_FILTER_TEXT_CHARS:
        raise InvalidRequestError(f"a filter's text values hold {total} characters; the limit is "
                                  f"{MAX_FILTER_TEXT_CHARS}")


def filter_texts(flt: Filter) -> Iterable[str]:
    for condition in flt.all_of:
        if isinstance(condition.predicate, Equals):
            yield condition.predicate.value
        elif isinstance(condition.predicate, AnyOf):
            yield from condition.predicate.values


def validate_filter(flt: Filter, schema: Mapping[str, str]) -> None:
    check_filter_size(len(flt.all_of), (len(c.predicate.values) for c in flt.all_of
                                        if isinstance(c.predicate, AnyOf)))
    check_filter_text(filter_texts(flt))
    for condition in flt.all_of:
        kind = schema.get(condition.field)
        if kind is None:
            raise InvalidRequestError(
                f"unknown filter field {quoted(condition.field)}; known fields: {', '.join(sorted(schema)) or 'none'}")
        wanted = _PREDICATE_KIND.get(type(condition.predicate))
        if wanted is None:
            raise InvalidRequestError(f"unknown predicate {condition.predicate!r} on field {condition.field!r}")
        if wanted != kind:
            # Say what the field does take: `--filter price=5` was refused with only "equals needs a text field"
            hint = {"number": "a range (min and max; `price=5..5` on the command line)",
                    "flag": "true or false", "text": "a value or any of several"}[kind]
            raise InvalidRequestError(
                f"field {condition.field!r} is {kind}; predicate {type(condition.predicate).__name__.lower()} "
                f"needs a {wanted} field; filter a {kind} field with {hint}")
        p = condition.predicate
        if isinstance(p, Range):
            for bound in (p.min, p.max):
                if bound is not None and not np.isfinite(bound):
                    raise InvalidRequestError(f"range bound on {condition.field!r} must be finite")
            # An empty range matched nothing and answered 0 hits, hiding a caller's swapped bounds (review).
            if p.min is not None and p.max is not None and (p.min > p.max or (p.exclusive and p.min == p.max)):
                bounds = f"min {p.min:g} is above max {p.max:g}" if p.min > p.max else f"min = max {p.min:g}, exclusive"
                raise InvalidRequestError(f"range on {condition.field!r} is empty: {bounds}")




def validate_attributes(attributes: Attributes, schema: Mapping[str, str], image_id: str) -> None:
    for name, value in attributes.items():
        kind = schema.get(name)
        if kind is None:
            raise InvalidRequestError(
                f"record {image_id!r}: unknown attribute {name!r}; known: {', '.join(sorted(schema)) or 'none'}")
        ok = {
            "text": isinstance(value, str),
            "number": isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value),
            "flag": isinstance(value, bool),
        }[kind]
        if not ok:
            raise InvalidRequestError(f"record {image_id!r}: attribute {name!r} must be a finite {kind}, "
                                      f"got {value!r}")
        if kind == "text" and len(value) > MAX_TEXT_ATTRIBUTE_CHARS:
            raise InvalidRequestError(f"record {image_id!r}: attribute {name!r} is {len(value)} characters long; "
                                      f"the limit is {MAX_TEXT_ATTRIBUTE_CHARS}")


class AttributeColumns:
    def __init__(self, schema: Mapping[str, str]):
        self.schema = dict(schema)
        self._codes: dict[str, GrowableArray] = {}
        self._dictionary: dict[str, dict[str, int]] = {}
        self._values: dict[str, list[str]] = {}
        self._numbers: dict[str, GrowableArray] = {}
        self._flags: dict[str, GrowableArray] = {}
        for name, kind in self.schema.items():
            if kind == "text":
                self._codes[name] = GrowableArray(np.int32)
                self._dictionary[name] = {}
                self._values[name] = []
            elif kind == "number":
                self._numbers[name] = GrowableArray(np.float64)
            else:
                self._flags[name] = GrowableArray(np.int8)

    def append(self, rows: Sequence[Attributes]) -> None:
        for name, column in self._codes.items():
            dictionary, values = self._dictionary[name], self._values[name]
            codes = np.empty(len(rows), dtype=np.int32)
            for i, attrs in enumerate(rows):
                value = attrs.get(name)
                if value is None:
                    codes[i] = -1
                    continue
                code = dictionary.get(value)
                if code is None:
                    code = dictionary[value] = len(values)
                    values.append(value)
                codes[i] = code
            column.extend(codes)
        for name, column in self._numbers.items():
            column.extend(np.array([float(a.get(name, np.nan)) for a in rows], dtype=np.float64))
        for name, column in self._flags.items():
            column.extend(np.array([int(a[name]) if name in a else -1 for a in rows], dtype=np.int8))

    def dictionary_sizes(self) -> dict[str, int]:
        return {name: len(values) for name, values in self._values.items()}

    def take(self, rows: np.ndarray, known: Mapping[str, int]) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
        """Copies of these rows' columns, and the text values after the first `known` of each dictionary, for
        `extend_taken` of a compacted copy (the caller holds the partition's read lock)."""
        arrays, dictionaries = self.to_state()
        return ({key: column[rows] for key, column in arrays.items()},
                {name: values[known.get(name, 0):] for name, values in dictionaries.items()})

    def extend_taken(self, taken: tuple[dict[str, np.ndarray], dict[str, list[str]]]) -> None:
        """Append rows taken (`take`, given this one's `dictionary_sizes`) from the partition this one is a
        compacted copy of: filled only from it, its text dictionaries are a prefix of the source's, so codes are
        kept as they are."""
        arrays, new_values = taken
        for name, column in self._codes.items():
            values = self._values[name]
            for value in new_values.get(name, ()):
                self._dictionary[name][value] = len(values)
                values.append(value)
            column.extend(arrays[f"text.{name}"])
        for name, column in self._numbers.items():
            column.extend(arrays[f"number.{name}"])
        for name, column in self._flags.items():
            column.extend(arrays[f"flag.{name}"])

    def rows(self, indices: Sequence[int] | np.ndarray) -> list[dict[str, str | float | bool]]:
        """The attributes of the given rows (absent values left out), read with one fancy-index per column:
        numpy scalars per cell cost ~10 us a row, a search's top-k paid ~0.1 ms for them."""
        index = np.asarray(indices, dtype=np.int64)
        out: list[dict[str, str | float | bool]] = [{} for _ in range(len(index))]
        if not out:
            return out
        for name, column in self._codes.items():
            values = self._values[name]
            for row, code in zip(out, column.view[index].tolist()):
                if code >= 0:
                    row[name] = values[code]
        for name, column in self._numbers.items():
            for row, value in zip(out, column.view[index].tolist()):
                if not math.isnan(value):
                    row[name] = value
        for name, column in self._flags.items():
            for row, value in zip(out, column.view[index].tolist()):
                if value >= 0:
                    row[name] = bool(value)
        return out

    def mask(self, flt: Filter, n: int) -> np.ndarray:
        """Rows [0, n) matching every condition of ``flt`` (validated beforehand)."""
        result = np.ones(n, dtype=bool)
        for condition in flt.all_of:
            result &= self._condition_mask(condition, n)
        return result

    def _condition_mask(self, condition: Condition, n: int) -> np.ndarray:
        p, name = condition.predicate, condition.field
        if isinstance(p, Equals):
            code = self._dictionary[name].get(p.value)
            return np.zeros(n, bool) if code is None else self._codes[name].view[:n] == code
        if isinstance(p, AnyOf):
            codes = [c for v in p.values if (c := self._dictionary[name].get(v)) is not None]
            return np.isin(self._codes[name].view[:n], np.array(codes, dtype=np.int32))
        if isinstance(p, Range):
            values = self._numbers[name].view[:n]
            out = ~np.isnan(values)
            if p.min is not None:
                out &= values > p.min if p.exclusive else values >= p.min
            if p.max is not None:
                out &= values < p.max if p.exclusive else values <= p.max
            return out
        if isinstance(p, Is):
            return self._flags[name].view[:n] == int(p.value)
        raise InvalidRequestError(f"unknown predicate {p!r}")  # pragma: no cover - validated earlier

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in (*self._codes.values(), *self._numbers.values(), *self._flags.values()))

    # --- snapshot support -------------------------------------------------------------------------------------
    def to_state(self) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
        arrays = {f"text.{k}": v.view for k, v in self._codes.items()}
        arrays |= {f"number.{k}": v.view for k, v in self._numbers.items()}
        arrays |= {f"flag.{k}": v.view for k, v in self._flags.items()}
        return arrays, dict(self._values)

    @staticmethod
    def columns_not_kept(schema: Mapping[str, str], arrays: Mapping[str, np.ndarray],
                         rows: np.ndarray | None = None) -> list[str]:
        """The saved columns (``kind.name``) that hold a value in `rows` (a mask; None: every row) and that
        `from_state` under `schema` would drop: an attribute the schema no longer has, or has as another kind."""
        missing = {"text": -1, "flag": -1}
        dropped = []
        for key, data in arrays.items():
            kind, _, name = key.partition(".")
            if schema.get(name) == kind:
                continue
            values = data if rows is None else data[rows]
            held = ~np.isnan(values) if kind == "number" else values != missing.get(kind, -1)
            if np.any(held):
                dropped.append(key)
        return sorted(dropped)

    @classmethod
    def from_state(cls, schema: Mapping[str, str], arrays: Mapping[str, np.ndarray],
                   dictionaries: Mapping[str, list[str]], n: int) -> AttributeColumns:
        columns = cls(schema)
        for name, kind in columns.schema.items():
            key = f"{kind}.{name}"
            data = arrays.get(key)
            if kind == "text":
                values = list(dictionaries.get(name, [])) if data is not None else []
                columns._values[name] = values
                columns._dictionary[name] = {v: i for i, v in enumerate(values)}
                columns._codes[name] = GrowableArray(np.int32, initial=data if data is not None
                                                     else np.full(n, -1, np.int32))
            elif kind == "number":
                columns._numbers[name] = GrowableArray(np.float64, initial=data if data is not None
                                                       else np.full(n, np.nan))
            else:
                columns._flags[name] = GrowableArray(np.int8, initial=data if data is not None
                                                     else np.full(n, -1, np.int8))
        return columns
