"""`make demo`'s job (`imgsearch demo`) on a slice of the grocery catalogue, through a real stack: it runs to the
end, and its three `imgsearch eval` reports over the val photos give a plausible Recall@1."""

from __future__ import annotations

import re

import pytest

from broker.demo import run_demo

pytestmark = pytest.mark.slow


def test_demo_on_a_slice_of_the_catalogue(data_dir, tmp_path, capsys):
    # The data folder as shipped, plus a test.txt (the dataset's own held-out split, which the demo then also
    # evaluates): a stand-in of every 10th val photo.
    grocery = tmp_path / "data" / "grocery"
    grocery.mkdir(parents=True)
    for entry in (data_dir / "grocery").iterdir():
        (grocery / entry.name).symlink_to(entry)
    val = [line for line in (data_dir / "grocery" / "val.txt").read_text().splitlines() if line.strip()]
    (grocery / "test.txt").write_text("\n".join(val[::10]) + "\n")
    assert run_demo(data_dir=tmp_path / "data", shards=2, queries=2, limit=60) == 0
    out = capsys.readouterr().out
    assert "ingested" in out and "demo done" in out
    assert "from duplicate cache (cache: exact)" in out  # the re-encoded catalogue photo
    reports = re.findall(r"imgsearch eval: (\d+) val photos against .*\n(\d+) queries, (\d+) answered.*\n"
                         r"Recall@1 ([0-9.]+)", out)
    assert len(reports) == 3, out
    for photos, queries, answered, recall_at_1 in reports:
        assert int(photos) == int(queries) == int(answered) > 50
        # 60 training photos of ~45 products: far fewer than the shipped demo, but far above chance (~2 %)
        assert float(recall_at_1) > 0.3, out
    [(photos, queries, recall_at_1)] = re.findall(
        r"imgsearch eval: (\d+) test photos .*\n(\d+) queries, \d+ answered.*\nRecall@1 ([0-9.]+)", out)
    assert 0 < int(photos) == int(queries) <= len(val[::10]) and float(recall_at_1) > 0.3, out
