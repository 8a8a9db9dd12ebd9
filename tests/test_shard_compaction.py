"""Re-written and deleted rows: a partition is compacted once they are as many as its live rows (a catalogue
re-ingested to update its prices left one dead row per image per ingest, forever), with writes made during the
compaction kept; and an image re-written in place or moved between categories is never missing from a search
while the write is applied (reviews of 2026-12-06)."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
from prometheus_client import REGISTRY

from shard_server.config import ShardConfig
from shard_server.engine import ShardEngine
from shard_server.partition import COMPACT_MIN_DEAD_ROWS, Partition
from shard_server.types import Condition, Exactness, Filter, Range, Record, SearchQuery

DIM = 16


def _vectors(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _records(ids: range, vectors: np.ndarray, price: float, category: str = "a") -> list[Record]:
    return [Record(image_id=f"img-{i}", product_id=f"p-{i % 50}", category=category, vector=vectors[i],
                   attributes={"brand": f"brand-{i % 7}", "price": price + i, "in_stock": i % 3 == 0})
            for i in ids]


def _engine(path, **config) -> ShardEngine:
    engine = ShardEngine(ShardConfig(data_dir=path, dimension=DIM, **config))
    engine.load()
    return engine


def _held(engine: ShardEngine, image_ids: list[str]) -> list[tuple]:
    return [(r.image_id, r.product_id, r.category, r.vector.tolist(), r.attributes, r.version)
            for r in engine.get(image_ids)]


def _compactions() -> float:
    return REGISTRY.get_sample_value("imgsearch_shard_compactions_total", {"event": "completed"}) or 0.0


def _answers(engine: ShardEngine, queries: np.ndarray) -> list[list[tuple[str, float, dict, int]]]:
    """Every query's exact top-20, with a filter, as (id, score, attributes, version)."""
    in_price_range = Filter(all_of=(Condition(field="price", predicate=Range(min=2000.0, max=2600.0)),))
    out = []
    for q in queries:
        for flt in (Filter(), in_price_range):
            query = SearchQuery(vector=q, top_k=20, exactness=Exactness.EXACT, filter=flt)
            out.append([(h.image_id, h.score, dict(h.attributes), h.version) for h in engine.search(query).hits])
    return out


@pytest.mark.parametrize("trained", [False, True], ids=["exact", "ivf"])
def test_a_re_ingested_catalogue_is_compacted_and_answers_as_before(tmp_path, trained):
    """Three ingests of the same 2,000 images leave 6,000 rows, 4,000 of them dead: the training round compacts
    the partition to 2,000 rows, and every search, get and write after it answers as before, and after a
    restart."""
    config = {"nlist": 16, "index_factory": "IVF{nlist},PQ8x4fs"} if trained else {}
    engine = _engine(tmp_path, **config)
    vectors = _vectors(2_000, 1)
    engine.upsert(_records(range(2_000), vectors, 1000.0))
    engine.train_pending()
    assert (engine.partitions["a"].ivf is not None) == trained
    for price in (2000.0, 3000.0):
        engine.upsert(_records(range(2_000), vectors, price))
    engine.delete(["img-7", "img-8"])
    queries = _vectors(8, 2)
    before = _answers(engine, queries)
    records_before = _held(engine, ["img-5", "img-1999"])
    compacted_before = _compactions()
    engine.train_pending()
    assert _compactions() == compacted_before + 1
    partition = engine.partitions["a"]
    assert len(partition.image_ids) == partition.live_count == 1_998
    assert (partition.ivf is not None) == trained and (not trained or partition.ivf.ntotal == 1_998)
    assert _answers(engine, queries) == before
    assert _held(engine, ["img-5", "img-1999"]) == records_before and engine.get(["img-7"]) == []
    # the id map points at the new rows: writes after the compaction replace and delete the right ones
    engine.upsert(_records(range(5, 6), vectors, 9000.0))
    engine.delete(["img-1999"])
    assert [r.attributes["price"] for r in engine.get(["img-5"])] == [9005.0] and engine.get(["img-1999"]) == []
    assert partition.live_count == 1_997
    after = _answers(engine, queries)
    engine.close(snapshot=True)
    restarted = _engine(tmp_path, **config)
    assert _answers(restarted, queries) == after
    # the snapshot holds the compacted rows and the two that died since
    assert (len(restarted.partitions["a"].image_ids), restarted.partitions["a"].live_count) == (1_999, 1_997)
    restarted.close()


def test_writes_made_while_a_partition_is_compacted_are_kept(tmp_path, monkeypatch):
    """The copy is made while writes go on: rows written, re-written and deleted after the copy are caught up
    before the swap."""
    engine = _engine(tmp_path)
    vectors = _vectors(3_000, 3)
    engine.upsert(_records(range(2_000), vectors, 1000.0))
    engine.upsert(_records(range(2_000), vectors, 2000.0))
    real_copy = Partition.compacted_copy

    def copy_then_write(self):
        copied = real_copy(self)
        writer = threading.Thread(target=lambda: (
            engine.upsert(_records(range(2_000, 3_000), vectors, 5000.0)),  # new images
            engine.upsert(_records(range(10, 20), vectors, 7000.0)),  # copied rows re-written
            engine.delete(["img-30", "img-2500"])))  # a copied row and a caught-up one deleted
        writer.start()
        writer.join()
        return copied

    monkeypatch.setattr(Partition, "compacted_copy", copy_then_write)
    engine.compact(engine.partitions["a"])
    partition = engine.partitions["a"]
    assert partition.live_count == 2_998
    held = {r.image_id: r.attributes["price"] for r in engine.get([f"img-{i}" for i in range(3_000)])}
    assert len(held) == 2_998 and "img-30" not in held and "img-2500" not in held
    assert held["img-15"] == 7015.0 and held["img-2001"] == 7001.0 and held["img-100"] == 2100.0
    for i in (0, 15, 2001, 2999):
        [hit] = engine.search(SearchQuery(vector=vectors[i], top_k=1, exactness=Exactness.EXACT)).hits
        assert hit.image_id == f"img-{i}"
    # dead since the copy, in the copy: the 10 re-written copied rows and img-30 (img-2500 died before it was added)
    assert len(partition.image_ids) - partition.live_count == 11


def test_compaction_waits_for_enough_dead_rows(tmp_path):
    engine = _engine(tmp_path)
    vectors = _vectors(COMPACT_MIN_DEAD_ROWS + 500, 4)
    engine.upsert(_records(range(len(vectors)), vectors, 1.0))
    engine.upsert(_records(range(COMPACT_MIN_DEAD_ROWS - 1), vectors, 2.0))  # 999 dead of 2,499 rows
    assert not engine.partitions["a"].compaction_due()
    engine.delete(["img-1200", "img-1201"])  # 1,001 dead, 1,498 live
    assert not engine.partitions["a"].compaction_due()
    engine.upsert(_records(range(500), vectors, 3.0))  # 1,501 dead, 1,498 live
    assert engine.partitions["a"].compaction_due()


def _search_after_each(engine: ShardEngine, monkeypatch, method: str, image_id: str, found: list[bool]) -> None:
    """Appends to `found` whether `image_id` is the top hit of a search made right after each call of
    Partition.`method`."""
    real = getattr(Partition, method)

    def then_search(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        hits = engine.search(SearchQuery(vector=np.ones(DIM, np.float32), top_k=1)).hits
        found.append(bool(hits) and hits[0].image_id == image_id)
        return out

    monkeypatch.setattr(Partition, method, then_search)


def test_an_image_written_again_in_its_category_is_never_missing_from_a_search(tmp_path, monkeypatch):
    """Its old row was removed, then its new row added, each under its own lock: a search between the two found
    neither (1 of 25,789 searches over gRPC while an image's price was updated, review)."""
    engine = _engine(tmp_path)
    x = np.ones(DIM, np.float32)
    engine.upsert([Record(image_id="x", product_id="px", category="a", vector=x)])
    engine.upsert(_records(range(100), -_vectors(100, 5) ** 2, 1.0))
    found: list[bool] = []
    for method in ("delete", "append"):
        _search_after_each(engine, monkeypatch, method, "x", found)
    engine.upsert([Record(image_id="x", product_id="px", category="a", vector=x, attributes={"price": 2.0})])
    assert found and all(found)
    assert [h.attributes for h in engine.search(SearchQuery(vector=x, top_k=1)).hits] == [{"price": 2.0}]


def _moving_after_reading(engine: ShardEngine, monkeypatch, category: str, image_id: str, destination,
                          *, once: bool = True) -> list[str]:
    """Patches Partition.search: right after a search reads `category`, a writer thread moves `image_id`, whole, to
    `destination(its category)`. With `once`, only while the returned list of moves is empty (clear it to move
    again); otherwise at every such read."""
    real_search = Partition.search
    moves: list[str] = []

    def search_then_move(self, *args, **kwargs):
        hits = real_search(self, *args, **kwargs)
        if self.name == category and not (once and moves):
            [held] = engine.get([image_id])
            moves.append(destination(held.category))
            writer = threading.Thread(target=engine.upsert, args=([Record(
                image_id=image_id, product_id=held.product_id, category=moves[-1], vector=held.vector)],))
            writer.start()
            writer.join()
        return hits

    monkeypatch.setattr(Partition, "search", search_then_move)
    return moves


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")])
def test_an_image_moved_between_the_searched_categories_is_never_missing(tmp_path, monkeypatch, order):
    """A search reads its categories one at a time: one that read the image's new category before the move and
    its old one after missed it (2.6 % of searches while an image moved back and forth, review)."""
    engine = _engine(tmp_path)
    x = np.ones(DIM, np.float32)
    engine.upsert([Record(image_id="x", product_id="px", category="a", vector=x),
                   Record(image_id="y", product_id="py", category="b", vector=-x)])
    moves = _moving_after_reading(engine, monkeypatch, order[0], "x", lambda held_in: "b" if held_in == "a" else "a")
    for _ in range(2):  # a to b, then b to a
        moves.clear()
        hits = engine.search(SearchQuery(vector=x, top_k=1, categories=order)).hits
        assert moves and [h.image_id for h in hits] == ["x"]


def test_gets_during_compactions_find_every_image(tmp_path):
    """`get` reads the id map without a lock: a get during a re-write found the image's old row dropped and its new
    one not yet in the id map (a missing image), and while a compaction renumbered a partition's rows in it, a get
    could read a new row number in the old partition (another image's row, or past its end)."""
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads interleave at every few bytecodes
    try:
        engine = _engine(tmp_path)
        vectors = _vectors(1_500, 6)
        engine.upsert(_records(range(1_500), vectors, 1.0))
        wanted = [f"img-{i}" for i in range(0, 1_500, 7)]
        stop, wrong = threading.Event(), []

        def getter():
            while not stop.is_set():
                held = [r.image_id for r in engine.get(wanted)]
                if held != wanted:
                    wrong.append(len(held))

        thread = threading.Thread(target=getter)
        thread.start()
        try:
            for price in range(2, 8):
                engine.upsert(_records(range(1_500), vectors, float(price)))
                engine.compact(engine.partitions["a"])
        finally:
            stop.set()
            thread.join()
        assert wrong == []
    finally:
        sys.setswitchinterval(switch)


def test_a_compaction_copies_rows_without_holding_the_partitions_lock_while_it_indexes_them(tmp_path, monkeypatch):
    """The copy encoded each chunk into its IVF index under the source partition's read lock: a write to the
    partition waited 0.3 s for it, every other write behind that one, and new searches behind the writer
    (review). The source's lock is free while the copy adds what it took."""
    from shard_server.attributes import AttributeColumns

    engine = _engine(tmp_path, nlist=16, index_factory="IVF{nlist},PQ8x4fs")
    vectors = _vectors(2_000, 7)
    engine.upsert(_records(range(2_000), vectors, 1.0))
    engine.train_pending()
    engine.upsert(_records(range(2_000), vectors, 2.0))
    source = engine.partitions["a"]
    real_extend = AttributeColumns.extend_taken
    lock_free = []

    def extend_while_probing(self, taken):
        acquired = threading.Event()

        def take_the_write_lock():
            with source.lock.write():
                acquired.set()

        writer = threading.Thread(target=take_the_write_lock)
        writer.start()
        lock_free.append(acquired.wait(2))
        writer.join()
        return real_extend(self, taken)

    monkeypatch.setattr(AttributeColumns, "extend_taken", extend_while_probing)
    engine.compact(source)
    assert lock_free and all(lock_free)
    assert engine.partitions["a"].live_count == len(engine.partitions["a"].image_ids) == 2_000


def test_a_search_is_not_done_again_for_moves_between_other_categories(tmp_path, monkeypatch):
    """One shared move counter made every search over several categories run again while images moved between
    two others (1.4 passes a search, review)."""
    engine = _engine(tmp_path)
    x = np.ones(DIM, np.float32)
    engine.upsert([Record(image_id="x", product_id="px", category="a", vector=x),
                   Record(image_id="y", product_id="py", category="b", vector=-x),
                   Record(image_id="z", product_id="pz", category="c", vector=x)])
    passes = _moving_after_reading(engine, monkeypatch, "a", "z", lambda held_in: "d" if held_in == "c" else "c",
                                   once=False)
    hits = engine.search(SearchQuery(vector=x, top_k=1, categories=("a", "b"))).hits
    assert [h.image_id for h in hits] == ["x"] and len(passes) == 1


def test_a_bulk_write_during_a_compaction_is_caught_up_before_writes_are_stopped(tmp_path, monkeypatch):
    """A bulk write holds the apply condition for its whole length: one that started during a compaction was
    caught up whole in the last catch-up, which every write waits for (20,000 rows, review)."""
    from imgsearch.v1 import shard_pb2
    from shard_server import convert
    from shard_server.engine import CATCH_UP_ROWS

    engine = _engine(tmp_path)
    vectors = _vectors(12_000, 8)
    engine.upsert(_records(range(2_000), vectors, 1.0))
    engine.upsert(_records(range(2_000), vectors, 2.0))
    bulk = [shard_pb2.UpsertStreamRequest(records=[convert.record_to_proto(r) for r in
                                                   _records(range(lo, lo + 1_000), vectors, 3.0)]).SerializeToString()
            for lo in range(2_000, 12_000, 1_000)]
    real_copy, real_catch_up = Partition.compacted_copy, Partition.catch_up
    writer = threading.Thread(target=engine.upsert_encoded, args=(bulk,))
    last_catch_up = []

    def copy_then_bulk_write(self):
        copied = real_copy(self)
        writer.start()
        while not engine._bulk_write_applying.is_set() and writer.is_alive():
            pass
        return copied

    def catch_up(self, source, copied_from, *, final):
        caught = real_catch_up(self, source, copied_from, final=final)
        if final:
            last_catch_up.append(len(caught) - len(copied_from))
        return caught

    monkeypatch.setattr(Partition, "compacted_copy", copy_then_bulk_write)
    monkeypatch.setattr(Partition, "catch_up", catch_up)
    engine.compact(engine.partitions["a"])
    writer.join()
    assert last_catch_up and last_catch_up[0] <= CATCH_UP_ROWS
    assert engine.partitions["a"].live_count == 12_000 and len(engine.get([f"img-{i}" for i in range(2_000, 12_000)])) == 10_000


def test_a_compacted_category_whose_training_failed_is_not_trained_again_until_it_grows(tmp_path):
    engine = _engine(tmp_path)
    vectors = _vectors(2_000, 9)
    engine.upsert(_records(range(2_000), vectors, 1.0))
    engine.partitions["a"].training_failed_at_rows = 2_000
    engine.upsert(_records(range(2_000), vectors, 2.0))
    engine.compact(engine.partitions["a"])
    assert engine.partitions["a"].training_failed_at_rows == 2_000


@pytest.mark.timeout(30)
def test_a_category_whose_images_were_all_deleted_is_compacted_to_nothing(tmp_path):
    """The catch-up measured what was left to copy from the last row copied: with no live row at all, more than
    CATCH_UP_ROWS rows always seemed left, and the compaction never ended (found while fixing the review)."""
    engine = _engine(tmp_path)
    engine.upsert(_records(range(5_000), _vectors(5_000, 10), 1.0))
    engine.delete([f"img-{i}" for i in range(5_000)])
    assert engine.partitions["a"].compaction_due()
    engine.compact(engine.partitions["a"])
    assert len(engine.partitions["a"].image_ids) == engine.partitions["a"].live_count == 0


@pytest.mark.parametrize("asked", [("a", "n"), ()])
def test_an_image_moved_into_a_category_created_during_the_search_is_not_missed(tmp_path, monkeypatch, asked):
    """The search retried only for moves between the partitions it had searched: a move into a category created
    after it started (so not among them) left the image in neither (review)."""
    engine = _engine(tmp_path)
    x = np.ones(DIM, np.float32)
    engine.upsert([Record(image_id="x", product_id="px", category="a", vector=x),
                   Record(image_id="y", product_id="py", category="b", vector=-x)])
    moves = _moving_after_reading(engine, monkeypatch, "a", "x", lambda held_in: "n")
    hits = engine.search(SearchQuery(vector=x, top_k=1, categories=asked)).hits
    assert moves and [(h.image_id, h.category) for h in hits] == [("x", "n")]
