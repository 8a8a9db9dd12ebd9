"""Write-ahead log: concurrent writers share fsyncs (group commit), writes are applied in log order so a
replay reproduces exactly the live state, and a failed write, a failed fsync or a zero-filled tail never costs an
acknowledged write."""

import errno
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest

from imgsearch.v1 import shard_pb2
from shard_server import convert, synthetic
from shard_server import engine as engine_module
from shard_server import wal as wal_module
from shard_server.config import ShardConfig
from shard_server.engine import ShardEngine
from shard_server.errors import RequestTooLargeError, WalError
from shard_server.types import Exactness, Record, SearchQuery
from shard_server.wal import WriteAheadLog


def test_group_commit_shares_fsyncs(tmp_path, monkeypatch):
    real_fsync = os.fsync
    calls = []
    gate = threading.Lock()

    def slow_fsync(fd):  # a slow disk: writers pile up behind the fsync in progress
        with gate:
            calls.append(fd)
        threading.Event().wait(0.01)
        real_fsync(fd)

    wal = WriteAheadLog(tmp_path)
    wal.open()
    monkeypatch.setattr(os, "fsync", slow_fsync)
    payloads = [f"record-{i}".encode() for i in range(200)]
    with ThreadPoolExecutor(16) as pool:
        seqs = list(pool.map(wal.append, payloads))
    monkeypatch.setattr(os, "fsync", real_fsync)
    wal.close()
    assert sorted(seqs) == list(range(1, 201))
    assert len(calls) < 100, f"{len(calls)} fsyncs for 200 concurrent appends: no group commit"
    assert sorted(f.read() for f in WriteAheadLog(tmp_path).replay(0)) == sorted(payloads)


def test_replay_reproduces_concurrent_writes_exactly(tmp_path):
    dim = 16
    catalogue = synthetic.SyntheticCatalogue(dim=dim, clusters=4, seed=1)
    config = ShardConfig(data_dir=tmp_path, dimension=dim, write_threads=8)
    engine = ShardEngine(config)
    engine.load()
    base = catalogue.records(0, 50)

    def writer(w: int) -> None:
        rng = np.random.default_rng(w)
        for step in range(20):
            # Every writer rewrites the same ids with its own vectors and categories, and deletes some.
            batch = [replace(r, vector=rng.standard_normal(dim).astype(np.float32), category=f"c{(w + step) % 3}")
                     for r in base[(w * 7 + step) % 40:][:10]]
            engine.upsert(batch)
            if step % 5 == 0:
                engine.delete([base[(w + step) % 50].image_id])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(writer, range(8)))

    def state(e: ShardEngine) -> dict:
        out = {}
        for r in base:
            located = e.id_map.get(r.image_id)
            if located is None:
                continue
            hits = e.search(SearchQuery(vector=np.ones(dim, np.float32), top_k=60, exactness=Exactness.EXACT)).hits
            out[r.image_id] = next((h.category, round(h.score, 5)) for h in hits if h.image_id == r.image_id)
        return out

    live = state(engine)
    engine.close()  # no snapshot: the restart below replays the whole log
    replayed = ShardEngine(config)
    replayed.load()
    assert state(replayed) == live
    assert {c.category: c.vectors for c in replayed.stats().categories} == {
        c.category: c.vectors for c in engine.stats().categories}
    replayed.close()


def test_a_payload_in_parts_is_one_frame_identical_to_the_joined_payload(tmp_path):
    parts = [b"op", b"", b"first-message" * 1000, b"second-message"]
    in_parts, joined = WriteAheadLog(tmp_path / "parts"), WriteAheadLog(tmp_path / "joined")
    for wal, payload in ((in_parts, parts), (joined, b"".join(parts))):
        wal.open()
        wal.append(payload)
        wal.append(b"next")
        wal.close()
    segment = min((tmp_path / "parts").iterdir()).name
    assert (tmp_path / "parts" / segment).read_bytes() == (tmp_path / "joined" / segment).read_bytes()
    assert [f.read() for f in WriteAheadLog(tmp_path / "parts").replay(0)] == [b"".join(parts), b"next"]


def _record(i: int, dim: int = 8, category: str = "c"):
    v = np.zeros(dim, np.float32)
    v[i % dim], v[(i + 1) % dim] = 1.0, 0.5
    return Record(image_id=f"img-{i}", product_id=f"p{i}", category=category, vector=v)


def test_a_write_that_fails_part_way_is_cut_off_and_later_writes_survive(tmp_path, monkeypatch):
    """A full disk: a short write, then ENOSPC. The partial frame must not stay in the segment, or replay reads
    the later (acknowledged) frames as its payload, finds a bad CRC and cuts them all off."""
    config = ShardConfig(data_dir=tmp_path, dimension=8)
    engine = ShardEngine(config)
    engine.load()
    engine.upsert([_record(0)])
    real_write = os.write
    disk_full = {"on": True}

    def short_then_enospc(fd, data):
        if disk_full["on"]:
            if len(data) > 4:
                return real_write(fd, bytes(data[:4]))
            disk_full["on"] = False
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(wal_module.os, "write", short_then_enospc)
    with pytest.raises(WalError) as refused:
        engine.upsert([_record(1)])  # refused: the caller knows it failed
    # and why: a full disk, not a fault of the shard (it answered INTERNAL, review)
    assert refused.value.code.name == "RESOURCE_EXHAUSTED" and "disk is full" in str(refused.value)
    monkeypatch.setattr(wal_module.os, "write", real_write)  # space was freed
    engine.upsert([_record(2)])
    engine.delete(["img-0"])
    engine.wal.close()  # no snapshot: the restart replays the log

    restarted = ShardEngine(config)
    restarted.load()
    assert [r.image_id for r in restarted.get(["img-0", "img-1", "img-2"])] == ["img-2"]


def test_a_failed_fsync_fails_the_log_for_good(tmp_path, monkeypatch):
    """After a failed fsync the kernel may have dropped the pages it could not write; a later fsync that succeeds
    proves nothing about them, so the log refuses every later write (fail-stop) and a restart recovers."""
    config = ShardConfig(data_dir=tmp_path, dimension=8)
    engine = ShardEngine(config)
    engine.load()
    engine.upsert([_record(0)])
    real_fsync = os.fsync

    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(WalError, match="fsync failed"):
        engine.upsert([_record(1)])
    monkeypatch.setattr(os, "fsync", real_fsync)  # the disk answers again: the log still refuses
    with pytest.raises(WalError, match="refused until the shard restarts") as refused:
        engine.upsert([_record(2)])
    assert refused.value.code.name == "UNAVAILABLE"  # the shard is stopping for a restart: try again / elsewhere
    assert [r.image_id for r in engine.get(["img-0", "img-1", "img-2"])] == ["img-0"]
    engine.wal.close()

    restarted = ShardEngine(config)
    restarted.load()  # img-1 may or may not have reached the disk; its caller was told it failed
    assert {r.image_id for r in restarted.get(["img-0", "img-2"])} == {"img-0"}
    restarted.upsert([_record(3)])
    assert [r.image_id for r in restarted.get(["img-3"])] == ["img-3"]


def test_a_zero_filled_tail_is_cut_like_a_torn_one(tmp_path):
    """A power cut can leave a segment extended with zeros that never held data; an all-zero header reads as a
    valid empty frame (CRC32 of nothing is 0), but no record is empty: the tail is cut and the shard starts."""
    config = ShardConfig(data_dir=tmp_path, dimension=8)
    engine = ShardEngine(config)
    engine.load()
    engine.upsert([_record(0)])
    engine.wal.close()
    segment = engine.wal.segments()[-1]
    written = segment.stat().st_size
    with open(segment, "ab") as f:
        f.write(b"\0" * 4096)
    restarted = ShardEngine(config)
    restarted.load()
    assert [r.image_id for r in restarted.get(["img-0"])] == ["img-0"]
    assert segment.stat().st_size == written


def test_a_stream_too_big_for_one_log_record_is_refused_as_too_large(tmp_path, monkeypatch):
    """A stream just under max_stream_bytes (which may be set up to the log's 32-bit frame limit) still needs a
    frame header: over the limit it is RESOURCE_EXHAUSTED for the caller, not an internal log error."""
    engine = ShardEngine(ShardConfig(data_dir=tmp_path, dimension=8))
    engine.load()
    encoded = shard_pb2.UpsertRequest(records=[convert.record_to_proto(_record(0))]).SerializeToString()
    monkeypatch.setattr(engine_module, "MAX_FRAME_BYTES", len(encoded) + 5)  # no room for the JSON header
    with pytest.raises(RequestTooLargeError):
        engine.upsert_encoded([encoded])
    assert engine.get(["img-0"]) == []


def test_a_failed_fsync_in_the_final_snapshot_still_closes_the_log(tmp_path, monkeypatch):
    """close() caught only OSError around the final snapshot: an fsync failure there (a WalError from the log's
    rotation) escaped, left the log open and ended a graceful stop with a traceback."""
    config = ShardConfig(data_dir=tmp_path, dimension=8)
    engine = ShardEngine(config)
    engine.load()
    engine.upsert([_record(0)])

    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    engine.close(snapshot=True)
    assert engine.wal._fd is None
