"""The shard map: which shard (and which replica addresses) owns each category.

The map is configuration, loaded from a YAML or JSON file (or inline JSON)::

    shards:                       # shard name -> replica addresses (all replicas hold the same data)
      shard-0: ["10.0.0.1:7000", "10.0.0.2:7000"]
      shard-1: ["10.0.0.3:7000"]
    categories:                   # pinned categories; optional
      Milk: shard-1

A category that is not pinned goes to ``sorted(shards)[crc32(category) % len(shards)]``: stable across
processes and restarts, but it changes when shards are added or removed, so pin every existing category before
changing the number of shards (see docs/usage.md).
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from broker.errors import ShardMapError


@dataclass(frozen=True, kw_only=True)
class ShardMap:
    shards: Mapping[str, tuple[str, ...]]
    categories: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.shards:
            raise ShardMapError("the shard map names no shard")
        for name, replicas in self.shards.items():
            if not replicas:
                raise ShardMapError(f"shard {name!r} has no replica address")
        for category, shard in self.categories.items():
            if shard not in self.shards:
                raise ShardMapError(f"category {category!r} is mapped to unknown shard {shard!r}")

    @property
    def shard_names(self) -> tuple[str, ...]:
        return tuple(sorted(self.shards))

    def shard_for(self, category: str) -> str:
        """The shard that owns (stores and searches) a category."""
        pinned = self.categories.get(category)
        if pinned is not None:
            return pinned
        names = self.shard_names
        return names[zlib.crc32(category.encode("utf-8")) % len(names)]

    def shards_for(self, categories: Iterable[str]) -> dict[str, tuple[str, ...]]:
        """Shard name -> the requested categories it owns; every shard (no category) when none is given."""
        wanted = tuple(dict.fromkeys(categories))
        if not wanted:
            return {name: () for name in self.shard_names}
        owned: dict[str, list[str]] = {}
        for category in wanted:
            owned.setdefault(self.shard_for(category), []).append(category)
        return {name: tuple(cats) for name, cats in owned.items()}

    @classmethod
    def from_mapping(cls, data: Mapping) -> ShardMap:
        try:
            shards = {
                str(name): tuple(str(a) for a in ([addrs] if isinstance(addrs, str) else addrs))
                for name, addrs in dict(data["shards"]).items()
            }
            categories = {str(c): str(s) for c, s in dict(data.get("categories") or {}).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardMapError(f"malformed shard map: {exc!r}") from exc
        return cls(shards=shards, categories=categories)

    @classmethod
    def load(cls, source: str | Path) -> ShardMap:
        """From a path to a .yaml/.yml/.json file, or from inline JSON text."""
        text = str(source).strip()
        if text.startswith("{"):
            return cls.from_mapping(json.loads(text))
        path = Path(text)
        try:
            raw = path.read_text()
        except OSError as exc:
            raise ShardMapError(f"cannot read shard map {path}: {exc}") from exc
        if path.suffix in (".yaml", ".yml"):
            return cls.from_mapping(yaml.safe_load(raw))
        return cls.from_mapping(json.loads(raw))

    def to_json(self) -> str:
        return json.dumps(
            {"shards": {k: list(v) for k, v in self.shards.items()}, "categories": dict(self.categories)}
        )

    @classmethod
    def from_env(cls) -> ShardMap | None:
        source = os.environ.get("IMGSEARCH_SHARD_MAP")
        return cls.load(source) if source else None
