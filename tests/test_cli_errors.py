"""The `imgsearch` CLI on bad local input: one line naming the file (or the CSV line) and exit status 1, never a
traceback; nothing listens on the broker address, and none of these cases gets as far as calling it."""

from __future__ import annotations

import pytest

from broker import cli


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGSEARCH_BROKER", "127.0.0.1:1")
    (tmp_path / "no-category.csv").write_text("image,product_id\na.jpg,p\n")
    (tmp_path / "extra-field.csv").write_text("image,product_id,category\na.jpg,p,c,surplus\n")
    (tmp_path / "missing-image.csv").write_text("image,product_id,category\nmissing.jpg,p,c\n")
    (tmp_path / "latin1.csv").write_bytes("image,product_id,category\na.jpg,caf\xe9,c\n".encode("latin-1"))
    # saved by Excel as "CSV UTF-8": a byte-order mark, which read as part of the first column's name
    (tmp_path / "bom.csv").write_bytes("image, product_id, category\nbom-missing.jpg,p,c\n".encode("utf-8-sig"))
    (tmp_path / "same-name.csv").write_text("image,product_id,category\na/front.jpg,p,c\nb/front.jpg,q,c\n")
    clash = tmp_path / "clash" / "Cat" / "prod"
    clash.mkdir(parents=True)
    (clash / "front.jpg").write_bytes(b"jpeg")
    (clash / "front.png").write_bytes(b"png")
    return tmp_path


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["search", "{d}/missing.jpg"], "missing.jpg"),
        (["ingest", "{d}/no-category.csv"], "no category column"),
        (["ingest", "{d}/extra-field.csv"], "line 2"),
        (["ingest", "{d}/missing-image.csv"], "missing.jpg"),
        (["ingest", "{d}/latin1.csv"], "utf-8"),
        (["ingest", "{d}/bom.csv"], "bom-missing.jpg"),  # the header is read; the file is what is missing
        (["ingest", "{d}/same-name.csv"], "add an image_id column"),
        # both were sent as one image id, the second replacing the first, and both counted (review)
        (["ingest", "{d}/clash"], "would both get image id 'Cat/prod/front'"),
        (["delete", "--from-file", "{d}/missing.txt"], "missing.txt"),
        (["eval", "{d}/missing.csv"], "missing.csv"),
    ],
    ids=["search-missing-file", "csv-without-category", "csv-extra-field", "csv-missing-image", "csv-not-utf8",
         "csv-with-bom-and-spaced-header", "csv-default-ids-collide", "folder-ids-collide",
         "delete-missing-list", "eval-missing-csv"],
)
def test_bad_local_input_is_one_clear_line(files, capsys, args, says):
    assert cli.main([a.format(d=files) for a in args]) == 1
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_up_refuses_a_broker_port_in_use_before_starting_anything(tmp_path, capsys):
    """`imgsearch up` on a port another stack's broker listened on printed "ready" for that broker, its own having
    exited (CLI review of 2026-12-05)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = cli.main(["up", "--port", str(port), "--work-dir", str(tmp_path / "stack")])
    err = capsys.readouterr().err
    assert code == 1 and f"127.0.0.1:{port} is in use" in err, err
    assert not (tmp_path / "stack" / "logs").exists()  # nothing was started


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["search", "q.jpg", "--filter", "brand="], "has no value"),
        (["search", "q.jpg", "--price", "10..5"], "is empty: 10 is above 5"),
        (["search", "q.jpg", "--filter", "price=10..5"], "is empty: 10 is above 5"),
        (["search", "q.jpg", "--timeout-s", "nan"], "positive, finite number of seconds"),
        (["stats", "--timeout-s", "0"], "positive, finite number of seconds"),
        (["ingest", "x", "--timeout-s", "inf"], "positive, finite number of seconds"),
    ],
    ids=["empty-value", "empty-price-range", "empty-filter-range", "nan-timeout", "zero-timeout", "inf-timeout"],
)
def test_arguments_that_could_only_fail_are_refused_before_any_call(monkeypatch, capsys, args, says):
    """They reached the broker and answered 0 hits (an empty range or value) or DEADLINE_EXCEEDED (nan) (review)."""
    monkeypatch.setenv("IMGSEARCH_BROKER", "127.0.0.1:1")
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    assert exit_.value.code == 2 and says in capsys.readouterr().err


def test_a_long_image_id_is_wrapped_in_the_search_table_not_cut(capsys):
    """At the 160 columns of piped output a long id was cut with "…", and the cut id is not what --image-id and
    delete take (review of 2026-12-05)."""
    from broker.types import CacheOutcome, SearchAnswer, StageTimings
    from shard_server.types import Hit

    image_id = "Arla-Ecological-Medium-Fat-Milk/Arla-Ecological-Medium-Fat-Milk_001-front-shelf-photo-" + "x" * 40
    hit = Hit(image_id=image_id, product_id="Arla-Ecological-Medium-Fat-Milk", category="Milk", score=0.9,
              attributes={"brand": "Arla", "price": 12.5})
    cli.print_answer(SearchAnswer(hits=(hit,), cache=CacheOutcome.MISS, from_duplicate_cache=False, partial=False,
                                  shards=(), timings=StageTimings()), title="query.jpg")
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    id_column = "".join(row.split("│")[5].strip() for row in rows)
    assert id_column == image_id
