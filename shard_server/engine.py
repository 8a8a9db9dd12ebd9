"""The shard engine: categories -> partitions, the image id map, validated writes through the write-ahead log,
searches across categories, background training and periodic snapshots. Synchronous and thread-safe: the gRPC
service calls it from thread pools (faiss and numpy release the GIL).

An unknown category in a search contributes no hits (an empty result, not NOT_FOUND): a shard that has not yet
received a category's first vector simply has nothing to return for it.
"""

from __future__ import annotations

import itertools
import json
import logging
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from operator import attrgetter

import faiss
import numpy as np

from imgsearch.v1 import shard_pb2
from shard_server import convert, metrics
from shard_server.attributes import validate_attributes, validate_filter
from shard_server.blas import limit_numpy_blas_threads
from shard_server.config import ShardConfig
from shard_server.errors import InvalidRequestError, LoadInterruptedError, RequestTooLargeError, WalError
from shard_server.heap import release_free_memory
from shard_server.partition import Partition
from shard_server.snapshot import SnapshotStore
from shard_server.tombstones import Tombstones
from shard_server.types import (
    MAX_ID_CHARS,
    CategoryStats,
    Exactness,
    Hit,
    Record,
    SearchQuery,
    SearchResult,
    ShardStats,
    distinct_products,
    first_of_each,
    newest_copies,
    normalised,
    rank_key,
)
from shard_server.wal import MAX_FRAME_BYTES, LogFrame, WriteAheadLog

log = logging.getLogger(__name__)

ROW_BITS = 40
ROW_MASK = (1 << ROW_BITS) - 1
# Log record types: the op code byte, then a serialised UpsertRequest / ShardServiceDeleteRequest. A bulk write's
# record also carries its rows per category (u32 length, JSON), so that a replay can make room for them up front.
OP_UPSERT = b"U"
OP_BULK_UPSERT = b"B"
OP_DELETE = b"D"
_BULK_HEADER_LENGTH = struct.Struct("<I")
# After failed snapshots the next try waits 2, 4, 8 ... s, at most this long.
SNAPSHOT_RETRY_MAX_S = 64.0
# Bulk writes are decoded and applied in batches of about this many serialised bytes (~4,000 512-d records).
UPSERT_BATCH_BYTES = 8 << 20
# A search over at least this many partitions reads ids and attributes only for the best rows of them all
# (ShardEngine._search_many), not for every partition's top-k.
MANY_PARTITIONS = 8
# A compaction catches up with rows written while it copied outside the write lock until at most this many are
# left for the last catch-up, which writes wait for.
CATCH_UP_ROWS = 4_096
# Tries of a search over several categories while images move between them (ShardEngine.search), and how many
# of the latest moves are remembered to tell whether one was between the searched categories.
MOVE_RETRIES = 3
RECENT_MOVES = 1_024
# How long a get reads again an image caught between two steps of its write (ShardEngine.get).
GET_SETTLE_S = 1.0


def _take(chunks: Iterable[bytes | memoryview], n: int) -> tuple[bytes, Iterator[bytes | memoryview]]:
    """The first ``n`` bytes of a payload given in chunks, and the chunks of the rest."""
    chunks = iter(chunks)
    head = bytearray()
    for chunk in chunks:
        need = n - len(head)
        head += chunk[:need]
        if len(chunk) > need:
            return bytes(head), itertools.chain((memoryview(chunk)[need:],), chunks)
        if len(head) == n:
            return bytes(head), chunks
    raise WalError(f"log record ends after {len(head)} bytes, inside its {n}-byte header")


def _drain(parts: list[bytes]) -> Iterator[bytes]:
    """The parts front to back, each dropped from the list as it is handed out (its memory goes with its last
    user)."""
    parts.reverse()
    while parts:
        yield parts.pop()


def _export_category(engine: object, name: str, partition: Partition) -> None:
    """A category's part of the shard's totals (metrics.CATEGORY_TOTALS). Categories are chosen by the writers, so
    they are no label: series per category grew without bound (10,000 per gauge at 20,000 categories)."""
    metrics.CATEGORY_TOTALS.update(id(engine), name, partition.live_count, partition.ivf is not None)


class ShardEngine:
    def __init__(self, config: ShardConfig):
        self.config = config
        limit_numpy_blas_threads(1)  # per-query mat-vecs: parallelism comes from concurrent queries
        self.schema = config.attribute_kinds
        self.partitions: dict[str, Partition] = {}  # replaced, never mutated (readers need no lock)
        # image id -> category number << ROW_BITS | row (one int, not a tuple: ~60 bytes less per vector);
        # touched only while applying writes.
        self.id_map: dict[str, int] = {}
        # Versioned deletes remembered against older writes that arrive after them; applied writes only.
        self.tombstones = Tombstones(config.tombstone_ttl_s)
        self._category_names: list[str] = []
        self._move_epoch = 0  # odd while a write moves images between categories (see search)
        # (the odd epoch it started at, the categories it moved images between) of the latest moves
        self._recent_moves: deque[tuple[int, frozenset[str]]] = deque(maxlen=RECENT_MOVES)
        self._relocations = 0  # odd while a compaction renumbers a partition's rows in the id map (see get)
        self._category_numbers: dict[str, int] = {}
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.wal = WriteAheadLog(config.data_dir / "wal")
        self.snapshots = SnapshotStore(config.data_dir / "snapshots")
        self._apply_cond = threading.Condition()
        self._applied_seq = 0
        self._snapshot_barrier: int | None = None  # while a snapshot dumps: the last write it covers
        self._stop = threading.Event()
        self._train_wakeup = threading.Event()
        self._bulk_write_applying = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_snapshot_at = time.monotonic()
        self._snapshot_lock = threading.Lock()
        # Work a snapshot would save on restart: applied writes, and trained indexes (minutes to rebuild).
        self._writes_since_snapshot = 0
        self._swaps_since_snapshot = 0
        self.loaded = False

    # --- lifecycle -------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the newest snapshot (checksums verified), replay the log after it, open a fresh log segment."""
        t0 = time.perf_counter()
        snapshot = self.snapshots.load_latest(self.config, self._stop)
        after = 0
        if snapshot is not None:
            self.partitions = snapshot.partitions
            self.tombstones = Tombstones(self.config.tombstone_ttl_s, snapshot.tombstones)
            for category, p in self.partitions.items():
                base = self._category_number(category) << ROW_BITS
                rows = np.flatnonzero(p.alive.view)
                self.id_map.update(zip(p.image_ids.view[rows].tolist(), (base | rows).tolist()))
            after = snapshot.wal_generation
        replayed = 0
        for frame in self.wal.replay(after):
            # A stop during a long replay (minutes for a big log) is taken at once, not after it: the grace
            # period would run out first, and the next start would replay it all again anyway.
            if self._stop.is_set():
                raise LoadInterruptedError(f"stopped while replaying the write-ahead log ({replayed} records)")
            try:
                self._replay(frame)
            except Exception as exc:
                # A record with a good checksum was acknowledged to a client: skipping it would lose that write
                # for good. Stop instead, with the log untouched, so that a configuration (or version) that can
                # apply it still can. (Skipping once lost a whole acknowledged bulk load: protobuf refuses to
                # parse a message over 2 GiB, and the record was parsed whole.)
                raise WalError(
                    f"write-ahead log record {replayed + 1} after snapshot generation {after} cannot be applied: "
                    f"{exc}. The shard stops rather than drop an acknowledged write; start it with the "
                    "configuration (dimension, attribute schema) that wrote the log") from exc
            replayed += 1
        self.wal.open(min_generation=after + 1)
        self._writes_since_snapshot = replayed
        self.loaded = True
        self._update_gauges()
        log.info("shard loaded: %d categories, %d vectors, %d log records replayed in %.1fs",
                 len(self.partitions), len(self.id_map), replayed, time.perf_counter() - t0)

    def interrupt_load(self) -> None:
        """Make a `load` running in another thread stop at its next log record (LoadInterruptedError)."""
        self._stop.set()

    def start_background(self) -> None:
        for target, name in ((self._training_loop, "shard-trainer"), (self._snapshot_loop, "shard-snapshotter")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._train_wakeup.set()

    def close(self, *, snapshot: bool = False) -> None:
        self._stop.set()
        self._train_wakeup.set()
        for thread in self._threads:
            thread.join(timeout=60)
        # After the log failed, a snapshot could not rotate it; the next start replays it instead.
        if (snapshot and self.loaded and not self.wal.failed
                and (self._writes_since_snapshot or self._swaps_since_snapshot)):
            try:
                self.snapshot()
            except (OSError, WalError) as exc:  # a full disk, a failed log: the log still holds every write
                log.error("final snapshot failed (%s); the write-ahead log keeps every write, replayed at the next "
                          "start", exc)
        self.wal.close()
        metrics.CATEGORY_TOTALS.forget(id(self))  # a closed engine's categories leave the process's totals

    # --- writes ----------------------------------------------------------------------------------------------
    def upsert(self, records: Sequence[Record], *, encoded: bytes | None = None) -> int:
        """Validate, log (fsync) and apply records; returns how many were written.

        ``encoded`` may carry the records already serialised as an UpsertRequest (the gRPC path), which saves
        re-encoding them for the log. Bulk writes go through ``upsert_encoded``.
        """
        self.validate(records)
        if not records:
            return 0
        if encoded is None:
            encoded = shard_pb2.UpsertRequest(
                records=[convert.record_to_proto(r) for r in records]).SerializeToString()
        self._commit((OP_UPSERT, encoded), lambda: self._apply_upsert(records))
        return len(records)

    def validate(self, records: Sequence[Record]) -> None:
        """Raise what `upsert` would raise for these records, and write nothing."""
        if len(records) > self.config.max_records_per_request:
            raise RequestTooLargeError(
                f"{len(records)} records in one request; the limit is {self.config.max_records_per_request} "
                "(use UpsertStream for bulk loads)")
        self._validate_records(records)
        _check_id_lengths(records)
        self._check_versions(r.version for r in records)

    def _check_versions(self, versions: Iterable[int]) -> None:
        """Refuse a write version too far ahead of this shard's clock (live writes only, never on replay): an id
        written or deleted at 2^64-1 kept every later write of it out for good, each answered OK."""
        newest = max(versions, default=0)
        ahead_s = (newest - time.time_ns()) / 1e9
        if ahead_s > self.config.max_version_ahead_s:
            raise InvalidRequestError(
                f"write version {newest} is {ahead_s:.0f} s ahead of this shard's clock (at most "
                f"{self.config.max_version_ahead_s:.0f} s accepted): versions are the writing broker's wall clock "
                "in nanoseconds; check its clock")

    def upsert_encoded(self, parts: list[bytes]) -> int:
        """A bulk write given serialised: ``parts`` concatenate to one UpsertRequest (an UpsertStream's messages).

        Validated, logged as one frame and applied batch by batch (``UPSERT_BATCH_BYTES``), so no more than one
        batch is ever held as Record objects: a stream's records as Python objects take several times their wire
        size (`python -m shard_server.ingest_memory`). The list is emptied as its parts are applied, so their
        memory is given back while the vectors take their place. All or nothing: an invalid record anywhere
        rejects the whole write before anything is logged. Searches may see the first batches shortly before the
        write returns; after a crash the frame is replayed whole or not at all.
        """
        rows_by_category = self._validate_encoded(parts)
        written = sum(rows_by_category.values())
        if written:
            header = json.dumps(rows_by_category, separators=(",", ":")).encode()
            frame_bytes = len(OP_BULK_UPSERT) + _BULK_HEADER_LENGTH.size + len(header) + sum(map(len, parts))
            if frame_bytes > MAX_FRAME_BYTES:  # the stream fits max_stream_bytes, its frame header does not
                raise RequestTooLargeError(
                    f"the stream is {frame_bytes} bytes as one log record; the log's limit is {MAX_FRAME_BYTES}"
                )
            # A chain, not a tuple: the log keeps no reference to the parts once the frame is written.
            self._commit(itertools.chain((OP_BULK_UPSERT, _BULK_HEADER_LENGTH.pack(len(header)), header), parts),
                         lambda: self._apply_upsert_batches(_drain(parts), rows_by_category, validate=False))
        return written

    def _validate_encoded(self, parts: Sequence[bytes]) -> Counter[str]:
        """Check every record of serialised parts (batch by batch, none kept); returns the records per category."""
        rows_by_category: Counter[str] = Counter()
        for records in self._record_batches(convert.upsert_request_batches(parts, batch_bytes=UPSERT_BATCH_BYTES)):
            self._validate_records(records)
            _check_id_lengths(records)
            self._check_versions(r.version for r in records)
            rows_by_category.update(r.category for r in records)
        return rows_by_category

    @staticmethod
    def _record_batches(batches: Iterable[bytes | memoryview]) -> Iterator[list[Record]]:
        for batch in batches:
            yield convert.records_from_proto(shard_pb2.UpsertRequest.FromString(batch).records)

    def _apply_upsert_batches(self, chunks: Iterable[bytes | memoryview], rows_by_category: Mapping[str, int], *,
                              validate: bool) -> None:
        """Apply a bulk write batch by batch, validating each first if asked (on replay: see ``_replay``)."""
        for category, rows in rows_by_category.items():
            self._partition_for_write(category).reserve(rows)
        # Training waits until the whole write is in: started half-way, it would give a partition the list count
        # of the rows it had so far (a 200k-vector stream got IVF790 instead of IVF1789) and train it again later.
        self._bulk_write_applying.set()
        newest = 0
        try:
            for records in self._record_batches(convert.upsert_request_batches(chunks,
                                                                               batch_bytes=UPSERT_BATCH_BYTES)):
                if validate:
                    self._validate_records(records)
                newest = max(newest, self._apply_upsert(records, expire_tombstones=False))
                release_free_memory()  # the chunks drained so far: their pages go while the vectors grow
        finally:
            self._bulk_write_applying.clear()
        # Once for the whole write, as a unary write applied in one batch does: a replay cuts a unary write of
        # over UPSERT_BATCH_BYTES into batches, and forgetting deletes after its first batch let a later record
        # of the same write through that the live shard had dropped as older than the delete (review).
        if newest:
            self.tombstones.expire(newest)

    def delete(self, image_ids: Sequence[str], *, version: int = 0) -> int:
        """Remove ids; returns how many were held. With a `version`, only copies written with a lower version go,
        and the delete is remembered (tombstone_ttl_s) against older writes that arrive after it."""
        if len(image_ids) > self.config.max_records_per_request:
            raise RequestTooLargeError(f"{len(image_ids)} ids in one request; the limit is "
                                       f"{self.config.max_records_per_request}")
        for image_id in image_ids:
            if not image_id:
                raise InvalidRequestError("empty image id in delete request")
        self._check_versions([version])
        if not image_ids:
            return 0
        if version and len(self.tombstones) + len(image_ids) > self.config.max_tombstones and \
                self._tombstones_kept_by(version) + len(image_ids) > self.config.max_tombstones:
            raise RequestTooLargeError(
                f"this shard remembers {len(self.tombstones)} recent deletes, and {len(image_ids)} more would pass "
                f"its limit of {self.config.max_tombstones} (max_tombstones): retry once they expire "
                f"({self.config.tombstone_ttl_s:g} s after they were made)")
        payload = OP_DELETE + shard_pb2.ShardServiceDeleteRequest(image_ids=list(image_ids),
                                                                  version=version).SerializeToString()
        result: list[int] = []
        self._commit(payload, lambda: result.append(self._apply_delete(image_ids, version)))
        return result[0]

    def _tombstones_kept_by(self, version: int) -> int:
        """The remembered deletes a delete of this version would keep: its own apply expires the older ones, so
        a full budget drains with the deletes that arrive (counted before: a shard that received only removals,
        no writes, refused them for good once full; review of 2026-12-06). Counted under the apply lock (writers
        change the tombstones there), only when the budget looks full."""
        with self._apply_cond:
            return self.tombstones.kept_after_expiry(version)

    def get(self, image_ids: Sequence[str]) -> list[Record]:
        """The stored records of these image ids, in the order asked; unknown ids are left out."""
        if len(image_ids) > self.config.max_records_per_request:
            raise RequestTooLargeError(f"{len(image_ids)} ids in one request; the limit is "
                                       f"{self.config.max_records_per_request}")
        for image_id in image_ids:
            if not image_id:
                raise InvalidRequestError("empty image id in get request")
        # The id map is read without a lock, so a read can fall between two steps of a write: an image re-written
        # has its new row in the id map only after its old row was dropped (a get found it missing), and a
        # compaction renumbers a partition's rows in the id map before it swaps the partition (rows would be read
        # in the wrong one). Read again then; after GET_SETTLE_S, answer what is found.
        settle_by = time.monotonic() + GET_SETTLE_S
        while True:
            relocations = self._relocations
            if relocations % 2 == 0:
                try:
                    found, settled = self._get(image_ids)
                except IndexError:  # an old row number past the end of a renumbered partition
                    if self._relocations == relocations:
                        raise
                    continue
                if self._relocations == relocations and (settled or time.monotonic() > settle_by):
                    return found
            time.sleep(0.001)

    def _get(self, image_ids: Sequence[str]) -> tuple[list[Record], bool]:
        """The records found, and whether every id the id map located was found at its row."""
        rows_by_category: dict[str, list[int]] = {}
        located_ids = 0
        for image_id in dict.fromkeys(image_ids):
            located = self.id_map.get(image_id)
            if located is not None:
                located_ids += 1
                category = self._category_names[located >> ROW_BITS]
                rows_by_category.setdefault(category, []).append(located & ROW_MASK)
        found: dict[str, Record] = {}
        for category, rows in rows_by_category.items():
            for (image_id, product_id, attributes, version), vector in self.partitions[category].records(
                    np.array(rows, dtype=np.int64)):
                found[image_id] = Record(image_id=image_id, product_id=product_id, category=category,
                                         vector=vector, attributes=attributes, version=version)
        records = [found[image_id] for image_id in dict.fromkeys(image_ids) if image_id in found]
        return records, len(records) == located_ids

    def _validate_records(self, records: Iterable[Record]) -> None:
        dim = self.config.dimension
        for r in records:
            if not r.image_id:
                raise InvalidRequestError("record with an empty image id")
            if not r.category:
                raise InvalidRequestError(f"record {r.image_id!r}: empty category")
            normalised(r.vector, dim, f"record {r.image_id!r}")
            validate_attributes(r.attributes, self.schema, r.image_id)

    def _commit(self, payload: bytes | Iterable[bytes], apply) -> None:
        """Log then apply, in log order (replay must reproduce exactly what live writers did)."""
        if not self.loaded:
            raise WalError("shard is not loaded yet")
        try:
            seq = self.wal.append(payload)
        except WalError as e:
            seq = getattr(e, "seq", None)
            if seq is not None:  # written but not known durable: never apply it, but keep the order moving
                self._advance(seq, None)
            raise
        self._advance(seq, apply)
        self._train_wakeup.set()

    def _advance(self, seq: int, apply) -> None:
        with self._apply_cond:
            # In log order; and a write logged after a snapshot's boundary waits until the dump is written, so
            # the snapshot holds exactly the writes of the segments it replaces (a replay applies none twice).
            while self._applied_seq != seq - 1 or (self._snapshot_barrier is not None and seq > self._snapshot_barrier):
                self._apply_cond.wait()
            try:
                if apply is not None:
                    self._writes_since_snapshot += 1
                    apply()
            finally:
                self._applied_seq = seq
                self._apply_cond.notify_all()
        metrics.WAL_BYTES.set(self.wal.size_bytes)

    def _replay(self, frame: LogFrame) -> None:
        op, body = _take(frame.chunks(), 1)
        if op in (OP_UPSERT, OP_BULK_UPSERT):
            rows_by_category = {}
            if op == OP_BULK_UPSERT:
                length, body = _take(body, _BULK_HEADER_LENGTH.size)
                header, body = _take(body, _BULK_HEADER_LENGTH.unpack(length)[0])
                rows_by_category = json.loads(header)
            # One pass, each batch validated then applied: the write was validated whole before it was logged,
            # and should a batch fail now (a changed dimension or schema), load() stops the shard before anything
            # is snapshotted, so the batches applied before it are simply dropped with the process.
            self._apply_upsert_batches(body, rows_by_category, validate=True)
        elif op == OP_DELETE:
            request = shard_pb2.ShardServiceDeleteRequest.FromString(b"".join(body))
            self._apply_delete(list(request.image_ids), request.version)
        else:
            raise WalError(f"unknown log record type {op!r}")

    def _apply_upsert(self, records: Sequence[Record], *, expire_tombstones: bool = True) -> int:
        """Apply one batch of a write; returns its newest version (0: none). `expire_tombstones` False: the caller
        forgets old deletes once the whole write is applied."""
        latest: dict[str, Record] = {}
        for r in records:
            # Of an id's records in one batch, the one that applying them one by one would leave: the highest
            # version, the last one on a tie; an unversioned record replaces what came before it (arrival order),
            # as it would across batches, so a stream's outcome does not depend on where its batches are cut.
            earlier = latest.pop(r.image_id, None)
            latest[r.image_id] = earlier if earlier is not None and r.version and earlier.version > r.version else r
        # Of every record, not only those kept: a replay may cut the write into batches elsewhere, and an id's
        # records can then fall into two batches (review: [x@111 s, x unversioned] forgot old deletes on replay
        # only).
        newest = max((r.version for r in records), default=0)
        if newest:
            # Versioned writes: whatever order they arrive in, an id keeps its highest version, so replicas and
            # concurrent brokers converge; a write older than what is held, or than a remembered delete, is dropped.
            latest = {image_id: r for image_id, r in latest.items() if self._takes(r)}
            for image_id, r in latest.items():
                if r.version:  # newer than the remembered delete (_takes); an unversioned write leaves it
                    self.tombstones.forget(image_id)
            if expire_tombstones:
                self.tombstones.expire(newest)
        # Where the images are held now; their id map entries stay until their new rows are in (see get).
        held = self._rows_of(latest.keys())
        by_category: dict[str, list[Record]] = {}
        for r in latest.values():
            by_category.setdefault(r.category, []).append(r)
        # An image's old row in the category it is written to is replaced in the same step as its new row is
        # added (Partition.append); one in another category (a move) is removed after it, and searches over both
        # categories that overlap the move are done again (see search).
        moves = [(category, row, latest[image_id].category) for image_id, (category, row) in held.items()
                 if category != latest[image_id].category]
        moved: dict[str, list[int]] = {}
        for category, row, _ in moves:
            moved.setdefault(category, []).append(row)
        if moves:
            self._move_epoch += 1
            self._recent_moves.append((self._move_epoch, frozenset(c for old, _, new in moves for c in (old, new))))
        try:
            dim = self.config.dimension
            for category, group in by_category.items():
                partition = self._partition_for_write(category)
                vectors = np.stack([normalised(r.vector, dim, r.image_id) for r in group])
                replacing = [held[r.image_id][1] for r in group if r.image_id in held and held[r.image_id][0] == category]
                rows = partition.append([r.image_id for r in group], [r.product_id for r in group], vectors,
                                        [r.attributes for r in group], [r.version for r in group],
                                        replacing=np.asarray(replacing, dtype=np.int64))
                base = self._category_number(category) << ROW_BITS
                for r, row in zip(group, rows.tolist()):
                    self.id_map[r.image_id] = base | row
                _export_category(self, category, partition)
            self._delete_rows(moved)
        finally:
            if moved:
                self._move_epoch += 1
        return newest

    def _partition_for_write(self, category: str) -> Partition:
        partition = self.partitions.get(category)
        if partition is None:
            partition = Partition(category, self.config)
            self.partitions = {**self.partitions, category: partition}
        return partition

    def _category_number(self, category: str) -> int:
        number = self._category_numbers.get(category)
        if number is None:
            number = self._category_numbers[category] = len(self._category_names)
            self._category_names.append(category)
        return number

    def _apply_delete(self, image_ids: Iterable[str], version: int = 0) -> int:
        if not version:
            return self._remove_ids(set(image_ids))
        older = []
        for image_id in dict.fromkeys(image_ids):
            held = self._held_version(image_id)
            if held is not None and held >= version:
                continue  # written after this delete: it stays, and needs no tombstone
            older.append(image_id)
            self.tombstones.raise_to(image_id, version)
        self.tombstones.expire(version)
        return self._remove_ids(older)

    def _held_version(self, image_id: str) -> int | None:
        """The version of the row this shard holds for the id (0: unversioned), None when it holds none."""
        located = self.id_map.get(image_id)
        if located is None:
            return None
        return int(self.partitions[self._category_names[located >> ROW_BITS]].versions.view[located & ROW_MASK])

    def _takes(self, record: Record) -> bool:
        """Whether a versioned write is newer than the row held and than a remembered delete of its id."""
        if not record.version:
            return True
        deleted = self.tombstones.get(record.image_id)
        if deleted is not None and deleted >= record.version:
            return False
        held = self._held_version(record.image_id)
        return held is None or held <= record.version  # equal: the same write again (a retry, a replay)

    def _remove_ids(self, image_ids: Iterable[str]) -> int:
        rows_by_category: dict[str, list[int]] = {}
        for category, row in self._rows_of(image_ids, remove=True).values():
            rows_by_category.setdefault(category, []).append(row)
        self._delete_rows(rows_by_category)
        return sum(map(len, rows_by_category.values()))

    def _rows_of(self, image_ids: Iterable[str], *, remove: bool = False) -> dict[str, tuple[str, int]]:
        """The (category, row) each of these ids is held at; `remove`: taken out of the id map."""
        held = {}
        for image_id in image_ids:
            located = self.id_map.pop(image_id, None) if remove else self.id_map.get(image_id)
            if located is not None:
                held[image_id] = (self._category_names[located >> ROW_BITS], located & ROW_MASK)
        return held

    def _delete_rows(self, rows_by_category: Mapping[str, list[int]]) -> None:
        for category, rows in rows_by_category.items():
            self.partitions[category].delete(np.array(rows, dtype=np.int64))
            _export_category(self, category, self.partitions[category])

    # --- search ----------------------------------------------------------------------------------------------
    def validate_query(self, query: SearchQuery) -> np.ndarray:
        if query.top_k <= 0 or query.top_k > self.config.max_top_k:
            raise InvalidRequestError(f"top_k must be in 1..{self.config.max_top_k}, got {query.top_k}")
        if query.nprobe < 0:
            raise InvalidRequestError(f"nprobe must be >= 0, got {query.nprobe}")
        for category in query.categories:
            if not category:
                raise InvalidRequestError("empty category name in search request")
        validate_filter(query.filter, self.schema)
        return normalised(query.vector, self.config.dimension, "query")

    def nprobe_for(self, query: SearchQuery) -> int:
        if query.nprobe > 0:
            return min(query.nprobe, self.config.max_nprobe)
        base = self.config.nprobe
        return {Exactness.FAST: max(1, base // 2), Exactness.HIGH: base * 4}.get(query.exactness, base)

    def search(self, query: SearchQuery, *, exact_rows_limit: int | None = None) -> SearchResult:
        """The top-k hits over the query's categories. `exact_rows_limit`: see Partition.search (raises
        ExactScanTooLong)."""
        vector = self.validate_query(query)
        nprobe = self.nprobe_for(query)
        exhaustive = query.exactness is Exactness.EXACT
        for _ in range(MOVE_RETRIES):
            # An image moved between two searched categories is added to one, then removed from the other: a
            # search that read the first before and the second after missed it (2.6 % of searches under a stream of
            # moves, review). Done again when a move overlapped it; answered as it is after MOVE_RETRIES.
            epoch = self._move_epoch
            partitions = self.partitions  # again on each try: a compaction may have replaced one
            categories = query.categories or tuple(sorted(partitions))
            # Unknown categories: no hits, not an error.
            searched = [(c, partitions[c]) for c in dict.fromkeys(categories) if c in partitions]
            result = self._search_partitions(vector, query, searched, nprobe, exhaustive, exact_rows_limit)
            if not self._moved_across(epoch, query.categories):
                break
        return result

    def _moved_across(self, epoch: int, categories: Sequence[str]) -> bool:
        """Whether a move between two of the asked categories (none asked: every category, those created
        meanwhile too) overlapped a search that started at `epoch`. Moves elsewhere do not count: one shared counter had 1.4
        passes a search while other categories moved images (review); a move into a category created during the
        search does (it was not among the partitions searched: review)."""
        now = self._move_epoch
        if now == epoch and epoch % 2 == 0:  # the common case, first: no move at all
            return False
        asked = set(categories) if categories else None
        if asked is not None and len(asked) < 2:
            return False
        first = epoch if epoch % 2 else epoch + 1  # the move under way at the start, or the first one after it
        moves = list(self._recent_moves)
        if len(moves) == RECENT_MOVES and moves[0][0] > first:
            return True  # too many moves since to tell
        return any(started >= first and (asked is None or len(touched & asked) > 1) for started, touched in moves)

    def _search_partitions(self, vector: np.ndarray, query: SearchQuery, searched: list[tuple[str, Partition]],
                           nprobe: int, exhaustive: bool, exact_rows_limit: int | None) -> SearchResult:
        if len(searched) >= MANY_PARTITIONS:
            result = self._search_many(vector, query, searched, nprobe, exhaustive, exact_rows_limit)
            if result is not None:
                return result
            # A row changed between its two reads (deleted, or re-written with new attributes or vector): the
            # one-pass search below, whose reads are consistent partition by partition, answers instead.
        found: list[tuple[float, str, tuple[str, str, dict, int]]] = []
        scanned = 0
        for category, partition in searched:
            hits = partition.search(vector, query.top_k, query.filter, nprobe, exhaustive,
                                    distinct=query.distinct_products, exact_rows_limit=exact_rows_limit)
            scanned += hits.candidates_scanned
            found.extend(zip(hits.scores.tolist(), [category] * len(hits.details), hits.details))
        found.sort(key=_found_key)
        return SearchResult(hits=_answer(found, query, several=len(searched) > 1), candidates_scanned=scanned)

    def _search_many(self, vector: np.ndarray, query: SearchQuery, searched: list[tuple[str, Partition]],
                     nprobe: int, exhaustive: bool, exact_rows_limit: int | None) -> SearchResult | None:
        """A search over many partitions (every category of a shard that holds hundreds): each gives its top-k
        rows and scores only, and ids and attributes are read for the best of them all, in order, until top_k
        hits are answered. Reading them for every partition's top-k made a search over 2,000 categories of 10
        vectors take 193 ms (`python -m shard_server.category_probe`). None when a row it needs was deleted
        between the two reads (its image may have been re-written elsewhere, with another score)."""
        scanned = 0
        parts: list[tuple[np.ndarray, int, np.ndarray]] = []
        for index, (_, partition) in enumerate(searched):
            hits = partition.search(vector, query.top_k, query.filter, nprobe, exhaustive,
                                    distinct=query.distinct_products, exact_rows_limit=exact_rows_limit,
                                    with_details=False)
            scanned += hits.candidates_scanned
            if len(hits.rows):
                parts.append((hits.scores, index, hits.rows))
        if not parts:
            return SearchResult(hits=(), candidates_scanned=scanned)
        scores = np.concatenate([p[0] for p in parts])
        owners = np.concatenate([np.full(len(p[0]), p[1]) for p in parts])
        rows = np.concatenate([p[2] for p in parts])
        order = np.argsort(-scores, kind="stable")
        descending = -scores[order]  # already rounded by the partitions (Partition._top_k_of)
        found: list[tuple[float, str, tuple[str, str, dict, int]]] = []
        answer: tuple[Hit, ...] = ()
        start, chunk = 0, max(2 * query.top_k, 32)
        while start < len(order):
            # A round ends after the last of the scores equal to its last one: a group of equal scores cut by a
            # round's end was cut in category order, not by image id (review of 2026-12-05).
            end = int(np.searchsorted(descending, descending[min(start + chunk, len(order)) - 1], side="right"))
            positions = order[start:end]
            # Doubling: when duplicates (distinct products across categories) keep the answer short, every round
            # re-reads the whole list, so the rounds must grow or the search is quadratic.
            start, chunk = end, 2 * chunk
            details: dict[int, tuple[str, str, dict, int]] = {}
            for owner in dict.fromkeys(owners[positions].tolist()):
                mine = positions[owners[positions] == owner]
                for position, detail in zip(mine.tolist(), searched[owner][1].live_details(rows[mine]), strict=True):
                    if detail is None:
                        return None
                    details[position] = detail
            # equal scores by image id, as in the one-pass search: a round holds whole groups of equal scores, all
            # below the rounds before it, so sorting it alone keeps `found` in order
            found.extend(sorted(((float(scores[p]), searched[owners[p]][0], details[p]) for p in positions.tolist()),
                                key=_found_key))
            answer = _answer(found, query, several=True)
            if len(answer) >= query.top_k:
                break
        return SearchResult(hits=answer, candidates_scanned=scanned)

    # --- stats -----------------------------------------------------------------------------------------------
    def stats(self) -> ShardStats:
        categories = tuple(
            CategoryStats(category=name, vectors=p.live_count, trained=p.ivf is not None,
                          index_type=p.index_type, resident_bytes=p.resident_bytes())
            for name, p in sorted(self.partitions.items()))
        return ShardStats(categories=categories, dimension=self.config.dimension, wal_bytes=self.wal.size_bytes)

    def _update_gauges(self) -> None:
        total = 0
        for name, p in self.partitions.items():
            _export_category(self, name, p)
            total += p.resident_bytes()
        metrics.RESIDENT_BYTES.set(total)
        metrics.WAL_BYTES.set(self.wal.size_bytes)

    # --- background training ---------------------------------------------------------------------------------
    def _training_loop(self) -> None:
        if self.config.train_threads > 0:
            faiss.omp_set_num_threads(self.config.train_threads)  # per-thread in OpenMP: searches keep theirs
        while not self._stop.is_set():
            self._train_wakeup.wait(timeout=2.0)
            self._train_wakeup.clear()
            if self._stop.is_set():
                break
            self.train_pending()
            self._update_gauges()

    def train_pending(self) -> int:
        """Train (and swap in) every partition that wants it; returns how many were swapped."""
        swapped = 0
        for partition in list(self.partitions.values()):
            # during a bulk write the training loop tries again later (see _apply_upsert_batches)
            if self._stop.is_set() or self._bulk_write_applying.is_set() or not partition.wants_training():
                continue
            metrics.TRAINING_EVENTS.labels("started").inc()
            try:
                partition.train_and_swap()
            except Exception:  # noqa: BLE001 - keep serving exact search; retry only after more writes
                log.exception("training partition %s failed", partition.name)
                partition.training_failed_at_rows = partition.live_count
                metrics.TRAINING_EVENTS.labels("failed").inc()
                continue
            metrics.TRAINING_EVENTS.labels("completed").inc()
            metrics.INDEX_SWAPS.inc()
            _export_category(self, partition.name, partition)
            with self._apply_cond:  # the snapshot thread subtracts what it covered
                self._swaps_since_snapshot += 1
            swapped += 1
        for partition in list(self.partitions.values()):
            if self._stop.is_set() or self._bulk_write_applying.is_set() or not partition.compaction_due():
                continue
            try:
                self.compact(partition)
            except Exception:  # noqa: BLE001 - the partition keeps serving as it is; tried again on the next round
                log.exception("compacting partition %s failed", partition.name)
                metrics.COMPACTIONS.labels("failed").inc()
        return swapped

    def compact(self, partition: Partition) -> None:
        """Replace a partition by a copy of its live rows (Partition.compacted_copy), renumbered: built while
        writes and searches go on, caught up with the writes made meanwhile, and swapped in, with the id map's
        rows, while writes wait (the last catch-up and the id map: ~0.3 s a million rows). Searches under way
        finish on the old partition, which no longer changes."""
        t0 = time.perf_counter()
        rows_before = len(partition.image_ids)
        copy, copied_from = partition.compacted_copy()
        while True:
            # Rows written while copying are caught up outside the lock, until few are left for the last catch-up,
            # which every write waits for. A bulk write under way holds the apply condition for its whole length
            # (a 20k-row stream made a last catch-up of 20k rows, review): caught up as it goes, and checked again
            # once the condition is ours.
            caught = len(copied_from)
            copied_from = copy.catch_up(partition, copied_from, final=False)
            if self._stop.is_set():
                return
            if self._bulk_write_applying.is_set() or len(copied_from) - caught > CATCH_UP_ROWS:
                time.sleep(0.05 if len(copied_from) == caught else 0)
                continue
            with self._apply_cond:
                if len(partition.image_ids) - copy.source_rows_seen > CATCH_UP_ROWS:
                    continue
                if self.partitions.get(partition.name) is not partition:  # pragma: no cover - one thread compacts
                    return
                self._swap_in_compacted(partition, copy, copied_from)
                break
        _export_category(self, partition.name, copy)
        metrics.COMPACTIONS.labels("completed").inc()
        log.info("partition %s: compacted %d rows to %d in %.1fs", partition.name, rows_before,
                 len(copy.image_ids), time.perf_counter() - t0)

    def _swap_in_compacted(self, partition: Partition, copy: Partition, copied_from: np.ndarray) -> None:
        """The last catch-up, the id map's rows and the swap; the caller holds the apply condition."""
        copy.catch_up(partition, copied_from, final=True)
        base = self._category_number(partition.name) << ROW_BITS
        live = np.flatnonzero(copy.alive.view)
        self._relocations += 1  # odd: `get` waits (it reads the id map without a lock)
        try:
            self.id_map.update(zip(copy.image_ids.view[live].tolist(), (base | live).tolist()))
            self.partitions = {**self.partitions, partition.name: copy}
        finally:
            self._relocations += 1
        self._swaps_since_snapshot += 1  # the next snapshot drops the dead rows from disk too

    # --- snapshots -------------------------------------------------------------------------------------------
    def _snapshot_loop(self) -> None:
        failures, retry_at = 0, 0.0
        while not self._stop.wait(timeout=1.0):
            now = time.monotonic()
            due = now - self._last_snapshot_at >= self.config.snapshot_interval_s
            if now >= retry_at and (self._swaps_since_snapshot or (
                    self._writes_since_snapshot and (due or self.wal.size_bytes >= self.config.snapshot_wal_bytes))):
                try:
                    self.snapshot()
                    failures = 0
                except Exception:  # noqa: BLE001 - the log still holds everything; try again later
                    # Later and later (2, 4, ... 64 s): after an index swap or with a big log it was due again at
                    # once, and a full disk got the whole snapshot written (and a new log segment) every second.
                    failures += 1
                    delay_s = min(SNAPSHOT_RETRY_MAX_S, 2.0 ** failures)
                    log.exception("snapshot failed (%d in a row); next try in %.0f s", failures, delay_s)
                    self._last_snapshot_at = time.monotonic()
                    retry_at = self._last_snapshot_at + delay_s

    def snapshot(self) -> None:
        """Write a snapshot covering every applied write, then drop the log segments it covers."""
        with self._snapshot_lock:
            t0 = time.perf_counter()
            with self._apply_cond:
                # The boundary is set with the rotation, before any write of the new segment can be applied.
                closed_generation, last_seq = self.wal.rotate()
                self._snapshot_barrier = last_seq
            try:
                try:
                    with self._apply_cond:
                        while self._applied_seq < last_seq:
                            self._apply_cond.wait()
                        swaps = self._swaps_since_snapshot
                        # No write is applied while we hold the condition; later ones wait for the barrier (already
                        # logged durably in the new segment, which the replay after this snapshot starts with) only
                        # while the partitions are captured, not while they are written out.
                        images = self.snapshots.capture(self.partitions)
                        tombstones = list(self.tombstones.items())
                        # once captured (a capture that failed left them counted: review)
                        writes, self._writes_since_snapshot = self._writes_since_snapshot, 0
                finally:
                    with self._apply_cond:
                        self._snapshot_barrier = None
                        self._apply_cond.notify_all()
            except BaseException:
                self._after_failed_snapshot(0)
                raise
            try:
                path = self.snapshots.write(images, wal_generation=closed_generation, config=self.config,
                                            tombstones=tombstones)
            except BaseException:
                del images  # its frozen parts, before they are merged into one
                self._after_failed_snapshot(writes)
                raise
            # Written and renamed into place: the snapshot is durable, whatever happens next. Each step after it is
            # tried whatever the others do (a rebase that failed left the log and every older snapshot behind, one
            # more at each retry; a log drop that failed left the vectors unmapped, a part more each time: reviews);
            # a failed one is tried again with the next snapshot, after the loop's backoff.
            with self._apply_cond:
                self._swaps_since_snapshot -= swaps
            failed: list[BaseException] = []

            def attempt(step, *args) -> None:
                try:
                    step(*args)
                except Exception as exc:  # noqa: BLE001 - logged, and raised once the others have run
                    log.exception("after snapshot %s", path.name)
                    failed.append(exc)

            attempt(self.wal.drop_through, closed_generation)
            attempt(self.snapshots.prune, path)  # the files of older ones stay readable while mapped (Linux)
            attempt(self.snapshots.rebase_vectors, path, images)
            del images
            if failed:
                self._after_failed_snapshot(0)  # the vectors not mapped stay in memory, as one part
                with self._apply_cond:
                    self._swaps_since_snapshot += 1
                raise failed[0]
            release_free_memory()  # the in-memory vectors now read from the snapshot's file
            self._last_snapshot_at = time.monotonic()
            metrics.SNAPSHOTS.inc()
            self._update_gauges()
            log.info("snapshot %s written in %.1fs", path.name, time.perf_counter() - t0)

    def _after_failed_snapshot(self, writes: int) -> None:
        """The writes it covered counted again, so that the snapshot loop tries again and close() takes one (a
        failed write used to leave no write to snapshot, and the log was replayed at every start: review), and the
        vectors' tails it froze made one part again (VectorStore.merge_frozen)."""
        with self._apply_cond:
            self._writes_since_snapshot += writes
        for partition in list(self.partitions.values()):
            try:
                partition.vectors.merge_frozen(partition.lock)
            except Exception:  # noqa: BLE001 - only a saving: it must not hide the snapshot's own error (review)
                log.exception("merging partition %s's frozen vectors failed", partition.name)


def _answer(found: list[tuple[float, str, tuple[str, str, dict, int]]], query: SearchQuery, *,
            several: bool) -> tuple[Hit, ...]:
    """The top_k hits of (score, category, details) items sorted best first."""
    # Partitions are searched one lock at a time: an image moved to another category meanwhile can be read in both.
    # Keep its newest copy, best row first (a shard never holds an image twice). Hits are built lazily, as many as
    # are answered: a search over many categories finds top_k in each.
    if several and len({details[0] for _, _, details in found}) < len(found):
        found = newest_copies(found, key=lambda item: item[2][0], version=lambda item: item[2][3])
    out = (Hit(image_id=image_id, product_id=product_id, category=category, score=score, attributes=attributes,
               version=version)
           for score, category, (image_id, product_id, attributes, version) in found)
    out = first_of_each(out, key=attrgetter("image_id"))
    if query.distinct_products:  # a product filed under two categories is still one product
        out = distinct_products(out)
    return tuple(itertools.islice(out, query.top_k))


def _found_key(item: tuple[float, str, tuple[str, str, dict, int]]) -> tuple[float, str]:
    return rank_key(item[0], item[2][0])


def _check_id_lengths(records: Iterable[Record]) -> None:
    """Writes only, not the log's replay: a log written before this limit must still load."""
    for r in records:
        for name in ("image_id", "product_id", "category"):
            if len(getattr(r, name)) > MAX_ID_CHARS:
                raise InvalidRequestError(f"record {r.image_id[:64]!r}: {name} is over {MAX_ID_CHARS} characters")
