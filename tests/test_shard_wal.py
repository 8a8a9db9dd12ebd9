"""Write-ahead log: concurrent writers share fsyncs (group commit), and writes are applied in log order so a
replay reproduces exactly the live state."""

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from shard_server import synthetic
from shard_server.config import ShardConfig
from shard_server.engine import ShardEngine
from shard_server.types import Exactness, SearchQuery
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
