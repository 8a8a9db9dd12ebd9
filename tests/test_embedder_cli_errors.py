"""`imgsearch-embed` with a user's own catalogue gone wrong: one clear line and exit status 2, or honest figures;
never a traceback, a NaN, or perfect figures over nothing (review of 2026-12-06). In process, on a few grocery
photos; only the eval cases run the shipped ONNX model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from embedder import data, train
from embedder.cli import main


@pytest.fixture
def catalogue(tmp_path):
    """2 photos of each of 4 grocery products, as a folder per product, and a CSV listing the same files."""
    root = tmp_path / "catalogue"
    rows = []
    for product in ("Banana", "Granny-Smith", "Arla-Standard-Milk", "Carrots"):
        photos = [item for item in data.read_grocery(data.grocery_dir(), "train") if item.product_id == product]
        for item in photos[:2]:
            target = root / product / item.path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(item.path, target)
            rows.append(f"{target},{product}")
    (tmp_path / "catalogue.csv").write_text("path,product_id\n" + "\n".join(rows) + "\n")
    return tmp_path


def _fails_with(capsys, argv, says: str) -> None:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert says in err and "Traceback" not in err, err


@pytest.mark.parametrize(("extra", "says"), [
    (["--val-fraction", "0.75"], "left to train on"),  # 1 of 4 products would be trained on
    (["--val-fraction", "1"], "--val-fraction must be in [0, 1)"),
    (["--val-fraction", "-0.5"], "--val-fraction must be in [0, 1)"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_train_refuses_a_run_that_would_learn_or_measure_nothing(catalogue, capsys, extra, says):
    _fails_with(capsys, ["train", "--catalogue", str(catalogue / "catalogue"), "--out", str(catalogue / "run"),
                         *extra], says)
    assert not (catalogue / "run" / "last.pt").exists()


def test_validation_without_a_product_of_two_photos_reports_nothing_rather_than_nan():
    assert train.validate(None, None, 0, ["a", "b", "c"], None) == {}


def test_catalogue_files_that_are_not_what_they_claim_are_named(catalogue, capsys, tmp_path):
    folder = catalogue / "catalogue"
    (folder / "loose.jpg").write_bytes((folder / "Banana").iterdir().__next__().read_bytes())
    _fails_with(capsys, ["train", "--catalogue", str(folder), "--out", str(tmp_path / "r")], "images at the top")
    (folder / "loose.jpg").unlink()
    broken = folder / "Banana" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    _fails_with(capsys, ["eval", "--queries", str(folder)], "broken.jpg")
    broken.unlink()
    missing = tmp_path / "missing.csv"
    missing.write_text(f"{tmp_path / 'nowhere.jpg'},p1\n")
    _fails_with(capsys, ["eval", "--queries", str(missing)], "nowhere.jpg")
    header_only = tmp_path / "header.csv"
    header_only.write_text("path,product_id\n")
    _fails_with(capsys, ["eval", "--queries", str(header_only)], "no images")


def test_an_excel_csv_with_a_byte_order_mark_and_the_ingest_header_is_read(tmp_path):
    csv_path = tmp_path / "excel.csv"
    csv_path.write_bytes("\ufeffimage,product_id,category\nphoto.jpg,p1,Fruit\n".encode())
    [item] = data.read_catalogue_csv(csv_path)
    assert (item.path, item.product_id, item.category) == (tmp_path / "photo.jpg", "p1", "Fruit")


def test_eval_says_when_there_is_nothing_to_measure_and_writes_no_nan(catalogue, capsys, tmp_path):
    csv_rows = (catalogue / "catalogue.csv").read_text().splitlines()[1:]
    queries, gallery = tmp_path / "q.csv", tmp_path / "g.csv"
    queries.write_text("\n".join(r for r in csv_rows if r.endswith("Banana")) + "\n")
    gallery.write_text("\n".join(r for r in csv_rows if r.endswith("Carrots")) + "\n")
    out = tmp_path / "out.json"
    assert main(["eval", "--queries", str(queries), "--gallery", str(gallery), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "nothing to measure" in printed and "nan" not in printed.lower()
    json.loads(out.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    # 3 queries, the Granny-Smith one without its product in the gallery (the other photo of each product is)
    queries.write_text(f"{csv_rows[0]}\n{csv_rows[4]}\n{csv_rows[2]}\n")
    gallery.write_text(f"{csv_rows[1]}\n{csv_rows[5]}\n" + "\n".join(r for r in csv_rows if r.endswith("Carrots")) + "\n")
    assert main(["eval", "--queries", str(queries), "--gallery", str(gallery)]) == 0
    assert "2 of 3 queries have a right answer" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "says"), [
    (["eval", "--grocery-split", "train"], "the train photos are the gallery"),
    (["eval", "--queries", "q.csv", "--heldout", "split.json"], "--heldout goes with the grocery data"),
    (["eval", "--batch-size", "0"], "--batch-size and --threads must be at least 1"),
])
def test_eval_usage_errors(capsys, argv, says):
    _fails_with(capsys, argv, says)


def test_export_and_triton_repo_refuse_what_is_not_theirs_to_take(tmp_path, capsys):
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    _fails_with(capsys, ["export", "--checkpoint", str(not_a_checkpoint), "--out", str(tmp_path / "m.onnx")],
                "not a checkpoint")
    _fails_with(capsys, ["export", "--pretrained", "--out", str(tmp_path)], "is a folder")
    _fails_with(capsys, ["export", "--checkpoint", str(not_a_checkpoint), "--out", str(not_a_checkpoint)],
                "the checkpoint itself")
    _fails_with(capsys, ["triton-repo", "--model", str(not_a_checkpoint), "--out", str(tmp_path / "repo")],
                "is not an ONNX model")
    assert not list(tmp_path.glob("*.tmp"))


def test_files_of_the_wrong_shape_are_named_with_where_they_go_wrong(catalogue, capsys, tmp_path):
    """A cp1252 CSV and a malformed line of a split list gave a bare codec or unpacking message (review)."""
    cp1252 = tmp_path / "excel.csv"
    cp1252.write_bytes("photo.jpg,Café\n".encode("cp1252"))
    _fails_with(capsys, ["eval", "--queries", str(cp1252)], f"{cp1252}: not UTF-8")
    grocery = tmp_path / "grocery"
    grocery.mkdir()
    (grocery / "classes.csv").symlink_to(data.grocery_dir() / "classes.csv")
    (grocery / "test.txt").write_text("test/a.jpg, 0, 0\ntest/b.jpg 0\n")
    with pytest.raises(data.InputFileError, match=r"test.txt, line 2"):
        data.read_grocery(grocery, "test")
    split = tmp_path / "split.json"
    split.write_text('{"train_products": []}')
    _fails_with(capsys, ["eval", "--heldout", str(split)], "not a training run's split.json")


def test_a_protocol_with_nothing_to_measure_is_a_whole_markdown_row():
    from embedder.evaluate import summary_markdown

    nothing = {"queries": 2, "gallery": 3, "answerable_queries": 0, "recall@1": float("nan"),
               "best_f1": {"threshold": 1.0, "precision": 1.0, "recall": 0.0, "f1": 0.0}}
    header, _, row = summary_markdown({"queries_vs_gallery": nothing}).splitlines()
    assert row.count("|") == header.count("|") and "nothing to measure" in row


def test_a_value_error_from_a_users_file_is_one_line_with_its_type(tmp_path, capsys):
    """Narrowed to our own errors, the catch let a malformed --show JSON through as a traceback again (review)."""
    bad = tmp_path / "results.json"
    bad.write_text("{not json")
    _fails_with(capsys, ["eval", "--show", str(bad)], "JSONDecodeError")


@pytest.mark.parametrize(("argv", "says"), [
    (["bench", "--concurrency", "0"], "at least 1"), (["bench", "--duration-s", "0"], "above 0"),
    (["bench", "--images", "0"], "at least 1"), (["bench", "--concurrency", "1,x"], "whole numbers"),
    (["serve", "--max-batch-size", "0"], "--max-batch-size must be at least 1"),
])
def test_settings_that_measure_or_serve_nothing_are_refused(argv, says, capsys):
    """`bench` with zeros ended in a traceback (an empty percentile, a division by zero), and `serve
    --max-batch-size 0` started a Triton that refused every call (review)."""
    _fails_with(capsys, argv, says)


def test_eval_show_of_a_json_that_is_not_evals_is_one_line(tmp_path, capsys):
    """A JSON that parses but is not eval's results (the model's metrics.json, a list) gave a KeyError or
    TypeError traceback (review)."""
    for content in ('{"model": "m"}', "[]", '{"model": "m", "results": null}',
                    '{"model": "m", "results": {"x": {"recall_at_k": {}}}}'):
        shown = tmp_path / "shown.json"
        shown.write_text(content)
        _fails_with(capsys, ["eval", "--show", str(shown)], "not a results file")


def test_eval_heldout_of_a_run_that_held_nothing_out_is_refused(tmp_path, capsys):
    split = tmp_path / "split.json"
    split.write_text('{"val_products": [], "train_products": ["a"]}')
    _fails_with(capsys, ["eval", "--heldout", str(split)], "held no product out")


def test_a_checkpoint_of_another_shape_is_one_line(tmp_path, capsys):
    """A damaged or foreign checkpoint (an unknown model_config key, a train_config that is not a mapping, weights
    of another network) gave a traceback of our loader in export and eval (review)."""
    import torch

    for name, payload, says in (
        ("unknown-key.pt", {"model_config": {"no_such_setting": 1}, "model": {}}, "does not fit the model"),
        ("bad-train-config.pt", {"model_config": {}, "model": {}, "train_config": [224]}, "train_config is a list"),
        ("other-weights.pt", {"model_config": {}, "model": {"_conv_stem.weight": torch.zeros(3)}},
         "does not fit the model"),
    ):
        path = tmp_path / name
        torch.save(payload, path)
        _fails_with(capsys, ["export", "--checkpoint", str(path), "--out", str(tmp_path / "m.onnx")], says)


def test_eval_refuses_queries_that_would_find_themselves(catalogue, capsys):
    """A file listed twice in --queries found its copy in leave-one-out, --queries X --gallery X found every query
    itself (Recall@1 1.0 either way), and an empty product id was one product "" (review)."""
    rows = (catalogue / "catalogue.csv").read_text().splitlines()
    twice = catalogue / "twice.csv"
    twice.write_text("\n".join([*rows, rows[1]]) + "\n")
    _fails_with(capsys, ["eval", "--queries", str(twice)], "listed more than once")
    same = str(catalogue / "catalogue.csv")
    _fails_with(capsys, ["eval", "--queries", same, "--gallery", same], "in the gallery too")
    unlabelled = catalogue / "unlabelled.csv"
    unlabelled.write_text(rows[1].split(",")[0] + ",\n")
    _fails_with(capsys, ["eval", "--queries", str(unlabelled)], "needs at least path and product id")


@pytest.mark.parametrize("device", ["cuda", "no-such-device", "mps", "meta"])
def test_eval_on_a_device_this_torch_lacks_is_one_line(tmp_path, capsys, device):
    _fails_with(capsys, ["eval", "--baseline", "--device", device], "--device")
