"""Durability: a real `imgsearch-shard` process SIGKILLed in the middle of a streaming upsert keeps every
acknowledged write and shows nothing of the cut stream; torn log tails are cut; snapshots are checksummed;
a graceful SIGTERM leaves a snapshot that the next start loads."""

import asyncio
import contextlib
import dataclasses
import re
import time
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest

from imgsearch.errors import ImgsearchError
from imgsearch.v1 import shard_pb2
from shard_server import convert, synthetic
from shard_server import engine as engine_module
from shard_server import wal as wal_module
from shard_server.client import ShardClient
from shard_server.columns import GrowableArray
from shard_server.config import ShardConfig, parse_attribute_schema
from shard_server.engine import ShardEngine
from shard_server.errors import SnapshotCorruptError, WalCorruptError, WalError
from shard_server.process import ShardProcess
from shard_server.types import Exactness, SearchQuery
from shard_server.wal import FRAME_MAGIC, HEADER, LEGACY_HEADER, WriteAheadLog

DIM = 64
SHARD_ARGS = ("--dimension", str(DIM), "--nlist", "16", "--index-factory", "IVF{nlist},PQ16x4fs",
              "--train-threads", "1", "--snapshot-wal-bytes", "200000", "--max-records-per-request", "2000")


async def _top1(client: ShardClient, vector: np.ndarray) -> str | None:
    hits = (await client.search(SearchQuery(vector=vector, top_k=1, exactness=Exactness.EXACT), timeout_s=10)).hits
    return hits[0].image_id if hits else None


@pytest.mark.timeout(180)
async def test_sigkill_mid_stream_keeps_acknowledged_writes_only(tmp_path):
    catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=30, seed=2)
    vectors = catalogue.vectors(0, 3000)
    shard = ShardProcess(tmp_path / "data", extra_args=SHARD_ARGS).start()
    try:
        client = ShardClient(shard.address)
        # Acknowledged: one stream (over the snapshot threshold), then unary upserts and deletes after the snapshot.
        assert await client.upsert_stream(catalogue.iter_records(0, 1000), batch_size=100, timeout_s=60) == 1000
        deadline = time.monotonic() + 30
        while not list((tmp_path / "data" / "snapshots").glob("snap-*/manifest.json")):
            assert time.monotonic() < deadline, "no snapshot was taken"
            await asyncio.sleep(0.1)
        assert await client.upsert(catalogue.records(1000, 1500), timeout_s=30) == 500
        deleted = [synthetic.image_id(i) for i in range(0, 1500, 50)]
        assert await client.delete(deleted, timeout_s=30) == len(deleted)

        # Unacknowledged: a stream that has sent 1,000 records but never half-closes.
        sent, hold = asyncio.Event(), asyncio.Event()

        async def endless():
            for lo in range(1500, 2500, 100):
                for r in catalogue.records(lo, lo + 100):
                    yield r
            sent.set()
            await hold.wait()

        stream = asyncio.create_task(client.upsert_stream(endless(), batch_size=100, timeout_s=60))
        await asyncio.wait_for(sent.wait(), 30)
        await asyncio.sleep(0.5)  # let the server receive the messages
        shard.kill()
        with pytest.raises(ImgsearchError):
            await stream
        await client.close()

        shard.start()
        client = ShardClient(shard.address)
        stats = await client.stats(timeout_s=10)
        assert sum(c.vectors for c in stats.categories) == 1500 - len(deleted)
        deleted_set = set(deleted)
        for i in range(0, 1500, 7):
            expected = synthetic.image_id(i)
            found = await _top1(client, vectors[i])
            assert (found != expected) if expected in deleted_set else (found == expected), (i, found)
        for i in range(1500, 2500, 25):
            assert await _top1(client, vectors[i]) != synthetic.image_id(i), "a write of the cut stream is visible"
        # The restarted shard keeps accepting writes.
        assert await client.upsert(catalogue.records(2500, 2510), timeout_s=30) == 10
        assert await _top1(client, vectors[2505]) == synthetic.image_id(2505)
        await client.close()
    finally:
        shard.kill()


def test_torn_wal_tail_is_cut_on_replay(tmp_path):
    wal = WriteAheadLog(tmp_path)
    wal.open()
    for i in range(5):
        wal.append(f"record-{i}".encode())
    wal.close()
    segment = wal.segments()[-1]
    whole = segment.stat().st_size
    with open(segment, "ab") as f:  # a crash in the middle of the next frame
        f.write(HEADER.pack(FRAME_MAGIC, 1000, 12345) + b"partial")
    reopened = WriteAheadLog(tmp_path)
    assert [f.read().decode() for f in reopened.replay(0)] == [f"record-{i}" for i in range(5)]
    assert segment.stat().st_size == whole
    with open(segment, "r+b") as f:  # a flipped byte inside the last frame: CRC catches it
        f.seek(whole - 2)
        f.write(b"X")
    assert [f.read().decode() for f in WriteAheadLog(tmp_path).replay(0)] == [f"record-{i}" for i in range(4)]


@pytest.mark.parametrize("length", [0, 0x7FFFFFFF, 3])
def test_a_corrupt_length_field_with_writes_after_it_stops_the_replay(tmp_path, length):
    """A length field overwritten in the middle of the newest segment read as a torn tail (0: "zero-filled", or
    running past the end of the file), and the acknowledged writes after it were cut off without a word
    (review: 4 of 5 writes lost). Whole frames after it now show it is not the end of the log."""
    wal = WriteAheadLog(tmp_path)
    wal.open()
    payloads = [f"record-{i}".encode() * (i + 1) for i in range(5)]
    for payload in payloads:
        wal.append(payload)
    wal.close()
    (segment,) = wal.segments()
    size = segment.stat().st_size
    with open(segment, "r+b") as f:  # the second frame's length
        f.seek(HEADER.size + len(payloads[0]) + len(FRAME_MAGIC))
        f.write(length.to_bytes(4, "little"))
    with pytest.raises(WalCorruptError, match="followed by"):
        list(WriteAheadLog(tmp_path).replay(0))
    assert segment.stat().st_size == size


def _frames(payloads, *, header=HEADER) -> bytes:
    """Frames as the log writes them (or, with LEGACY_HEADER, as it wrote them before the frame marker)."""
    head = (lambda n, crc: header.pack(FRAME_MAGIC, n, crc)) if header is HEADER else header.pack
    return b"".join(head(len(p), zlib.crc32(p)) + p for p in payloads)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["many small frames after it", "a big frame", "a torn last write too"])
def test_a_corrupt_length_field_is_found_wherever_the_next_frame_is(tmp_path, case):
    """The first search for frames after a bad one (by length chains, 8 MiB at most) missed these, and cut the
    acknowledged writes as a torn tail (review): 1.1M small frames after the corruption (and hours of start-up),
    a corrupt frame of over 8 MiB, a corrupt length with a torn write at the end. The frame marker finds them."""
    if case == "many small frames after it":
        payloads = [b"first", *(b"delete %07d" % i for i in range(1_000_000))]
    elif case == "a big frame":
        payloads = [b"first", bytes(9 << 20), b"after the big one", b"and another"]
    else:
        payloads = [b"first", b"second", b"third"]
    segment = tmp_path / "000000000001.wal2"
    data = bytearray(_frames(payloads))
    length_at = HEADER.size + len(payloads[0]) + len(FRAME_MAGIC)  # the second frame's length field
    data[length_at:length_at + 4] = (0x7FFFFFFF).to_bytes(4, "little")
    if case == "a torn last write too":
        data += HEADER.pack(FRAME_MAGIC, 5000, 1) + b"partial"
    segment.write_bytes(bytes(data))
    started = time.monotonic()
    with pytest.raises(WalCorruptError, match="followed by a whole frame"):
        list(WriteAheadLog(tmp_path).replay(0))
    assert time.monotonic() - started < 10
    assert segment.stat().st_size == len(data)


def _replayed(directory) -> list[bytes]:
    return [frame.read() for frame in WriteAheadLog(directory).replay(0)]


def test_what_follows_a_bad_frame_decides_between_a_torn_tail_and_corruption(tmp_path):
    """Each bad frame of the newest segment below is cut as a torn tail, or refused because the log went on after
    it; the two cases of each kind differ in one thing only (review: the marker and the CRC of the search were
    untested, and a whole frame with a bad CRC before a torn write was cut)."""
    good = _frames([b"first", b"second"])
    fake = b"x" * 10 + HEADER.pack(FRAME_MAGIC, 20, 12345) + b"y" * 20 + FRAME_MAGIC  # a marker, a wrong CRC
    fake_ok = b"x" * 10 + _frames([b"y" * 20]) + FRAME_MAGIC  # the same with the CRC right
    flipped = bytearray(_frames([b"third"]))
    flipped[-1] ^= 1
    cases = {
        "torn write": (good + HEADER.pack(FRAME_MAGIC, 5000, 1) + b"partial", "cut"),
        "junk after the last frame": (good + b"\x07" * 100, "cut"),
        "marker and length in a torn payload, wrong CRC": (good + HEADER.pack(FRAME_MAGIC, 5000, 1) + fake, "cut"),
        "a whole frame in a torn payload": (good + HEADER.pack(FRAME_MAGIC, 5000, 1) + fake_ok, "refused"),
        "wrong marker, frames after it": (good + b"XXXX" + _frames([b"third"])[4:] + _frames([b"fourth"]),
                                          "refused"),
        "bad CRC, then a torn write": (good + bytes(flipped) + HEADER.pack(FRAME_MAGIC, 5000, 1) + b"part",
                                       "refused"),
        "bad CRC, then zeros": (good + bytes(flipped) + bytes(4096), "cut"),
    }
    for i, (name, (data, outcome)) in enumerate(cases.items()):
        directory = tmp_path / str(i)
        directory.mkdir()
        segment = directory / "000000000001.wal2"
        segment.write_bytes(data)
        if outcome == "cut":
            assert _replayed(directory) == [b"first", b"second"], name
            assert segment.stat().st_size == len(good), name
        else:
            with pytest.raises(WalCorruptError, match="followed by"):
                _replayed(directory)
            assert segment.stat().st_size == len(data), name


def test_the_log_leaves_other_files_alone_and_logs_no_empty_record(tmp_path):
    wal = WriteAheadLog(tmp_path)
    wal.open()
    wal.append(b"one")
    with pytest.raises(WalError, match="empty"):  # it would read as the start of a zero-filled tail
        wal.append(b"")
    wal.close()
    for name in ("notes.wal2", "000000000001.bak.wal2", "000000000001.wal2.tmp"):
        (tmp_path / name).write_bytes(b"not a segment")
    assert [p.name for p in WriteAheadLog(tmp_path).segments()] == ["000000000001.wal2"]
    assert _replayed(tmp_path) == [b"one"]


def test_segments_written_before_the_frame_marker_are_still_replayed(tmp_path):
    """A data dir of an older shard: its legacy segment is replayed (a torn tail cut as then), and the writes
    after the upgrade go to a new segment of the current format, replayed after it."""
    legacy = tmp_path / "000000000001.wal"
    legacy.write_bytes(_frames([b"old one", b"old two"], header=LEGACY_HEADER) + LEGACY_HEADER.pack(900, 1) + b"torn")
    wal = WriteAheadLog(tmp_path)
    assert [frame.read() for frame in wal.replay(0)] == [b"old one", b"old two"]
    wal.open()
    wal.append(b"new")
    wal.close()
    assert [p.name for p in wal.segments()] == ["000000000001.wal", "000000000002.wal2"]
    assert [frame.read() for frame in WriteAheadLog(tmp_path).replay(0)] == [b"old one", b"old two", b"new"]
    with open(legacy, "r+b") as f:  # a legacy segment, older than the newest: any bad frame is refused
        f.seek(LEGACY_HEADER.size + 2)
        f.write(b"X")
    with pytest.raises(WalCorruptError, match="older than the newest"):
        list(WriteAheadLog(tmp_path).replay(0))


def test_a_torn_last_write_is_still_cut_whatever_its_partial_payload(tmp_path):
    """The search for whole frames after a frame that runs past the end must not mistake a torn write's partial
    payload (random bytes, or zeros) for frames."""
    for i, partial in enumerate((np.random.default_rng(1).bytes(3 << 20), bytes(5000), b"\x01" * 70)):
        directory = tmp_path / str(i)
        wal = WriteAheadLog(directory)
        wal.open()
        wal.append(b"kept")
        wal.close()
        (segment,) = wal.segments()
        whole = segment.stat().st_size
        with open(segment, "ab") as f:
            f.write(HEADER.pack(FRAME_MAGIC, len(partial) + 1000, 12345) + partial)
        assert [frame.read() for frame in WriteAheadLog(directory).replay(0)] == [b"kept"]
        assert segment.stat().st_size == whole


def test_a_big_frame_is_verified_and_read_back_in_chunks(tmp_path, monkeypatch):
    """Frames over READ_CHUNK_BYTES are checked chunk by chunk and not held in memory; a torn one is still cut."""
    monkeypatch.setattr(wal_module, "READ_CHUNK_BYTES", 10)
    payloads = [b"small", bytes(range(256)) * 3, b"x" * 11]
    wal = WriteAheadLog(tmp_path)
    wal.open()
    for payload in payloads:
        wal.append(payload)
    wal.close()
    frames = list(WriteAheadLog(tmp_path).replay(0))
    assert [f.data is None for f in frames] == [False, True, True]
    assert [f.read() for f in frames] == payloads
    assert [len(c) for c in frames[1].chunks(300)] == [300, 300, 168]
    segment = wal.segments()[-1]
    size = segment.stat().st_size
    with open(segment, "r+b") as f:  # a flipped byte in the last frame (big too): a torn write, cut off
        f.seek(size - 3)
        f.write(b"X")
    assert [f.read() for f in WriteAheadLog(tmp_path).replay(0)] == payloads[:2]
    assert segment.stat().st_size == size - HEADER.size - len(payloads[2])


def test_a_corrupt_frame_with_writes_after_it_stops_the_replay_and_is_left_as_it_is(tmp_path):
    """A flipped byte in the middle of a segment (frames follow it) or in any older segment was taken for a torn
    tail: the acknowledged writes after it were dropped, the segment truncated, and the shard served anyway (a
    disk-fault review lost 50 of 300 writes). Only the newest segment may end torn; anything else refuses."""
    wal = WriteAheadLog(tmp_path)
    wal.open()
    for payload in (b"first", bytes(range(256)) * 3, b"third"):
        wal.append(payload)
    wal.rotate()
    wal.append(b"in the next segment")
    wal.close()
    older, newest = wal.segments()
    sizes = (older.stat().st_size, newest.stat().st_size)
    with open(older, "r+b") as f:
        f.seek(HEADER.size * 2 + len(b"first") + 400)
        f.write(b"X")
    with pytest.raises(WalCorruptError, match="older than the newest"):
        list(WriteAheadLog(tmp_path).replay(0))
    older.unlink()  # a segment missing altogether: the writes in it are lost too
    with pytest.raises(WalCorruptError, match="not the next ones"):
        list(WriteAheadLog(tmp_path).replay(0))
    assert newest.stat().st_size == sizes[1]
    single = tmp_path / "single"
    wal = WriteAheadLog(single)
    wal.open()
    for payload in (b"first", bytes(range(256)) * 3, b"third"):
        wal.append(payload)
    wal.close()
    (segment,) = wal.segments()
    with open(segment, "r+b") as f:
        f.seek(HEADER.size * 2 + len(b"first") + 400)
        f.write(b"X")
    with pytest.raises(WalCorruptError, match="followed by"):
        list(WriteAheadLog(single).replay(0))
    assert segment.stat().st_size == sizes[0]


def _engine_with_snapshot(tmp_path: Path, **settings) -> tuple[ShardConfig, Path]:
    config = ShardConfig(data_dir=tmp_path / "data", dimension=DIM, nlist=16, index_factory="IVF{nlist},PQ16x4fs",
                         train_threads=1, **settings)
    catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=10, seed=4)
    engine = ShardEngine(config)
    engine.load()
    engine.upsert(catalogue.records(0, 1000, category="trained"))
    engine.upsert(catalogue.records(1000, 1100, category="small"))
    assert engine.train_pending() == 1
    engine.snapshot()
    engine.close()
    [snapshot] = engine.snapshots.complete()
    return config, snapshot


@pytest.mark.parametrize("schema, dropped", [
    ("brand:text,colour:text,price:text,in_stock:flag", "price (number)"),  # a kind changed
    ("brand:text,price:number,in_stock:flag", "colour (text)"),  # an attribute removed
])
def test_a_snapshot_is_not_loaded_under_a_schema_that_would_drop_its_attribute_values(tmp_path, schema, dropped):
    """Loaded under such a schema, a snapshot's attribute values were dropped without a word, and gone for good
    once the next snapshot was written, while a log holding the same records refused to replay (review)."""
    config, _ = _engine_with_snapshot(tmp_path)
    changed = ShardEngine(dataclasses.replace(config, attribute_schema=parse_attribute_schema(schema)))
    with pytest.raises(SnapshotCorruptError, match=re.escape(dropped)):
        changed.load()
    changed.close()
    # an attribute added to the schema is fine: the rows have none of it, and keep all they had
    added = ShardEngine(dataclasses.replace(config, attribute_schema=parse_attribute_schema(
        "brand:text,colour:text,price:number,in_stock:flag,size:number")))
    added.load()
    [record] = added.get([synthetic.image_id(5)])
    expected = synthetic.SyntheticCatalogue(dim=DIM, clusters=10, seed=4).attributes(5, 6)[0]
    assert {k: v for k, v in record.attributes.items() if k != "size"} == expected
    added.close()


def test_snapshot_round_trip_and_checksum(tmp_path):
    config, snapshot = _engine_with_snapshot(tmp_path)
    segments = WriteAheadLog(config.data_dir / "wal").segments()
    assert segments and not any(p.stat().st_size for p in segments), "log not truncated"
    engine = ShardEngine(config)
    engine.load()
    stats = {c.category: (c.vectors, c.trained) for c in engine.stats().categories}
    assert stats == {"trained": (1000, True), "small": (100, False)}
    vector = synthetic.SyntheticCatalogue(dim=DIM, clusters=10, seed=4).vectors(1050, 1051)[0]
    assert engine.search(SearchQuery(vector=vector, top_k=1)).hits[0].image_id == synthetic.image_id(1050)
    engine.close()

    vectors_file = next(snapshot.rglob("vectors.npy"))
    data = bytearray(vectors_file.read_bytes())
    data[-3] ^= 0xFF  # one flipped bit pattern deep inside the exact vectors
    vectors_file.write_bytes(bytes(data))
    with pytest.raises(SnapshotCorruptError, match=r"checksum mismatch for p\d+/vectors.npy"):
        ShardEngine(config).load()


def test_float16_snapshot_loads_under_the_float32_default(tmp_path):
    """A shard whose snapshot stored its exact vectors as float16 keeps working after the switch to float32:
    the old rows are read as they are, new rows are float32, exact search over both matches brute force."""
    config16, snapshot = _engine_with_snapshot(tmp_path, vector_dtype="float16")
    assert np.load(next(snapshot.rglob("vectors.npy")), mmap_mode="r").dtype == np.float16
    config = dataclasses.replace(config16, vector_dtype="float32")
    catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=10, seed=4)
    engine = ShardEngine(config)
    engine.load()
    try:
        engine.upsert(catalogue.records(1100, 1200, category="trained"))
        vectors = np.concatenate([catalogue.vectors(0, 1000), catalogue.vectors(1100, 1200)])
        ids = [synthetic.image_id(i) for i in (*range(1000), *range(1100, 1200))]
        for query in catalogue.queries(10):
            found = engine.search(SearchQuery(vector=query, top_k=5, categories=("trained",),
                                              exactness=Exactness.EXACT)).hits
            truth = [ids[i] for i in np.argsort(-(vectors @ query))[:5]]
            assert found[0].image_id == truth[0]
            assert len({h.image_id for h in found} & set(truth)) >= 4  # float16 rounding may swap near-ties
        engine.snapshot()
    finally:
        engine.close()
    [newest] = sorted(engine.snapshots.complete())[-1:]
    assert {np.load(f, mmap_mode="r").dtype for f in newest.rglob("vectors.npy")} == {np.dtype(np.float32)}


def test_corrupt_snapshot_stops_the_process_with_a_clear_error(tmp_path):
    config, snapshot = _engine_with_snapshot(tmp_path)
    index_file = next(snapshot.rglob("index.faiss"))
    index_file.write_bytes(index_file.read_bytes()[:-10])
    shard = ShardProcess(config.data_dir, extra_args=("--dimension", str(DIM)))
    with pytest.raises(RuntimeError, match="exited with 1") as info:
        shard.start(timeout_s=60)
    assert "checksum mismatch" in str(info.value) and "index.faiss" in str(info.value)


@pytest.mark.timeout(120)
async def test_sigterm_drains_and_snapshots(tmp_path):
    catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=10, seed=9)
    shard = ShardProcess(tmp_path / "data", extra_args=SHARD_ARGS[:-4]).start()
    try:
        async with ShardClient(shard.address) as client:
            await client.upsert(catalogue.records(0, 300), timeout_s=30)
        assert shard.stop() == 0
        assert list((tmp_path / "data" / "snapshots").glob("snap-*/manifest.json")), "no snapshot on SIGTERM"
        shard.start()
        async with ShardClient(shard.address) as client:
            assert (await client.stats(timeout_s=5)).categories[0].vectors == 300
            assert (await client.stats(timeout_s=5)).wal_bytes == 0
    finally:
        shard.kill()


def test_stream_payload_is_an_upsert_request():
    """Concatenated UpsertStreamRequest messages parse as one UpsertRequest (the log stores them that way)."""
    catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=2)
    parts = [shard_pb2.UpsertStreamRequest(records=[convert.record_to_proto(r) for r in catalogue.records(i, i + 3)])
             for i in (0, 3)]
    merged = shard_pb2.UpsertRequest.FromString(b"".join(p.SerializeToString() for p in parts))
    assert [r.image_id for r in merged.records] == [synthetic.image_id(i) for i in range(6)]


def _encoded(records) -> bytes:
    return shard_pb2.UpsertStreamRequest(records=[convert.record_to_proto(r) for r in records]).SerializeToString()


def test_upsert_request_batches_cut_whole_records_without_copying():
    catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=3)
    records = catalogue.records(0, 40)
    encoded = _encoded(records)
    for max_bytes in (1, 300, 2000, len(encoded)):
        pieces = list(convert.upsert_request_batches([encoded], batch_bytes=max_bytes))
        assert b"".join(pieces) == encoded
        assert all(len(p) <= max_bytes for p in pieces if len(shard_pb2.UpsertRequest.FromString(p).records) > 1)
        assert [r.image_id for p in pieces for r in shard_pb2.UpsertRequest.FromString(p).records] == [
            r.image_id for r in records]
    with pytest.raises(ValueError, match="runs past the end"):
        list(convert.upsert_request_batches([encoded[:-1]], batch_bytes=1 << 20))
    with pytest.raises(ValueError, match="not UpsertRequest.records"):
        list(convert.upsert_request_batches([b"\x08\x01"], batch_bytes=1 << 20))


def test_upsert_request_batches_carry_records_cut_by_chunk_boundaries():
    """A log frame read a few bytes at a time, cut anywhere (inside a record's header too), comes out as whole
    records, the same ones in the same order; a frame ending inside a record is an error."""
    records = synthetic.SyntheticCatalogue(dim=DIM, clusters=3).records(0, 12)
    encoded = _encoded(records)
    for chunk_bytes in (1, 2, 7, 100, 1000, len(encoded)):
        chunks = [encoded[i:i + chunk_bytes] for i in range(0, len(encoded), chunk_bytes)]
        pieces = list(convert.upsert_request_batches(chunks, batch_bytes=500))
        assert b"".join(pieces) == encoded
        assert [r.image_id for p in pieces for r in shard_pb2.UpsertRequest.FromString(p).records] == [
            r.image_id for r in records]
    with pytest.raises(ValueError, match="runs past the end"):
        list(convert.upsert_request_batches([encoded[:100], encoded[100:-1]], batch_bytes=500))
    with pytest.raises(ValueError, match="not UpsertRequest.records"):
        list(convert.upsert_request_batches([b"\x08\x01" * 20], batch_bytes=500))


@pytest.mark.parametrize("read_chunk_bytes", [5, 1000])
def test_bulk_write_applied_and_replayed_in_batches_matches_one_upsert(tmp_path, monkeypatch, read_chunk_bytes):
    """A bulk write decoded and applied a few records at a time (the batch size forced down) leaves the shard as
    one plain upsert of the same records does, live and after replaying its log; a repeated id: the last wins.
    Replay reads the frame back in chunks cut anywhere: inside its header (5 bytes) or inside records."""
    monkeypatch.setattr(engine_module, "UPSERT_BATCH_BYTES", 1500)
    monkeypatch.setattr(wal_module, "READ_CHUNK_BYTES", read_chunk_bytes)
    catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=10, seed=5)
    records = catalogue.records(0, 150, category="a") + catalogue.records(150, 200, category="b")
    records.append(dataclasses.replace(records[180], image_id=records[5].image_id))  # id 5 moves to "b"
    # small messages, one big one (split on decode), small ones again
    parts = [_encoded(records[i:i + 7]) for i in range(0, 21, 7)] + [_encoded(records[21:160])]
    parts += [_encoded(records[i:i + 3]) for i in range(160, len(records), 3)]

    def settings(name: str) -> ShardConfig:
        return ShardConfig(data_dir=tmp_path / name, dimension=DIM, nlist=16, train_threads=1,
                           index_factory="IVF{nlist},PQ16x4fs")

    reference = ShardEngine(settings("reference"))
    reference.load()
    assert reference.upsert(records) == len(records)
    bulk = ShardEngine(settings("bulk"))
    bulk.load()
    assert bulk.upsert_encoded(parts) == len(records)
    assert parts == [], "the parts are released as they are applied"

    def state(engine: ShardEngine):
        stats = [(c.category, c.vectors) for c in engine.stats().categories]
        found = [[(h.image_id, h.category, round(h.score, 5)) for h in engine.search(
            SearchQuery(vector=q, top_k=8, exactness=Exactness.EXACT)).hits] for q in catalogue.queries(6)]
        return stats, found

    expected = state(reference)
    assert expected[0] == [("a", 149), ("b", 51)]
    assert state(bulk) == expected
    bulk.close()
    assert len(list(WriteAheadLog(tmp_path / "bulk" / "wal").replay(0))) == 1, "one frame for the bulk write"
    replayed = ShardEngine(settings("bulk"))
    replayed.load()
    assert state(replayed) == expected
    for engine in (reference, replayed):
        engine.close()


def test_a_log_record_that_cannot_be_applied_stops_the_shard_and_is_kept(tmp_path):
    """Acknowledged writes are never skipped on replay: a shard restarted with a configuration that refuses its
    log (here another dimension) exits with a clear error, and the right configuration still replays it all."""
    config = ShardConfig(data_dir=tmp_path / "data", dimension=DIM, nlist=16, train_threads=1,
                         index_factory="IVF{nlist},PQ16x4fs")
    catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=10, seed=6)
    engine = ShardEngine(config)
    engine.load()
    engine.upsert(catalogue.records(0, 50))
    engine.close()  # no snapshot: the records live in the log only
    shard = ShardProcess(config.data_dir, extra_args=("--dimension", str(DIM // 2)))
    with pytest.raises(RuntimeError, match="exited with 1") as info:
        shard.start(timeout_s=60)
    assert "cannot be applied" in str(info.value) and "expected 32" in str(info.value)
    engine = ShardEngine(config)
    engine.load()
    try:
        assert [(c.category, c.vectors) for c in engine.stats().categories] == [("default", 50)]
    finally:
        engine.close()


def test_training_waits_until_a_bulk_write_is_applied(tmp_path, monkeypatch):
    """A partition is not trained half-way through a bulk write (it would get the list count of the rows it had so
    far): the trainer declines while the batches go in, then trains on all of them."""
    monkeypatch.setattr(engine_module, "UPSERT_BATCH_BYTES", 64 << 10)  # ~170 records of 64-d per batch
    config = ShardConfig(data_dir=tmp_path / "data", dimension=DIM, train_threads=1, min_train_rows=200,
                         index_factory="IVF{nlist},PQ16x4fs")
    engine = ShardEngine(config)
    engine.load()
    swapped_mid_write = []
    apply = engine._apply_upsert

    def apply_then_try_training(records, **options):
        newest = apply(records, **options)
        swapped_mid_write.append(engine.train_pending())
        return newest

    monkeypatch.setattr(engine, "_apply_upsert", apply_then_try_training)
    catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=20, seed=7)
    try:
        assert engine.upsert_encoded([_encoded(catalogue.records(i, i + 100)) for i in range(0, 2000, 100)]) == 2000
        assert len(swapped_mid_write) > 5 and not any(swapped_mid_write)
        assert engine.train_pending() == 1
        [stats] = engine.stats().categories
        assert (stats.vectors, stats.index_type) == (2000, config.factory_for(config.nlist_for(2000)))
    finally:
        engine.close()


def test_a_reserved_growable_array_takes_a_bulk_write_without_growing_again():
    array = GrowableArray(np.float32, row_shape=(4,))
    array.extend(np.ones((3, 4)))
    array.reserve(1000)
    storage = array._data
    array.extend(np.full((1000, 4), 2.0))
    assert array._data is storage, "no copy: the room was made once"
    assert len(array) == 1003 and array.view[:3].sum() == 12 and array.view[3:].min() == 2.0
    array.reserve(0)
    assert array._data is storage


@pytest.mark.timeout(180)
def test_fuzzed_writes_and_reads_then_sigkill_keep_exactly_what_was_acknowledged(tmp_path):
    """Seeded random Upsert / Delete / Get / Search / SearchBatch calls at a real shard, some records odd (empty or
    70,000-character ids and categories, wrong dimensions, NaN/Inf, attributes of the wrong type): every answer
    is OK or a status naming the caller's mistake, a refused batch is refused whole, and after SIGKILL and a
    restart the shard holds exactly the acknowledged records (deleted ones stay deleted)."""
    import random

    import grpc

    from imgsearch.v1 import shard_pb2_grpc

    rng = random.Random(7)
    odd_strings = ["", "x" * 70_000, "é✓\u2028", "\x00a", " a"]
    odd_floats = [1e38, 1e-45, float("nan"), float("inf")]
    allowed = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
               grpc.StatusCode.NOT_FOUND}

    def record(i: int) -> shard_pb2.VectorRecord:
        r = shard_pb2.VectorRecord(image_id=f"img-{i}", product_id=f"p-{i % 40}", category=f"cat-{i % 3}")
        r.vector.values.extend(rng.gauss(0, 1) for _ in range(DIM))
        r.attributes["price"].number = rng.uniform(0, 100)
        odd = rng.randrange(200)  # one record in ~33 odd: most batches of 50 go through, some are refused whole
        if odd == 0:
            r.image_id = rng.choice(odd_strings)
        elif odd == 1:
            r.category = rng.choice(odd_strings)
        elif odd == 2:
            r.vector.values[:] = [0.5] * rng.choice([0, 1, DIM - 1, DIM + 1])
        elif odd == 3:
            r.vector.values[rng.randrange(DIM)] = rng.choice(odd_floats)
        elif odd == 4:
            r.attributes[rng.choice(["price", "nope", ""])].text = "text"
        elif odd == 5:
            r.attributes["price"].number = rng.choice(odd_floats)
        return r

    acked: dict[str, shard_pb2.VectorRecord] = {}
    seen: dict[str, int] = {}
    unexpected = []
    shard = ShardProcess(tmp_path / "data", extra_args=SHARD_ARGS).start()
    try:
        with grpc.insecure_channel(shard.address) as channel:
            stub = shard_pb2_grpc.ShardServiceStub(channel)
            next_id = 0
            for _ in range(600):
                op = rng.randrange(6)
                batch: list[shard_pb2.VectorRecord] = []
                try:
                    if op <= 2:
                        batch = [record(next_id + k) for k in range(rng.choice([1, 5, 50]))]
                        next_id += len(batch)
                        stub.Upsert(shard_pb2.UpsertRequest(records=batch), timeout=30)
                        acked.update((r.image_id, r) for r in batch)
                    elif op == 3:
                        ids = rng.sample(sorted(acked), min(3, len(acked))) + [rng.choice(odd_strings)]
                        stub.Delete(shard_pb2.ShardServiceDeleteRequest(image_ids=ids), timeout=30)
                        for image_id in ids:
                            acked.pop(image_id, None)
                    elif op == 4:
                        ids = [rng.choice(sorted(acked) or ["none"]), rng.choice(odd_strings)]
                        stub.Get(shard_pb2.ShardServiceGetRequest(image_ids=ids), timeout=30)
                    else:
                        query = shard_pb2.ShardServiceSearchRequest(top_k=rng.choice([0, 10, 1001]))
                        query.vector.values.extend(rng.gauss(0, 1) for _ in range(rng.choice([DIM, DIM, 3])))
                        if rng.random() < 0.3:
                            query.filter.all_of.add(field=rng.choice(["price", "nope"])).range.min = rng.choice(
                                odd_floats + [10.0])
                        query.options.exactness = rng.choice([0, 1, 2, 3, 77])
                        if rng.random() < 0.5:
                            stub.Search(query, timeout=30)
                        else:
                            stub.SearchBatch(shard_pb2.ShardServiceSearchBatchRequest(searches=[query] * 3), timeout=30)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as err:
                    code = err.code()
                    if code not in allowed:
                        unexpected.append((op, code.name, err.details()))
                seen[code.name] = seen.get(code.name, 0) + 1
        assert not unexpected, unexpected[:5]
        assert seen.get("OK", 0) > 300 and seen.get("INVALID_ARGUMENT", 0) > 30, seen
        assert len(acked) > 1000  # past the 200 kB snapshot threshold: the restart loads a snapshot, then the log
        deadline = time.monotonic() + 30
        while not list((tmp_path / "data" / "snapshots").glob("snap-*/manifest.json")):
            assert time.monotonic() < deadline, "no snapshot was taken"
            time.sleep(0.1)

        shard.kill()
        shard.start()
        with grpc.insecure_channel(shard.address,
                                   options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
            stub = shard_pb2_grpc.ShardServiceStub(channel)
            ids = sorted(acked)
            got = {}
            for lo in range(0, len(ids), 1000):
                request = shard_pb2.ShardServiceGetRequest(image_ids=ids[lo:lo + 1000])
                got.update((r.image_id, r) for r in stub.Get(request, timeout=30).records)
            stats = stub.Stats(shard_pb2.ShardServiceStatsRequest(), timeout=30)
    finally:
        shard.kill()
    assert sorted(got) == ids
    assert sum(c.vectors for c in stats.categories) == len(ids)  # nothing deleted came back, nothing refused got in
    for image_id, r in got.items():
        want = acked[image_id]
        assert (r.product_id, r.category) == (want.product_id, want.category)
        assert r.attributes["price"].number == pytest.approx(want.attributes["price"].number)
        # stored normalised: the same direction
        a, b = np.array(r.vector.values), np.array(want.vector.values)
        assert float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) > 0.999


# Fields a newer client may add to UpsertRequest / VectorRecord (field 15: varint 1; field 4: "hi").
_UNKNOWN_FIELDS = b"\x78\x01\x22\x02hi"
_COMMIT = b"\x18\x01"  # UpsertStreamRequest.commit (field 3) = true


@pytest.mark.timeout(120)
async def test_a_write_with_fields_this_shard_does_not_know_survives_a_restart(tmp_path):
    """A newer client's extra field is ignored, as protobuf does; it must not reach the log, which a replay
    after a crash would then fail to parse (the write was acknowledged: the shard would not start)."""
    catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=3, seed=5)
    records = [convert.record_to_proto(r) for r in catalogue.records(0, 3)]
    unary = shard_pb2.UpsertRequest(records=records[:1]).SerializeToString() + _UNKNOWN_FIELDS
    streamed = [shard_pb2.UpsertRequest(records=[r]).SerializeToString() + _UNKNOWN_FIELDS for r in records[1:]]
    shard = ShardProcess(tmp_path / "data", extra_args=SHARD_ARGS).start()
    try:
        async with grpc.aio.insecure_channel(shard.address) as channel:
            upsert = channel.unary_unary("/imgsearch.v1.ShardService/Upsert",
                                         response_deserializer=shard_pb2.UpsertResponse.FromString)
            assert (await upsert(unary, timeout=10)).upserted == 1
            stream = channel.stream_unary("/imgsearch.v1.ShardService/UpsertStream",
                                          response_deserializer=shard_pb2.UpsertResponse.FromString)
            assert (await stream(iter([*streamed[:-1], streamed[-1] + _COMMIT]), timeout=10)).upserted == 2
        shard.kill()
        shard.start()
        client = ShardClient(shard.address)
        ids = [r.image_id for r in records]
        assert sorted(r.image_id for r in await client.get(ids, timeout_s=10)) == sorted(ids)
        await client.close()
    finally:
        shard.kill()


def test_a_log_written_with_unknown_fields_still_replays(tmp_path):
    """Logs written before unknown fields were dropped hold them: replay skips them like protobuf does."""
    config = ShardConfig(data_dir=tmp_path, dimension=DIM)
    record = synthetic.SyntheticCatalogue(dim=DIM, clusters=3, seed=6).records(0, 1)[0]
    engine = ShardEngine(config)
    engine.load()
    encoded = shard_pb2.UpsertRequest(records=[convert.record_to_proto(record)]).SerializeToString()
    engine.upsert([record], encoded=encoded + _UNKNOWN_FIELDS)
    engine.wal.close()
    restarted = ShardEngine(config)
    restarted.load()
    assert [r.image_id for r in restarted.get([record.image_id])] == [record.image_id]


@pytest.mark.timeout(120)
def test_a_second_shard_process_on_the_same_data_dir_is_refused(tmp_path):
    """Two processes on one data dir (say, `imgsearch up --work-dir` run twice) would replay the same log, and
    the second one's final snapshot would drop the log segment the first is still appending to: writes the first
    acknowledged would be gone after its next crash. The second process exits with a clear message instead."""
    first = ShardProcess(tmp_path / "data", extra_args=SHARD_ARGS).start()
    try:
        second = ShardProcess(tmp_path / "data", log_path=tmp_path / "second.log", extra_args=SHARD_ARGS)
        with pytest.raises(RuntimeError, match="in use by another process"):
            second.start(timeout_s=60)
        first.kill()
        ShardProcess(tmp_path / "data", log_path=tmp_path / "third.log", extra_args=SHARD_ARGS).start().stop()
    finally:
        first.kill()


def _live_rows_after_restart(data_dir: Path) -> int:
    """Live rows of a shard started again from `data_dir` (its snapshot and log)."""
    restarted = ShardEngine(ShardConfig(data_dir=data_dir, dimension=DIM))
    restarted.load()
    try:
        return sum(p.live_count for p in restarted.partitions.values())
    finally:
        restarted.close()


def _raising(error: BaseException | type[BaseException]):
    """A stand-in for a disk or memory that fails: raises `error` whatever it is called with."""
    def fail(*args, **kwargs):
        raise error

    return fail


def test_a_snapshot_that_fails_part_way_leaves_no_temporary_directory(tmp_path, monkeypatch):
    """A snapshot failing on a full disk left its .tmp-snap directory until the next restart, keeping its space
    from the log that still holds every write (found by a disk-full chaos run)."""
    engine = ShardEngine(ShardConfig(data_dir=tmp_path, dimension=DIM))
    engine.load()
    engine.upsert(synthetic.SyntheticCatalogue(dim=DIM, clusters=3, seed=2).records(0, 50))

    disk_full = _raising(OSError(28, "No space left on device"))
    monkeypatch.setattr("shard_server.snapshot.SnapshotStore._write_partition", staticmethod(disk_full))
    with pytest.raises(OSError):
        engine.snapshot()
    assert list((tmp_path / "snapshots").glob(".tmp-*")) == []
    monkeypatch.undo()
    engine.snapshot()  # and the next one works
    assert len(list((tmp_path / "snapshots").glob("snap-*"))) == 1
    engine.close()


_SNAPSHOT_ON_A_FULL_DISK = """
import os, sys
from pathlib import Path
from shard_server import synthetic
from shard_server.config import ShardConfig
from shard_server.engine import ShardEngine

disk = Path(sys.argv[1])
engine = ShardEngine(ShardConfig(data_dir=disk / "data", dimension=16, nlist=100000))
engine.load()
catalogue = synthetic.SyntheticCatalogue(dim=16, clusters=10, seed=4)
for start in range(0, 20000, 5000):
    engine.upsert(catalogue.records(start, start + 5000, category="a"))
free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
with open(disk / "filler", "wb") as f:  # the disk full but for 100 kB
    f.write(b"\\xff" * max(0, free - 100_000))
try:
    engine.snapshot()
except OSError as e:
    print("snapshot failed", e.errno)
engine.close(snapshot=True)  # the final snapshot of a graceful stop fails too, and is logged
print("closed")
"""


@pytest.mark.timeout(120)
def test_a_full_disk_during_a_snapshot_is_an_error_not_a_crash(tmp_path):
    """The snapshot wrote its vectors through a memory map of a sparse file: on a full disk that is a SIGBUS, which
    killed the shard, and again on every restart (a disk-fault review). Now the snapshot fails with ENOSPC like
    any write (retried later; the log keeps every write), and a graceful stop still ends cleanly."""
    import subprocess
    import sys

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("needs permission to mount a tmpfs (root)")
    try:
        out = subprocess.run([sys.executable, "-c", _SNAPSHOT_ON_A_FULL_DISK, str(disk)], capture_output=True,
                             text=True, timeout=100)
        assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
        assert out.stdout.split() == ["snapshot", "failed", "28", "closed"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.timeout(60)
async def test_a_failed_fsync_stops_the_shard_process_for_its_supervisor_to_restart(tmp_path, free_port,
                                                                                     monkeypatch):
    """A failed log refuses every write until a restart; a shard that then went on reporting SERVING (liveness
    included) was never restarted, and its shard's ingests failed for good. It stops instead: liveness turns
    NOT_SERVING, the process drains and exits with status 1, and the restart keeps every acknowledged write."""
    import os

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from imgsearch.serving import LIVENESS_SERVICE
    from shard_server.server import _serve

    port = free_port()
    config = ShardConfig(data_dir=tmp_path, port=port, dimension=DIM)
    serving = asyncio.create_task(_serve(config))
    vectors = synthetic.SyntheticCatalogue(dim=DIM, clusters=4, seed=5).vectors(0, 3)
    async with ShardClient(f"127.0.0.1:{port}") as client:
        for _ in range(100):
            try:
                await client.upsert([_record(0, vectors[0])], timeout_s=5)
                break
            except ImgsearchError:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("the shard never took a write")
        real_fsync = os.fsync

        def failing_fsync(fd):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(os, "fsync", failing_fsync)
        with pytest.raises(ImgsearchError, match="fsync failed"):
            await client.upsert([_record(1, vectors[1])], timeout_s=5)
        monkeypatch.setattr(os, "fsync", real_fsync)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                liveness = (await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE), timeout=2)).status
            except grpc.aio.AioRpcError as exc:  # already stopped
                liveness = exc.code()
        assert liveness != health_pb2.HealthCheckResponse.SERVING
    assert await asyncio.wait_for(serving, 30) == 1

    restarted = ShardEngine(config)
    restarted.load()
    assert [r.image_id for r in restarted.get(["img-0"])] == ["img-0"]
    restarted.wal.close()


def _record(i: int, vector: np.ndarray):
    from shard_server.types import Record

    return Record(image_id=f"img-{i}", product_id=f"p{i}", category="c", vector=vector)


@pytest.mark.timeout(240)
def test_sigterm_during_the_log_replay_stops_the_shard_at_once(tmp_path):
    """A stop during a long replay waited for the whole replay (the manifests allow 15 min of it against a
    180 s grace period, so the kubelet's SIGKILL came first), and the engine was closed under the loading thread.
    Now the replay stops at its next record, the process exits 0, and the next start loads everything."""
    data_dir = tmp_path / "shard"
    config = ShardConfig(data_dir=data_dir, dimension=DIM, snapshot_wal_bytes=1 << 40)
    engine = ShardEngine(config)
    engine.load()
    catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=30, seed=4)
    batches, batch = 240, 500  # ~120k vectors: a few seconds of replay on the 2-core box
    for b in range(batches):
        engine.upsert(catalogue.records(b * batch, (b + 1) * batch, category="c"))
    engine.wal.close()  # no snapshot: everything is in the log

    shard = ShardProcess(data_dir, extra_args=("--dimension", str(DIM), "--snapshot-wal-bytes", str(1 << 40)))
    shard.start(wait_serving=False)
    time.sleep(0.3)
    t0 = time.monotonic()
    assert shard.stop(timeout_s=120) == 0
    stopped_after_s = time.monotonic() - t0
    log_text = shard.log_text()
    assert "stopped while replaying the write-ahead log" in log_text, log_text[-3000:]
    assert "shard loaded" not in log_text

    shard.start(wait_serving=True)  # loads all of it: the interrupted start changed nothing on disk
    try:
        full_load_s = float(re.search(r"replayed in ([0-9.]+)s", shard.log_text()).group(1))
        assert stopped_after_s < full_load_s, (stopped_after_s, full_load_s)
        total = sum(c.vectors for c in asyncio.run(_stats(shard.address)).categories)
        assert total == batches * batch
    finally:
        shard.stop()


async def _stats(address: str):
    async with ShardClient(address) as client:
        return await client.stats(timeout_s=10)


@pytest.mark.timeout(120)
async def test_an_upsert_stream_cut_short_by_its_client_writes_nothing(tmp_path):
    """grpc.aio ends the server's request iterator alike for a half-close and for a client's cancel or deadline,
    so streams cut short were written (2 of 5 cancelled streams in the review). Only a stream whose last message
    sets commit is written now; one that ends without it is refused, even when half-closed."""
    from imgsearch.v1 import shard_pb2_grpc
    from shard_server.server import start_shard_server

    handle = await start_shard_server(ShardConfig(data_dir=tmp_path / "shard", dimension=DIM))
    vectors = synthetic.SyntheticCatalogue(dim=DIM, clusters=4, seed=9).vectors(0, 60)

    def message(first: int, count: int, **fields) -> shard_pb2.UpsertStreamRequest:
        return shard_pb2.UpsertStreamRequest(
            records=[convert.record_to_proto(_record(i, vectors[i])) for i in range(first, first + count)], **fields)

    cut_ids = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            stub = shard_pb2_grpc.ShardServiceStub(channel)
            for trial in range(5):
                for how in ("cancel", "deadline"):
                    first = trial * 10 + (0 if how == "cancel" else 5)
                    call = stub.UpsertStream(timeout=0.5 if how == "deadline" else 30)
                    await call.write(message(first, 2))
                    await call.write(message(first + 2, 1))
                    await asyncio.sleep(0.2 if how == "cancel" else 0.8)  # never half-closed
                    if how == "cancel":
                        call.cancel()
                    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                        await call
                    cut_ids += [f"img-{i}" for i in range(first, first + 3)]
            # Half-closed, but without the commit message (a client older than the field): refused.
            call = stub.UpsertStream(timeout=10)
            await call.write(message(50, 2))
            await call.done_writing()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "commit" in refused.value.details()
            cut_ids += ["img-50", "img-51"]
        async with ShardClient(f"127.0.0.1:{handle.port}") as client:
            await asyncio.sleep(0.5)  # any write still on its way
            assert await client.get(cut_ids, timeout_s=10) == []
            assert await client.upsert_stream([_record(55, vectors[55])], timeout_s=10) == 1
            assert [r.image_id for r in await client.get(["img-55"], timeout_s=10)] == ["img-55"]
    finally:
        await handle.stop(snapshot=False)


def test_a_stop_during_the_snapshot_load_is_taken_at_once(tmp_path):
    """Only the log replay heeded a stop; checking and loading a snapshot of gigabytes ran to its end first. The
    load now stops between MiB read and between partitions, and the next start loads everything."""
    from shard_server.errors import LoadInterruptedError

    config = ShardConfig(data_dir=tmp_path, dimension=DIM)
    engine = ShardEngine(config)
    engine.load()
    engine.upsert(synthetic.SyntheticCatalogue(dim=DIM, clusters=4, seed=6).records(0, 200, category="c"))
    engine.close(snapshot=True)
    stopped = ShardEngine(config)
    stopped.interrupt_load()
    with pytest.raises(LoadInterruptedError, match="snapshot"):
        stopped.load()
    restarted = ShardEngine(config)
    restarted.load()
    assert sum(c.vectors for c in restarted.stats().categories) == 200
    restarted.close()


def test_a_data_dir_that_cannot_be_used_stops_the_shard_with_a_clear_message(tmp_path):
    """A regular file where the data dir should be (or a read-only filesystem) ended the shard with a
    FileExistsError traceback (review); it is a one-line message now, as for a data dir in use."""
    from shard_server.server import _lock_data_dir

    in_the_way = tmp_path / "data"
    in_the_way.write_text("not a directory")
    with pytest.raises(SystemExit, match=r"cannot use data dir .*data: File exists"):
        _lock_data_dir(ShardConfig(data_dir=in_the_way, dimension=DIM))


@pytest.mark.timeout(60)
def test_failed_snapshots_are_tried_again_later_and_later(tmp_path):
    """After an index swap (or with a big log) a failed snapshot was due again at once: on a full disk the shard
    wrote the whole snapshot, and opened a new log segment, every second (review). Now 2 s, 4 s, ... later."""
    engine = ShardEngine(ShardConfig(data_dir=tmp_path, dimension=DIM))
    engine.load()
    tries = []

    def failing_snapshot():
        tries.append(time.monotonic())
        raise OSError(28, "No space left on device")

    engine.snapshot = failing_snapshot
    engine._swaps_since_snapshot = 1  # a rebuilt index waits for its snapshot: always due
    engine.start_background()
    time.sleep(5.5)
    engine.close()
    assert len(tries) == 2, tries  # at about 1 s and 3 s (every second before: 5)
    assert tries[1] - tries[0] >= 1.9


@pytest.mark.parametrize("vector_dtype", ["float32", "float16"])
def test_writes_go_on_while_a_snapshot_is_written_and_survive_a_restart(tmp_path, monkeypatch, vector_dtype):
    """Writes waited for the whole dump of a snapshot (25 s with 5,000 categories, review): the partitions are now
    captured while writes wait, and written out while they go on. Rows written meanwhile stay searchable after
    the snapshot's vectors are mapped in, and a restart (the snapshot, then the log after it) holds every write
    once."""
    import threading

    from shard_server.snapshot import SnapshotStore
    from shard_server.types import Exactness, SearchQuery

    config = ShardConfig(data_dir=tmp_path, dimension=DIM, vector_dtype=vector_dtype)
    engine = ShardEngine(config)
    engine.load()
    catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=3, seed=4)
    engine.upsert(catalogue.records(0, 200))
    writing, release = threading.Event(), threading.Event()
    real_write = SnapshotStore._write_partition

    def slow_write(*args, **kwargs):
        writing.set()
        assert release.wait(30)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(SnapshotStore, "_write_partition", staticmethod(slow_write))
    snapshot = threading.Thread(target=engine.snapshot)
    snapshot.start()
    assert writing.wait(30)
    later = list(catalogue.records(200, 260))
    t0 = time.monotonic()
    engine.upsert(later)  # while the snapshot is being written
    engine.delete([later[0].image_id, "img-00000003"])
    waited_s = time.monotonic() - t0
    release.set()
    snapshot.join(30)
    assert waited_s < 5
    monkeypatch.undo()
    for record in later[1:5]:
        [hit] = engine.search(SearchQuery(vector=record.vector, top_k=1, exactness=Exactness.EXACT)).hits
        assert hit.image_id == record.image_id and hit.score > 0.99
    held = {r.image_id for r in engine.get([r.image_id for r in [*catalogue.records(0, 260)]])}
    engine.close()
    restarted = ShardEngine(config)
    restarted.load()
    again = restarted.get([r.image_id for r in catalogue.records(0, 260)])
    assert {r.image_id for r in again} == held and len(again) == 258
    assert later[0].image_id not in held and "img-00000003" not in held
    assert sum(p.live_count for p in restarted.partitions.values()) == 258
    restarted.close()


def test_a_snapshot_whose_files_failed_is_taken_again(tmp_path, monkeypatch):
    """The writes a snapshot covers were forgotten when it captured them: after its files failed (a full disk)
    no later snapshot was due, close() took none, and every start replayed the log (review)."""
    engine = ShardEngine(ShardConfig(data_dir=tmp_path, dimension=DIM))
    engine.load()
    engine.upsert(synthetic.SyntheticCatalogue(dim=DIM, clusters=3, seed=2).records(0, 50))

    disk_full = _raising(OSError(28, "No space left on device"))
    monkeypatch.setattr("shard_server.snapshot.SnapshotStore._write_partition", staticmethod(disk_full))
    for _ in range(3):
        engine.upsert(synthetic.SyntheticCatalogue(dim=DIM, clusters=3, seed=3).records(50, 60))
        with pytest.raises(OSError):
            engine.snapshot()
        # the tails the failed snapshots froze are one part (VectorStore.merge_frozen)
        assert all(len(p.vectors._parts) <= 1 for p in engine.partitions.values())
    monkeypatch.undo()
    engine.close(snapshot=True)
    assert len(list((tmp_path / "snapshots").glob("snap-*"))) == 1
    restarted = ShardEngine(ShardConfig(data_dir=tmp_path, dimension=DIM))
    restarted.load()
    assert restarted._writes_since_snapshot == 0 and sum(p.live_count for p in restarted.partitions.values()) == 60
    restarted.close()


def test_a_snapshot_whose_capture_failed_is_taken_again(tmp_path, monkeypatch):
    """The count of writes to snapshot was cleared before the capture: one that failed (out of memory serialising
    an index) left nothing to snapshot, and close() took none (review)."""
    from shard_server.snapshot import SnapshotStore

    engine = ShardEngine(ShardConfig(data_dir=tmp_path, dimension=DIM))
    engine.load()
    engine.upsert(synthetic.SyntheticCatalogue(dim=DIM, clusters=3, seed=2).records(0, 50))

    out_of_memory = _raising(MemoryError)
    monkeypatch.setattr(SnapshotStore, "capture", staticmethod(out_of_memory))
    with pytest.raises(MemoryError):
        engine.snapshot()
    monkeypatch.undo()
    engine.close(snapshot=True)
    assert len(list((tmp_path / "snapshots").glob("snap-*"))) == 1


def test_a_snapshot_whose_log_drop_fails_still_maps_its_vectors(tmp_path, monkeypatch):
    """Nothing after the log's drop ran when it failed (EIO): the vectors stayed unmapped, a part more at each
    snapshot, and older snapshots stayed (review)."""
    from shard_server.wal import WriteAheadLog

    engine = ShardEngine(ShardConfig(data_dir=tmp_path, dimension=DIM))
    engine.load()
    catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=3, seed=6)

    io_error = _raising(OSError(5, "Input/output error"))
    monkeypatch.setattr(WriteAheadLog, "drop_through", io_error)
    for lo in (0, 20, 40):
        engine.upsert(catalogue.records(lo, lo + 20))
        with pytest.raises(OSError, match="Input/output"):
            engine.snapshot()
        assert all(len(p.vectors._parts) == 1 and p.vectors._mapped == [True] for p in engine.partitions.values())
        assert len(list((tmp_path / "snapshots").glob("snap-*"))) == 1
    monkeypatch.undo()
    engine.close(snapshot=True)
    assert _live_rows_after_restart(tmp_path) == 60


def test_a_snapshot_that_fails_after_its_files_are_written_still_counts(tmp_path, monkeypatch):
    """Mapping the written vectors failed (ENOMEM) and nothing after it ran: the log and every older snapshot
    stayed, one more full copy at each retry, and the frozen vectors piled up as parts (review). Once its files
    are in place the snapshot is durable: the log is dropped, older snapshots pruned, the vectors stay in memory
    as one part. And a failure while merging them does not hide the snapshot's own error (review)."""
    from shard_server.snapshot import SnapshotStore
    from shard_server.vectors import VectorStore

    engine = ShardEngine(ShardConfig(data_dir=tmp_path, dimension=DIM))
    engine.load()
    catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=3, seed=5)
    engine.upsert(catalogue.records(0, 50))
    engine.snapshot()

    no_memory = _raising(OSError(12, "Cannot allocate memory"))
    monkeypatch.setattr(SnapshotStore, "rebase_vectors", no_memory)
    for lo in (50, 60, 70):
        engine.upsert(catalogue.records(lo, lo + 10))
        with pytest.raises(OSError, match="Cannot allocate"):  # raised once the log is dropped and old ones pruned
            engine.snapshot()
        assert engine._swaps_since_snapshot == 1  # tried again (after the loop's backoff)
    assert len(list((tmp_path / "snapshots").glob("snap-*"))) == 1
    assert len(list((tmp_path / "wal").glob("*.wal2"))) == 1
    assert all(len(p.vectors._parts) <= 2 for p in engine.partitions.values())  # the mapped file, one frozen part
    monkeypatch.undo()

    disk_full = _raising(OSError(28, "No space left on device"))
    def merge_fails(self, lock):
        raise MemoryError

    monkeypatch.setattr(SnapshotStore, "_write_partition", staticmethod(disk_full))
    monkeypatch.setattr(VectorStore, "merge_frozen", merge_fails)
    with pytest.raises(OSError, match="No space left"):
        engine.snapshot()
    monkeypatch.undo()
    engine.close(snapshot=True)
    assert _live_rows_after_restart(tmp_path) == 80
