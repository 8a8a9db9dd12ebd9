"""Retrieval metrics against hand-computed cases, and the eval CLI end to end on a tiny real catalogue."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from embedder import data, evaluate
from embedder.metrics import (
    best_f1,
    cosine_similarities,
    map_at_r,
    recall_at_k,
    retrieval_report,
    threshold_sweep,
)

# Two queries (labels a, b) against four gallery items (a, b, a, c).
# q0 ranks: g0 (a, relevant), g1 (b), g3 (c), g2 (a, relevant)   -> R=2, AP@R = (1/1 + 0)/2 = 0.5
# q1 ranks: g2 (a), g3 (c), g1 (b, relevant), g0 (a)              -> R=1, AP@R = 0
SIMS = np.array([[0.9, 0.8, 0.1, 0.5],
                 [0.2, 0.3, 0.9, 0.4]], dtype=np.float32)
Q_LABELS = ["a", "b"]
G_LABELS = ["a", "b", "a", "c"]


def test_recall_at_k_hand_computed():
    assert recall_at_k(SIMS, Q_LABELS, G_LABELS, ks=(1, 2, 3)) == {1: 0.5, 2: 0.5, 3: 1.0}


def test_map_at_r_hand_computed():
    assert map_at_r(SIMS, Q_LABELS, G_LABELS) == pytest.approx(0.25)


def test_map_at_r_counts_only_the_first_r_positions():
    # R=2; relevant items at ranks 2 and 3 -> (0 + 1/2 + [rank 3 is beyond R]) / 2 = 0.25
    sims = np.array([[0.9, 0.8, 0.7, 0.1]])
    assert map_at_r(sims, ["x"], ["y", "x", "x", "z"]) == pytest.approx(0.25)
    # Both relevant items on top -> 1.0
    assert map_at_r(np.array([[0.9, 0.8, 0.1]]), ["x"], ["x", "x", "y"]) == pytest.approx(1.0)


def test_queries_without_a_relevant_item_are_left_out():
    sims = np.array([[0.9, 0.1], [0.5, 0.4]])
    # The second query ("z") has no gallery item: only the first one counts.
    assert recall_at_k(sims, ["a", "z"], ["a", "b"], ks=(1,)) == {1: 1.0}
    assert map_at_r(sims, ["a", "z"], ["a", "b"]) == 1.0
    assert math.isnan(map_at_r(sims, ["y", "z"], ["a", "b"]))


def test_leave_one_out_never_matches_itself():
    emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    sims = cosine_similarities(emb, emb)
    labels = ["a", "a", "b"]
    # Without exclusion every query finds itself; with it, "b" has no other item and is left out.
    assert recall_at_k(sims, labels, labels, ks=(1,), exclude_self=True) == {1: 1.0}
    assert map_at_r(sims, labels, labels, exclude_self=True) == 1.0
    with pytest.raises(ValueError):
        recall_at_k(SIMS, Q_LABELS, G_LABELS, exclude_self=True)


def test_threshold_sweep_hand_computed():
    # Positive pairs: (q0,g0)=0.9, (q0,g2)=0.1, (q1,g1)=0.3; 8 pairs in all.
    points = {p.threshold: p for p in threshold_sweep(SIMS, Q_LABELS, G_LABELS, [0.95, 0.85, 0.5, 0.0])}
    assert (points[0.95].precision, points[0.95].recall, points[0.95].f1) == (1.0, 0.0, 0.0)
    assert points[0.85].precision == pytest.approx(0.5) and points[0.85].recall == pytest.approx(1 / 3)
    assert points[0.5].precision == pytest.approx(0.25) and points[0.5].recall == pytest.approx(1 / 3)
    assert points[0.0].precision == pytest.approx(3 / 8) and points[0.0].recall == 1.0
    assert points[0.0].f1 == pytest.approx(2 * (3 / 8) / (3 / 8 + 1))
    assert best_f1(list(points.values())).threshold == 0.0


def test_threshold_sweep_is_inclusive_at_the_threshold():
    points = threshold_sweep(np.array([[0.5, 0.2]]), ["a"], ["a", "b"], [0.5])
    assert (points[0].precision, points[0].recall) == (1.0, 1.0)


def test_retrieval_report_is_json_ready():
    report = retrieval_report(SIMS, Q_LABELS, G_LABELS)
    assert report["recall@1"] == 0.5 and report["map@r"] == pytest.approx(0.25)
    assert set(report["best_f1"]) == {"threshold", "precision", "recall", "f1"}
    json.dumps(report)


@pytest.fixture(scope="module")
def tiny_catalogues(tmp_path_factory):
    """3 grocery products: 3 train photos each as the gallery, 2 val photos each as the queries."""
    root = data.grocery_dir()
    products = {"Banana", "Granny-Smith", "Arla-Standard-Milk"}
    folder = tmp_path_factory.mktemp("catalogue")
    for split, per_product, name in (("train", 3, "gallery.csv"), ("val", 2, "queries.csv")):
        counts: dict[str, int] = {}
        rows = []
        for item in data.read_grocery(root, split):
            if item.product_id in products and counts.get(item.product_id, 0) < per_product:
                counts[item.product_id] = counts.get(item.product_id, 0) + 1
                rows.append(f"{item.path},{item.product_id},{item.category}")
        assert len(rows) == 3 * per_product
        (folder / name).write_text("path,product_id,category\n" + "\n".join(rows) + "\n")
    return folder


def test_eval_cli_on_a_tiny_catalogue(tiny_catalogues, capsys):
    out = tiny_catalogues / "eval.json"
    code = evaluate.main(["--queries", str(tiny_catalogues / "queries.csv"),
                          "--gallery", str(tiny_catalogues / "gallery.csv"), "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())["results"]["queries_vs_gallery"]
    assert (result["queries"], result["gallery"]) == (6, 9)
    # Bananas, green apples and milk cartons are easy to tell apart for any sensible model.
    assert result["recall@1"] >= 0.8
    assert 0 <= result["map@r"] <= 1
    assert "R@1" in capsys.readouterr().out
    assert evaluate.main(["--show", str(out), "--markdown"]) == 0
    assert "| queries_vs_gallery | 6 | 9 |" in capsys.readouterr().out


def test_eval_cli_leave_one_out_without_a_gallery(tiny_catalogues, tmp_path):
    """--queries alone: each query is searched among the others, never finding itself. Labels chosen so that
    only a self-match could make recall perfect: two bananas with different labels, a banana and a milk carton
    with the same one."""
    rows = {r.split(",")[1]: r.split(",")[0] for r in (tiny_catalogues / "gallery.csv").read_text().splitlines()[1:]}
    bananas = [r.split(",")[0] for r in (tiny_catalogues / "gallery.csv").read_text().splitlines() if ",Banana," in r]
    catalogue = tmp_path / "loo.csv"
    catalogue.write_text(f"{bananas[0]},x,c\n{rows['Arla-Standard-Milk']},x,c\n{bananas[1]},y,c\n")
    loo_out = tmp_path / "loo.json"
    assert evaluate.main(["--queries", str(catalogue), "--out", str(loo_out)]) == 0
    with pytest.raises(SystemExit):  # the same files as gallery: every image's nearest neighbour is itself
        evaluate.main(["--queries", str(catalogue), "--gallery", str(catalogue)])
    loo = json.loads(loo_out.read_text())["results"]["queries_leave_one_out"]
    assert (loo["queries"], loo["gallery"]) == (3, 3)
    # Left out, banana x's nearest is banana y (another label): at most the milk carton finds its "x".
    assert loo["recall@1"] <= 0.5
    with pytest.raises(SystemExit):
        evaluate.main(["--gallery", str(catalogue)])


def test_selection_sets_never_touch_val_and_split_each_product(tmp_path):
    from embedder import selection_sets

    root = data.grocery_dir()
    sets = selection_sets.selection_sets(root)
    val_paths = {i.path for i in data.read_grocery(root, "val")}
    train_paths = {i.path for i in data.read_grocery(root, "train")}
    assert not any(i.path in val_paths for items in sets.values() for i in items)
    half_a, half_b = {i.path for i in sets["half-a.csv"]}, {i.path for i in sets["half-b.csv"]}
    assert not half_a & half_b and half_a | half_b == train_paths
    assert {i.product_id for i in sets["half-a.csv"]} == {i.product_id for i in sets["half-b.csv"]}
    early, late = sets["early-a.csv"], sets["late-b.csv"]
    assert not {i.path for i in early} & {i.path for i in late}
    assert {i.path for i in early} | {i.path for i in late} == train_paths
    for product in {i.product_id for i in early}:
        # the last third of each product's photos, by file number (the order they were taken)
        numbers = [int(i.path.stem.rsplit("_", 1)[1]) for i in early if i.product_id == product]
        later = [int(i.path.stem.rsplit("_", 1)[1]) for i in late if i.product_id == product]
        assert later and max(numbers) < min(later) and len(later) * 3 <= len(numbers) + len(later) + 2
    assert len(sets["iconic.csv"]) == 81 and len({i.product_id for i in sets["heldout-train-photos.csv"]}) == 8
    assert selection_sets.main(["--grocery", str(root), "--out", str(tmp_path)]) == 0
    written = data.read_catalogue(tmp_path / "half-a-plus-iconic4.csv")
    # the CSV holds resolved paths (../shared may be a link, as in CI)
    assert [(i.path, i.product_id, i.category) for i in written] == [
        (i.path.resolve(), i.product_id, i.category) for i in sets["half-a-plus-iconic4.csv"]]


def test_product_ranks_match_a_brute_force_count():
    """compare_models ranks a query's product among products by their best image, as `imgsearch eval` does."""
    from embedder.compare_models import changes
    from embedder.metrics import product_ranks, rank_summary

    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(60, 16)).astype(np.float32)
    gallery_labels = [f"p{i % 7}" for i in range(60)]
    queries = rng.normal(size=(25, 16)).astype(np.float32)
    query_labels = [f"p{i % 7}" for i in range(25)]
    ranks = product_ranks(queries, query_labels, gallery, gallery_labels)
    for q, label, rank in zip(queries, query_labels, ranks):
        best = {p: max(float(q @ g) for g, lab in zip(gallery, gallery_labels) if lab == p) for p in set(gallery_labels)}
        ordered = sorted(best, key=best.get, reverse=True)
        assert rank == ordered.index(label) + 1
    assert rank_summary(np.array([1, 2, 20]))["recall@1"] == pytest.approx(1 / 3)
    assert rank_summary(np.array([1, 2, 20]))["mrr"] == pytest.approx((1 + 0.5 + 0.05) / 3)
    moved = changes(np.array([1, 12, 3]), np.array([11, 2, 4]), ["a", "b", "a"], k=10)
    assert moved == {"left_top_k": {"a": 1}, "entered_top_k": {"b": 1}}


def test_eval_decodes_a_big_jpeg_exactly_as_serving_does(tmp_path):
    """Serving decodes JPEGs with a shorter side of 896 px or more at a reduced scale; eval decoded them whole,
    so it measured other pixels than production gets (a 12 MP photo: cosine 0.994 between the two)."""
    import io

    from PIL import Image

    from embedder.preprocess import preprocess_bytes

    source = Image.open(data.read_grocery(data.grocery_dir(), "val")[0].path).convert("RGB")
    big = tmp_path / "big.jpg"
    buffer = io.BytesIO()
    source.resize((1500, 2000), Image.BICUBIC).save(buffer, "JPEG", quality=92)
    big.write_bytes(buffer.getvalue())
    seen = []

    def embed(pixels):
        seen.append(pixels)
        return np.ones((len(pixels), 4), np.float32)

    evaluate.embed_catalogue(embed, [data.CatalogueImage(path=big, product_id="p", category="c")], progress=False)
    np.testing.assert_array_equal(seen[0][0], preprocess_bytes(big.read_bytes()))


def test_precision_check_cosine_ignores_the_length_error_of_half_precision():
    """A bfloat16 embedding cast back is not unit length; the plain dot product reported as "cosine" mixed that
    length error in (as low as 0.9947 where the true cosine was 0.9974)."""
    from embedder.precision_check import compare

    rng = np.random.default_rng(0)
    reference = rng.standard_normal((5, 8)).astype(np.float32)
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    lengths = np.array([[0.996], [1.004], [1.0], [0.998], [1.002]], np.float32)
    protocol = {"top1": np.zeros(5, int), "recall@1": 1.0}
    variant = {"val_vs_train": protocol, "val_vs_iconic": protocol}
    row = compare(variant, variant, {"val": reference * lengths}, {"val": reference})
    assert row["cosine_min"] == pytest.approx(1.0, abs=1e-6)
    assert row["length_deviation_max"] == pytest.approx(0.004, abs=1e-6)


def test_product_ranks_leave_out_a_query_whose_product_has_no_gallery_image():
    """It raised KeyError where recall_at_k and map_at_r leave such a query out (review of 2026-12-05)."""
    from embedder.metrics import product_ranks, rank_summary

    gallery = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    queries = np.array([[0.9, 0.1], [0.1, 0.9], [0.7, 0.7]], np.float32)
    ranks = product_ranks(queries, ["a", "a", "absent"], gallery, ["a", "b"])
    assert ranks.tolist() == [1, 2, 0]
    assert rank_summary(ranks) == {"recall@1": 0.5, "recall@5": 1.0, "recall@10": 1.0, "mrr": 0.75}


def test_eval_takes_the_grocery_test_split_where_there_is_one(tmp_path, capsys):
    """The dataset's own held-out split (test.txt, beside train.txt and val.txt) could only be evaluated through
    a running broker (`imgsearch eval --grocery-split test`), not in process."""
    source = data.grocery_dir()
    root = tmp_path / "grocery"
    root.mkdir()
    for name in ("classes.csv", "train", "val", "iconic-images-and-descriptions"):
        (root / name).symlink_to(source / name)
    train = [line for line in (source / "train.txt").read_text().splitlines() if line.strip()]
    val = [line for line in (source / "val.txt").read_text().splitlines() if line.strip()]
    (root / "train.txt").write_text("\n".join(train[::100]) + "\n")
    (root / "test.txt").write_text("\n".join(val[::40]) + "\n")  # a stand-in for the held-out photos
    with pytest.raises(SystemExit):
        evaluate.main(["--grocery", str(root), "--grocery-split", "val"])  # no val.txt in this folder
    assert "no grocery split 'val'" in capsys.readouterr().err
    out = tmp_path / "test.json"
    assert evaluate.main(["--grocery", str(root), "--grocery-split", "test", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"test_vs_train", "test_vs_iconic"}
    assert results["test_vs_iconic"]["queries"] == len(val[::40])
    assert results["test_vs_iconic"]["recall@10"] > 0.5
