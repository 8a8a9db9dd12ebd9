"""Snapshots: every partition's exact vectors, tombstones, attributes, ids and trained index, plus a manifest
with the sha256 of every file. Written into a temporary directory, fsynced, then renamed into place (atomic);
loading verifies every checksum first and refuses a snapshot that does not match (SnapshotCorruptError)."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from shard_server.attributes import AttributeColumns
from shard_server.columns import GrowableArray, StringColumn
from shard_server.config import ShardConfig
from shard_server.errors import LoadInterruptedError, SnapshotCorruptError
from shard_server.partition import Partition
from shard_server.vectors import VectorStore, map_npy

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOMBSTONES = "tombstones.json"  # (image id, version) of versioned deletes still remembered, oldest first
PREFIX = "snap-"


@dataclass(frozen=True, kw_only=True)
class PartitionImage:
    """What a snapshot writes of one partition, taken while no write is applied (SnapshotStore.capture): views of
    its rows up to `rows` (rows never change once written), copies of what does change (which rows are alive, the
    text dictionaries) and the serialised index. Written out while writes go on."""

    category: str
    partition: Partition  # the partition it was taken of (rebase_vectors)
    rows: int
    vector_blocks: list[np.ndarray]
    vector_dtype: np.dtype
    alive: np.ndarray
    versions: np.ndarray
    attribute_arrays: dict[str, np.ndarray]
    dictionaries: dict[str, list[str]]
    image_ids: np.ndarray
    product_ids: np.ndarray
    index: np.ndarray | None  # faiss.serialize_index
    nlist: int
    trained_at_rows: int


@dataclass(frozen=True, kw_only=True)
class LoadedSnapshot:
    wal_generation: int
    partitions: dict[str, Partition]
    path: Path
    tombstones: tuple[tuple[str, int], ...] | list[tuple[str, int]] = ()  # (image id, delete version), oldest first


def _sha256_of(path: Path, stop: threading.Event | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            _check_stop(stop)
            digest.update(chunk)
    return digest.hexdigest()


def _check_stop(stop: threading.Event | None) -> None:
    # Checking gigabytes of vectors takes a while: a stop (SIGTERM) is taken at once, not after the load.
    if stop is not None and stop.is_set():
        raise LoadInterruptedError("stopped while loading the snapshot")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SnapshotStore:
    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".tmp-*"):  # an interrupted snapshot: never renamed, never used
            shutil.rmtree(stale, ignore_errors=True)

    def complete(self) -> list[Path]:
        return sorted(p for p in self.directory.glob(PREFIX + "*") if (p / MANIFEST).exists())

    # --- writing ---------------------------------------------------------------------------------------------
    @staticmethod
    def capture(partitions: dict[str, Partition]) -> list[PartitionImage]:
        """Every partition's image (the caller stops writes meanwhile: ~a millisecond a partition, plus the copy
        of its index's codes). The dump used to be written while writes waited: 25 s with 5,000 categories."""
        images = []
        for category, partition in sorted(partitions.items()):
            with partition.lock.write():  # freezing the vectors' tail changes the store
                vector_blocks = partition.vectors.freeze()
            with partition.lock.read():  # writes are stopped: nothing changed in between
                n = len(partition.image_ids)
                arrays, dictionaries = partition.attributes.to_state()
                images.append(PartitionImage(
                    category=category, partition=partition, rows=n,
                    vector_blocks=vector_blocks,
                    vector_dtype=partition.vectors.dtype, alive=partition.alive.view[:n].copy(),
                    versions=partition.versions.view[:n], attribute_arrays={k: v[:n] for k, v in arrays.items()},
                    dictionaries={k: list(v) for k, v in dictionaries.items()},
                    image_ids=partition.image_ids.view[:n], product_ids=partition.product_ids.view[:n],
                    index=faiss.serialize_index(partition.ivf) if partition.ivf is not None else None,
                    nlist=partition.nlist, trained_at_rows=partition.trained_at_rows))
        return images

    def write(self, images: list[PartitionImage], *, wal_generation: int, config: ShardConfig,
              tombstones: list[tuple[str, int]] = ()) -> Path:
        """Write the captured partitions (`capture`) as a snapshot. Returns the snapshot's directory."""
        name = f"{PREFIX}{wal_generation:012d}"
        tmp = self.directory / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            return self._write_into(tmp, name, images, wal_generation=wal_generation, config=config,
                                    tombstones=tombstones)
        except BaseException:
            # A snapshot that failed part-way (a full disk) must not keep its space from the log until a restart.
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _write_into(self, tmp: Path, name: str, images: list[PartitionImage], *, wal_generation: int,
                    config: ShardConfig, tombstones: list[tuple[str, int]]) -> Path:
        tmp.mkdir()
        entries = []
        for i, image in enumerate(images):
            sub = f"p{i:05d}"
            (tmp / sub).mkdir()
            entries.append(self._write_partition(tmp / sub, sub, image, config.dimension))
        (tmp / TOMBSTONES).write_text(json.dumps(list(map(list, tombstones))))
        files = {}
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                _fsync(path)
                files[str(path.relative_to(tmp))] = _sha256_of(path)
        for sub_dir in [tmp, *(p for p in tmp.iterdir() if p.is_dir())]:
            _fsync(sub_dir)
        manifest = {"format": FORMAT_VERSION, "wal_generation": wal_generation, "dimension": config.dimension,
                    "attribute_schema": list(map(list, config.attribute_schema)), "partitions": entries,
                    "files": files}
        manifest_path = tmp / MANIFEST
        manifest_path.write_text(json.dumps(manifest, indent=1))
        _fsync(manifest_path)
        _fsync(tmp)
        final = self.directory / name
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        _fsync(self.directory)
        return final

    @staticmethod
    def _write_partition(directory: Path, sub: str, image: PartitionImage, dimension: int) -> dict:
        n = image.rows
        path = directory / "vectors.npy"
        vectors = np.lib.format.open_memmap(path, mode="w+", dtype=image.vector_dtype, shape=(n, dimension))
        _reserve(path)
        start = 0
        for block in image.vector_blocks:
            vectors[start : start + len(block)] = block
            start += len(block)
        vectors.flush()
        del vectors
        np.save(directory / "alive.npy", image.alive)
        np.save(directory / "versions.npy", image.versions)
        np.savez(directory / "attributes.npz", **image.attribute_arrays)
        (directory / "ids.json").write_text(json.dumps(
            {"image_ids": image.image_ids.tolist(), "product_ids": image.product_ids.tolist(),
             "dictionaries": image.dictionaries}))
        if image.index is not None:
            (directory / "index.faiss").write_bytes(image.index.tobytes())
        return {"category": image.category, "dir": sub, "rows": n, "nlist": image.nlist,
                "trained_at_rows": image.trained_at_rows, "trained": image.index is not None}

    def prune(self, keep: Path) -> None:
        for path in self.directory.glob(PREFIX + "*"):
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)

    # --- loading ---------------------------------------------------------------------------------------------
    def load_latest(self, config: ShardConfig, stop: threading.Event | None = None) -> LoadedSnapshot | None:
        snapshots = self.complete()
        if not snapshots:
            return None
        return self.load(snapshots[-1], config, stop)

    @staticmethod
    def verify(path: Path, stop: threading.Event | None = None) -> dict:
        """The manifest, once every listed file exists with its recorded sha256."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise SnapshotCorruptError(f"snapshot {path}: unreadable manifest: {e}") from e
        if manifest.get("format") != FORMAT_VERSION:
            raise SnapshotCorruptError(f"snapshot {path}: unknown format {manifest.get('format')!r}")
        for rel, expected in manifest["files"].items():
            file = path / rel
            if not file.is_file():
                raise SnapshotCorruptError(f"snapshot {path}: missing file {rel}")
            actual = _sha256_of(file, stop)
            if actual != expected:
                raise SnapshotCorruptError(
                    f"snapshot {path}: checksum mismatch for {rel} (sha256 {actual[:16]}..., manifest says "
                    f"{expected[:16]}...); refusing to load it")
        return manifest

    def load(self, path: Path, config: ShardConfig, stop: threading.Event | None = None) -> LoadedSnapshot:
        """`stop`: when it is set, the load ends with LoadInterruptedError (checked every MiB and partition)."""
        manifest = self.verify(path, stop)
        if manifest["dimension"] != config.dimension:
            raise SnapshotCorruptError(
                f"snapshot {path} has dimension {manifest['dimension']}, configured {config.dimension}")
        partitions = {}
        for entry in manifest["partitions"]:
            _check_stop(stop)
            partitions[entry["category"]] = self._load_partition(path / entry["dir"], entry, config)
        tombstones_file = path / TOMBSTONES  # absent from snapshots written before versioned deletes
        tombstones = json.loads(tombstones_file.read_text()) if tombstones_file.is_file() else []
        return LoadedSnapshot(wal_generation=manifest["wal_generation"], partitions=partitions, path=path,
                              tombstones=[(image_id, int(version)) for image_id, version in tombstones])

    @staticmethod
    def _load_partition(directory: Path, entry: dict, config: ShardConfig) -> Partition:
        partition = Partition(entry["category"], config)
        n = entry["rows"]
        vectors = map_npy(directory / "vectors.npy")
        alive = np.load(directory / "alive.npy")
        ids = json.loads((directory / "ids.json").read_text())
        with np.load(directory / "attributes.npz") as npz:
            arrays = {k: npz[k] for k in npz.files}
        if (len(vectors) != n or len(alive) != n or len(ids["image_ids"]) != n
                or any(len(column) != n for column in arrays.values())):
            raise SnapshotCorruptError(f"snapshot partition {directory}: row counts disagree")
        partition.vectors = VectorStore(config.dimension, base=vectors, dtype=config.vector_dtype)
        partition.alive = GrowableArray(np.bool_, initial=alive)
        versions_file = directory / "versions.npy"  # absent from snapshots written before write versions
        versions = np.load(versions_file) if versions_file.is_file() else np.zeros(n, dtype=np.uint64)
        if len(versions) != n:
            raise SnapshotCorruptError(f"snapshot partition {directory}: row counts disagree")
        partition.versions = GrowableArray(np.uint64, initial=versions)
        partition.image_ids = StringColumn(ids["image_ids"])
        partition.product_ids = StringColumn(map(sys.intern, ids["product_ids"]))
        dropped = AttributeColumns.columns_not_kept(config.attribute_kinds, arrays, alive)
        if dropped:
            # Loaded, they would be gone for good with the next snapshot (the log refuses such a change too).
            raise SnapshotCorruptError(
                f"snapshot partition {directory} ({entry['category']!r}) holds values of the attributes "
                f"{', '.join(k.partition('.')[2] + ' (' + k.partition('.')[0] + ')' for k in dropped)}, which "
                "the configured attribute schema does not have as that kind: starting would drop them. Start the "
                "shard with the attribute schema that wrote them (attributes may be added to it, not removed or "
                "changed), or re-ingest the catalogue into a fresh data dir")
        partition.attributes = AttributeColumns.from_state(config.attribute_kinds, arrays, ids["dictionaries"], n)
        partition.live_count = int(np.count_nonzero(alive))
        if entry["trained"]:
            partition.ivf = faiss.read_index(str(directory / "index.faiss"))
            partition.nlist = entry["nlist"]
            partition.trained_at_rows = entry["trained_at_rows"]
        else:
            partition._exact = partition.exact_mirror(initial=vectors)
        return partition

    def rebase_vectors(self, path: Path, images: list[PartitionImage]) -> None:
        """Point each captured partition's exact vectors at the snapshot file (memory-mapped) instead of process
        memory: the rows its capture froze (VectorStore.freeze); rows appended since stay in memory until the next
        snapshot."""
        manifest = json.loads((path / MANIFEST).read_text())
        for entry, image in zip(manifest["partitions"], images, strict=True):
            mapped = map_npy(path / entry["dir"] / "vectors.npy")
            with image.partition.lock.write():
                image.partition.vectors.rebase(mapped)


def _reserve(path: Path) -> None:
    """Allocate a sparse file's blocks now. Written through a memory map, a page that a full disk cannot hold is a
    SIGBUS, which killed the shard in every snapshot (and on every restart, which snapshots again); reserved
    first, a full disk is an OSError (ENOSPC) here, and the snapshot fails like any other write."""
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem that cannot reserve: as before
                raise
