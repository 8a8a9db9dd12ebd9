"""`imgsearch`: run a local stack and talk to a broker.

    imgsearch up [--shards 2] [--port 7100]          whole stack in the foreground, Ctrl-C stops it
    imgsearch ingest PATH|CSV [--category C]         bulk ingest with a progress bar
    imgsearch ingest --grocery-split train           the grocery training photos
    imgsearch search IMAGE [--category C] [--filter brand=Arla] [--price 10..50] [-k 10] [--json]
    imgsearch search --image-id ID [--distinct-products] ...   like a catalogue image; one hit per product
    imgsearch delete ID ... [--from-file ids.txt]
    imgsearch stats
    imgsearch eval QUERIES.csv|DIR [--grocery-split val] [-k 10] [--filter packshot=true] [--json out.json]
                                                     Recall@1/5/10, MRR and latency of the running broker
    imgsearch demo --data ../shared/data             the grocery demo (what `make demo` runs)

The broker address comes from --broker or IMGSEARCH_BROKER (default 127.0.0.1:7100); the write token from
IMGSEARCH_WRITE_TOKEN.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from broker.catalogue import GROCERY_ATTRIBUTE_SCHEMA
from shard_server.types import AnyOf, Condition, Equals, Filter, Is, Range

DEFAULT_BROKER = "127.0.0.1:7100"
TIMEOUT_HELP = "seconds the call may take (default: %(default)s)"
# Files listed when an ingest skipped some (the count says how many more).
SHOWN_PROBLEMS = 20
# `imgsearch up` restarts a shard process that exits, unless they exited more often than this within the window
# (a crash loop: a corrupt data folder, a port taken), when it stops the stack.
MAX_SHARD_RESTARTS = 5
SHARD_RESTART_WINDOW_S = 60.0


# ---------------------------------------------------------------------- filters
def parse_condition(text: str) -> Condition:
    """`field=value` (equals), `field=a|b` (any of), `field=lo..hi` (range, either end open), `field=true`."""
    field, sep, value = text.partition("=")
    if not sep or not field:
        raise argparse.ArgumentTypeError(f"filter {text!r} is not field=value")
    if not value.strip():  # `brand=` (or `brand= `) matched nothing and answered 0 hits (review)
        raise argparse.ArgumentTypeError(f"filter {text!r} has no value")
    if ".." in value:
        return Condition(field=field, predicate=parse_range(value))
    if value.lower() in ("true", "false"):
        return Condition(field=field, predicate=Is(value=value.lower() == "true"))
    if "|" in value:
        values = value.split("|")
        if not all(v.strip() for v in values):  # `brand=Arla|` asked for an empty brand too, `brand=|` only that
            raise argparse.ArgumentTypeError(f"filter {text!r} has an empty alternative")
        return Condition(field=field, predicate=AnyOf(values=frozenset(values)))
    return Condition(field=field, predicate=Equals(value=value))


def parse_range(text: str) -> Range:
    lo, sep, hi = text.partition("..")
    if not sep:
        raise argparse.ArgumentTypeError(f"range {text!r} is not lo..hi")
    try:
        low, high = float(lo) if lo else None, float(hi) if hi else None
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"range {text!r}: {exc}") from None
    if low is not None and high is not None and low > high:
        raise argparse.ArgumentTypeError(f"range {text!r} is empty: {lo} is above {hi}")
    return Range(min=low, max=high)


def positive_seconds(text: str) -> float:
    """A --timeout-s value: a positive, finite number of seconds (`nan` reached the broker as a deadline)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive, finite number of seconds")
    return value


def _non_empty(text: str) -> str:
    """A value given on the command line that must not be empty: `--category ''` (an unset shell variable) stored
    the image under "default" and `--image-id ''` under the file name, silently, and `--broker ''` failed with
    UNKNOWN "target uri is not valid" and grpc's log lines (API probe of 2026-12-05)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _attribute_schema(text: str) -> dict[str, str]:
    """An --attribute-schema value as {name: kind}, parsed as the shards parse theirs."""
    from shard_server.config import parse_attribute_schema

    try:
        return dict(parse_attribute_schema(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _client(args, *, write: bool = False):
    from broker.client import SyncBrokerClient

    token = (os.environ.get("IMGSEARCH_WRITE_TOKEN") or None) if write else None
    return SyncBrokerClient(args.broker, token=token, **_tls(args))


def _tls(args) -> dict[str, bytes | None]:
    """The broker client's TLS keyword arguments from the flags, or the environment."""
    def read(flag: str | None, variable: str) -> bytes | None:
        path = flag or os.environ.get(variable)
        return Path(path).read_bytes() if path else None

    return {
        "root_certificates": read(args.tls_ca_file, "IMGSEARCH_TLS_CA_FILE"),
        "certificate_chain": read(args.tls_client_cert_file, "IMGSEARCH_TLS_CLIENT_CERT_FILE"),
        "private_key": read(args.tls_client_key_file, "IMGSEARCH_TLS_CLIENT_KEY_FILE"),
    }


def _add_broker_arguments(parser: argparse.ArgumentParser, broker: str, *, timeout_s: float,
                          timeout_help: str = TIMEOUT_HELP) -> None:
    """--broker, the TLS files and --timeout-s: what every command that calls a broker takes."""
    parser.add_argument("--broker", default=broker, type=_non_empty)
    _add_tls_arguments(parser)
    parser.add_argument("--timeout-s", type=positive_seconds, default=timeout_s, help=timeout_help)


def _add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-ca-file", help="CA certificate of a TLS broker (or IMGSEARCH_TLS_CA_FILE)")
    parser.add_argument("--tls-client-cert-file", help="this client's certificate, for a broker that requires "
                        "mutual TLS (or IMGSEARCH_TLS_CLIENT_CERT_FILE)")
    parser.add_argument("--tls-client-key-file", help="the client certificate's private key "
                        "(or IMGSEARCH_TLS_CLIENT_KEY_FILE)")


def _token_hint(error) -> str | None:
    """What to do about a write the broker refused for its token (UNAUTHENTICATED, PERMISSION_DENIED)."""
    if error.code.name == "UNAUTHENTICATED":
        return "  The broker requires a write token: set IMGSEARCH_WRITE_TOKEN to it."
    if error.code.name == "PERMISSION_DENIED":
        return "  IMGSEARCH_WRITE_TOKEN is not the broker's write token: set it to the token the broker was given."
    return None


# ---------------------------------------------------------------------- commands
def cmd_up(args) -> int:
    from broker.stack import LocalStack, StackConfig

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="imgsearch-up-"))
    config = StackConfig(
        work_dir=work,
        shards=args.shards,
        replicas=args.replicas,
        broker_port=args.port,
        broker_metrics_port=args.metrics_port,
        redis_url=os.environ.get("REDIS_URL") or None,
        write_token=(os.environ.get("IMGSEARCH_WRITE_TOKEN") or "").strip() or None,
        shard_args=("--attribute-schema", args.attribute_schema),
    )
    stop = {"now": False, "starting": True, "interrupted": False}

    def on_signal(signum, frame):
        stop["now"] = True
        # Start-up takes up to a few minutes: stop what it started now (LocalStack.start does on any exception),
        # not once it is over. Only once: a second signal must not cut that clean-up short.
        if stop["starting"] and not stop["interrupted"]:
            stop["interrupted"] = True
            raise KeyboardInterrupt

    def say(*parts, **kwargs) -> None:
        # `up 2>&1 | tee up.log` and Ctrl-C: tee dies first, and a print to its closed pipe raised BrokenPipeError
        # before stack.stop(), leaving Triton (in a session of its own) running (review of 2026-12-05).
        with contextlib.suppress(OSError):
            print(*parts, **kwargs, flush=True)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    say(f"starting the stack in {work} ...")
    stack = LocalStack(config)
    try:
        stack.start()
        stop["starting"] = False
        for key, value in stack.describe().items():
            say(f"  {key:15s} {value}")
        say(f"ready: export IMGSEARCH_BROKER={stack.broker_address}   (Ctrl-C stops everything)")
        restarts: list[float] = []  # when shard processes were restarted, for the crash-loop limit
        while not stop["now"]:
            dead = [p.name for p in stack.processes.values() if not p.running]
            # A shard restarts from its write-ahead log, as Kubernetes restarts its pod; the broker meanwhile
            # answers without it, flagged partial. The other processes have no stand-in: the stack stops. Triton
            # was not watched at all (killed, it left the stack "ready" with every image search UNAVAILABLE and
            # its backend stubs running: review of 2026-12-05).
            shards = [name for name in dead if name.startswith("shard-")]
            others = [name for name in dead if name not in shards]
            if stack.triton is not None and not stack.triton.is_running():
                others.append("triton")
            if others:
                say(f"stopping: {', '.join(others)} exited (see {stack.logs})", file=sys.stderr)
                return 1
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < SHARD_RESTART_WINDOW_S]
            if len(restarts) + len(shards) > MAX_SHARD_RESTARTS:
                say(f"stopping: shard processes exited {len(restarts) + len(shards)} times within "
                    f"{SHARD_RESTART_WINDOW_S:.0f} s (see {stack.logs})", file=sys.stderr)
                return 1
            for name in shards:
                if stop["now"]:  # Ctrl-C reaches the shards too: a shard that died of it is not restarted
                    break
                code = stack.processes[name].process.returncode
                say(f"{name} exited (code {code}); restarting it (see {stack.logs / (name + '.log')})",
                    file=sys.stderr)
                restarts.append(now)
                try:
                    stack.restart_shard(name, stop_requested=lambda: stop["now"])
                except (OSError, RuntimeError, TimeoutError) as exc:
                    if stop["now"]:  # stopped during the restart (the restarted shard got the Ctrl-C too)
                        break
                    say(f"stopping: {name} did not come back: {exc}", file=sys.stderr)
                    return 1
                say(f"{name} is back")
            else:
                time.sleep(0.5)
    except KeyboardInterrupt:
        if not stop["interrupted"]:
            raise
        say("interrupted during start-up", file=sys.stderr)
        return 130
    except (OSError, RuntimeError, TimeoutError, ValueError) as exc:
        say(f"imgsearch up: could not start the stack: {exc}", file=sys.stderr)
        return 1
    finally:
        stop["starting"] = False
        say("stopping ...")
        try:
            stack.stop()
        finally:
            say("stopped.")
            for sig, handler in previous.items():  # `up` may run inside another program (the tests)
                if handler is not None:  # None: set outside Python, cannot be set back from it
                    signal.signal(sig, handler)
    return 0


def _listed_files(source: str | None, args, *, category: str | None = None,
                  unique_ids: bool = True) -> list | None:
    """Labelled images from `--grocery-split` (under `--data`), a CSV, or a folder laid out as
    <category>/<product>/<image>; None (with a message) when a grocery split has no list."""
    from broker.catalogue import default_data_dir, files_from_csv, files_from_folder, grocery_split

    if args.grocery_split is not None:
        # The same ids and categories (the coarse class) for `ingest` and `eval`, so one split can be ingested and
        # another evaluated against it.
        data = Path(args.data) if args.data else default_data_dir()
        listing = data / "grocery" / f"{args.grocery_split}.txt"
        if not listing.is_file():
            print(f"no grocery split {args.grocery_split!r}: {listing} does not exist", file=sys.stderr)
            return None
        return grocery_split(data, args.grocery_split)
    path = Path(source)
    if path.suffix.lower() == ".csv":
        # eval has no --attribute-schema: its queries' attributes are not stored
        return files_from_csv(path, unique_ids=unique_ids, attribute_kinds=getattr(args, "attribute_schema", None))
    return files_from_folder(path, category=category, unique_ids=unique_ids)


def cmd_ingest(args) -> int:
    from tqdm import tqdm

    from broker.catalogue import checked_items

    if (args.source is None) == (args.grocery_split is None):
        print("error: give an image, folder or CSV, or --grocery-split (not both)", file=sys.stderr)
        return 2
    source = Path(args.source or ".")
    if args.grocery_split is not None or source.suffix.lower() == ".csv" or source.is_dir():
        files = _listed_files(args.source, args, category=args.category)
        if files is None:  # said why; "no images found under ." named a folder nobody gave (review)
            return 1
    else:
        from broker.catalogue import CatalogueFile

        files = [
            CatalogueFile(
                path=source,
                image_id=args.image_id or source.stem,
                product_id=args.product_id or source.stem,
                category=args.category or "default",
            )
        ]
    if not files:
        print(f"no images found under {source}", file=sys.stderr)
        return 1
    # A file that is missing is skipped and listed like one that cannot be decoded (a CSV row naming a missing
    # file stopped the whole ingest, against the docs: review); only when none is there, nothing is sent.
    missing = [f.path for f in files if not f.path.is_file()]
    if len(missing) == len(files):
        print(f"error: none of the {len(files)} image file(s) exists, e.g. {missing[0]}", file=sys.stderr)
        return 1
    from broker.config import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
    from imgsearch.errors import ImgsearchError

    problems: list[tuple[Path, str]] = []
    t0 = time.perf_counter()
    with (
        _client(args, write=True) as client,
        tqdm(total=len(files), unit="img", desc="ingest") as bar,
    ):
        # The broker's limits, read from the variables the broker reads (for a broker started in this environment,
        # as `imgsearch up` does), else its defaults.
        items = checked_items(
            files, problems,
            max_image_bytes=int(os.environ.get("IMGSEARCH_MAX_IMAGE_BYTES") or DEFAULT_MAX_IMAGE_BYTES),
            max_image_pixels=int(os.environ.get("IMGSEARCH_MAX_IMAGE_PIXELS") or DEFAULT_MAX_IMAGE_PIXELS),
            on_file=lambda: bar.update(1))
        failure: ImgsearchError | None = None
        try:
            summary = client.ingest_stream(items, timeout_s=args.timeout_s)
        except ImgsearchError as exc:
            failure = exc
    # Printed once the progress bar is closed: printed inside, it landed on the bar's line and the bar was drawn
    # again below it (review).
    if failure is not None:
        print(f"imgsearch ingest: {failure.code.name}: {failure}", file=sys.stderr)
        hint = _token_hint(failure)
        if hint:  # refused before any image was taken: nothing is stored, and the same command fails the same way
            print(hint, file=sys.stderr)
        else:
            print("  Part of the images may be stored. Running the same command again is safe: an image id is "
                  "stored once, the last write winning.", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - t0
    print(
        f"ingested {summary.ingested} images in {elapsed:.1f}s ({summary.ingested / elapsed:.1f}/s); "
        f"cache entries pending repair: {summary.cache_pending}"
    )
    if problems:
        print(f"skipped {len(problems)} file(s) that could not be read or decoded:", file=sys.stderr)
        for path, reason in problems[:SHOWN_PROBLEMS]:
            print(f"  {path}: {reason}", file=sys.stderr)
        if len(problems) > SHOWN_PROBLEMS:
            print(f"  ... and {len(problems) - SHOWN_PROBLEMS} more", file=sys.stderr)
        return 1
    return 0


def cmd_search(args) -> int:
    if (args.image is None) == (args.image_id is None):
        print("error: give a query image file or --image-id (not both)", file=sys.stderr)
        return 2
    conditions = list(args.filter or [])
    if args.price:
        conditions.append(Condition(field="price", predicate=args.price))
    with _client(args) as client:
        answer = client.search(
            image=None if args.image is None else Path(args.image).read_bytes(),
            image_id=args.image_id,
            top_k=args.k,
            categories=args.category or (),
            filter=Filter(all_of=tuple(conditions)),
            use_duplicate_cache=not args.no_cache,
            distinct_products=args.distinct_products,
            timeout_s=args.timeout_s,
        )
    if args.json:
        print(json.dumps(answer_to_json(answer), indent=2))
    else:
        print_answer(answer, title=Path(args.image).name if args.image else f"like {args.image_id}")
    return 0


def answer_to_json(answer) -> dict:
    return {
        "hits": [
            {
                "image_id": h.image_id,
                "product_id": h.product_id,
                "category": h.category,
                "score": round(h.score, 4),
                "attributes": dict(h.attributes),
            }
            for h in answer.hits
        ],
        "cache": answer.cache.value,
        "from_duplicate_cache": answer.from_duplicate_cache,
        "partial": answer.partial,
        "shards": [
            {"shard": s.shard, "address": s.address, "outcome": s.outcome, "message": s.message}
            for s in answer.shards
        ],
        "timings_ms": {k.removesuffix("_s"): round(v * 1000, 2) for k, v in vars(answer.timings).items()},
    }


def print_answer(answer, *, title: str, expected_product: str | None = None) -> None:
    from rich.table import Table

    t = answer.timings
    source = "duplicate cache" if answer.from_duplicate_cache else "vector index"
    caption = (
        f"from {source} (cache: {answer.cache.value}){' PARTIAL' if answer.partial else ''} | "
        f"total {t.total_s * 1000:.1f} ms: hash {t.decode_hash_s * 1000:.1f}, cache {t.cache_s * 1000:.1f}, "
        f"embed {t.embed_s * 1000:.1f}, fan-out {t.fanout_s * 1000:.1f}, merge {t.merge_s * 1000:.2f}"
    )
    table = Table(title=title, caption=caption, expand=False)
    for col in ("#", "score", "product", "category", "image id", "attributes"):
        # an id is what --image-id and delete take: wrapped when the table is too narrow, never cut with "…"
        table.add_column(col, overflow="fold" if col == "image id" else "ellipsis")
    for rank, h in enumerate(answer.hits, 1):
        mark = "bold green" if expected_product and h.product_id == expected_product else None
        attrs = " ".join(f"{k}={v}" for k, v in sorted(h.attributes.items()))
        table.add_row(
            str(rank),
            f"{h.score:.3f}",
            h.product_id,
            h.category,
            h.image_id,  # whole: it is what --image-id and delete take (its last part alone found nothing)
            attrs,
            style=mark,
        )
    for s in answer.shards:
        if s.outcome != "ok":
            table.add_row("!", "", "", "", f"{s.shard} {s.outcome}", s.message[:60], style="red")
    _console().print(table)


def _console():
    from rich.console import Console

    console = Console()
    # Piped output (make demo | tee) gets a wide table instead of rich's 80-column default.
    return console if console.is_terminal else Console(width=160)


def cmd_delete(args) -> int:
    image_ids = list(args.image_ids)
    if args.from_file:
        # utf-8-sig: a file saved by a Windows editor starts with a byte-order mark, which became part of the
        # first id (silently not deleted, CLI review of 2026-12-05)
        text = sys.stdin.read() if args.from_file == "-" else Path(args.from_file).read_text(encoding="utf-8-sig")
        image_ids += [line.strip().lstrip("\ufeff") for line in text.splitlines() if line.strip()]
    if not image_ids:
        print("error: give image ids, or --from-file with one id per line", file=sys.stderr)
        return 2
    with _client(args, write=True) as client:
        deleted = client.delete(image_ids, timeout_s=args.timeout_s)
    print(f"deleted {deleted} of {len(image_ids)} images (unknown ids are not an error)")
    return 0


def cmd_stats(args) -> int:
    from rich.table import Table

    with _client(args) as client:
        shards = client.stats(timeout_s=args.timeout_s)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "shard": s.shard,
                        "address": s.address,
                        "reachable": s.reachable,
                        "categories": [vars(c) for c in s.categories],
                    }
                    for s in shards
                ],
                indent=2,
            )
        )
        return 0
    table = Table(title="imgsearch shards")
    for col in ("shard", "address", "reachable", "category", "vectors", "index", "trained", "MiB"):
        table.add_column(col)
    for s in shards:
        if not s.categories:
            table.add_row(s.shard, s.address, str(s.reachable), "-", "0", "", "", "")
        for c in s.categories:
            table.add_row(
                s.shard,
                s.address,
                str(s.reachable),
                c.category,
                str(c.vectors),
                c.index_type,
                str(c.trained),
                f"{c.resident_bytes / 2**20:.2f}",
            )
    _console().print(table)
    # Every replica holds a copy of its shard: the catalogue's size is each shard's largest replica, summed (the
    # sum over replicas counted each image once per copy: review).
    largest: dict[str, int] = {}
    for s in shards:
        largest[s.shard] = max(largest.get(s.shard, 0), sum(c.vectors for c in s.categories))
    unreachable = sum(not s.reachable for s in shards)
    print(f"{sum(largest.values())} vectors in {len(largest)} shard(s) of {len(shards)} replica(s)"
          + (f"; {unreachable} replica(s) unreachable, their vectors not counted" if unreachable else ""))
    return 0


def cmd_eval(args) -> int:
    import asyncio

    from broker.client import BrokerClient
    from broker.demo import pick_queries
    from broker.evaluate import evaluate, format_report, summarise

    if (args.queries is None) == (args.grocery_split is None):
        print("error: give a queries CSV or folder, or --grocery-split (not both)", file=sys.stderr)
        return 2
    queries = _listed_files(args.queries, args, unique_ids=False)
    if queries is None:  # said why
        return 1
    if args.limit:
        queries = pick_queries(queries, args.limit)
    if not queries:
        print("no query images found", file=sys.stderr)
        return 1
    conditions = tuple(args.filter or ())
    tls = _tls(args)

    async def run():
        async with BrokerClient(args.broker, **tls) as client:
            return await evaluate(client, queries, top_k=args.k, filter=Filter(all_of=conditions),
                                  own_category=args.own_category, use_duplicate_cache=not args.no_cache,
                                  concurrency=args.concurrency, timeout_s=args.timeout_s, progress=True)

    outcomes = asyncio.run(run())
    report = summarise(outcomes, top_k=args.k)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "report": report.to_json(),
            "queries": [o.to_json() for o in outcomes],
        }, indent=1))
        print(f"per-query results in {args.json}")
    if all(o.error is not None for o in outcomes):
        print("error: every search failed", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args) -> int:
    from broker.demo import run_demo

    return run_demo(data_dir=Path(args.data), shards=args.shards, queries=args.queries, limit=args.limit)


# ---------------------------------------------------------------------- parser
def _add_filter_arguments(parser: argparse.ArgumentParser, scope: str) -> None:
    """--filter and --no-cache, shared by `search` and `eval`."""
    parser.add_argument(
        "--filter",
        action="append",
        type=parse_condition,
        help=f"field=value | field=a|b | field=lo..hi | field=true (repeatable, all must hold){scope}",
    )
    parser.add_argument("--no-cache", action="store_true", help="do not answer from the duplicate cache")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imgsearch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    broker = os.environ.get("IMGSEARCH_BROKER", DEFAULT_BROKER)

    up = sub.add_parser("up", help="run redis, Triton (CPU), shards and the broker in the foreground")
    up.add_argument("--shards", type=int, default=2, help="shards, each of --replicas processes (default: %(default)s)")
    up.add_argument("--replicas", type=int, default=1, help="shard processes per shard (default: %(default)s)")
    up.add_argument("--port", type=int, default=7100, help="broker port (default: %(default)s)")
    up.add_argument("--metrics-port", type=int, default=9100, help="broker /metrics port (default: %(default)s)")
    up.add_argument("--work-dir", help="data and logs (default: a new temporary folder)")
    up.add_argument("--attribute-schema", default=GROCERY_ATTRIBUTE_SCHEMA,
                    help="the shards' attributes, name:text|number|flag,... (default: %(default)s, the shards' own "
                    "default plus the grocery catalogue's packshot flag)")
    up.set_defaults(func=cmd_up)

    ing = sub.add_parser("ingest", help="ingest an image, a folder of images or a CSV")
    ing.add_argument("source", nargs="?", help="image file, folder (<category>/<product>/<image>) or CSV")
    ing.add_argument("--grocery-split", help="the grocery photos of this split (train...), under --data, with the "
                     "categories and ids `eval --grocery-split` uses")
    ing.add_argument("--data", default="", help="data folder holding grocery/ (default ../shared/data)")
    ing.add_argument("--category", type=_non_empty, help="category of every image (folder or single file)")
    ing.add_argument("--product-id", type=_non_empty, help="product id (single file)")
    ing.add_argument("--attribute-schema", type=_attribute_schema, default=os.environ.get(
                         "IMGSEARCH_SHARD_ATTRIBUTE_SCHEMA", GROCERY_ATTRIBUTE_SCHEMA),
                     help="the shards' attributes, name:text|number|flag,... (default: IMGSEARCH_SHARD_ATTRIBUTE_SCHEMA, "
                     "else `up`'s default, %(default)s): a CSV column of one of these names is read as its kind (a "
                     "brand 1664 stays text), a cell that is not refused; other columns by their look")
    ing.add_argument("--image-id", type=_non_empty, help="image id (single file)")
    _add_broker_arguments(ing, broker, timeout_s=3600.0)
    ing.set_defaults(func=cmd_ingest)

    s = sub.add_parser("search", help="search with a query image, or like a catalogue image (--image-id)")
    s.add_argument("image", nargs="?", help="query image file")
    s.add_argument(
        "--image-id", type=_non_empty,
        help="search like this catalogue image (its stored embedding; the image itself is left out)",
    )
    s.add_argument("--category", action="append", type=_non_empty, help="restrict to a category (repeatable)")
    _add_filter_arguments(s, "")
    s.add_argument("--price", type=parse_range, help="price range lo..hi")
    s.add_argument("-k", type=int, default=10, help="hits (products with --distinct-products) to answer (default: %(default)s)")
    s.add_argument(
        "--distinct-products",
        action="store_true",
        help="one hit per product (its best image); -k counts products",
    )
    s.add_argument("--json", action="store_true")
    _add_broker_arguments(s, broker, timeout_s=10.0)
    s.set_defaults(func=cmd_search)

    de = sub.add_parser("delete", help="remove catalogue images by id (from every shard and the cache)")
    de.add_argument("image_ids", nargs="*", help="image ids")
    de.add_argument("--from-file", help="a file with one image id per line ('-': standard input)")
    _add_broker_arguments(de, broker, timeout_s=600.0)
    de.set_defaults(func=cmd_delete)

    st = sub.add_parser("stats", help="vectors per shard and category")
    st.add_argument("--json", action="store_true")
    _add_broker_arguments(st, broker, timeout_s=10.0)
    st.set_defaults(func=cmd_stats)

    ev = sub.add_parser("eval", help="Recall@1/5/10, MRR and latency of the broker on labelled query photos")
    ev.add_argument("queries", nargs="?", help="CSV (image, product_id, category) or folder "
                    "(<category>/<product>/<image>) of query photos")
    ev.add_argument("--grocery-split", help="the grocery photos of this split as queries (val, or test where "
                    "there is a test.txt), under --data")
    ev.add_argument("--data", default="", help="data folder holding grocery/ (default ../shared/data)")
    ev.add_argument("-k", type=int, default=10, help="products per answer (Recall@1, 5, 10 up to this, and at this k; default: %(default)s)")
    ev.add_argument("--own-category", action="store_true", help="search each query in its own category only")
    _add_filter_arguments(ev, ", on every search (e.g. packshot=true)")
    ev.add_argument("--concurrency", type=int, default=1, help="searches in flight")
    ev.add_argument("--limit", type=int, default=0, help="only this many queries, spread evenly (0: all)")
    ev.add_argument("--json", help="write the report and every query's rank to this file")
    _add_broker_arguments(ev, broker, timeout_s=10.0, timeout_help="per search (default: %(default)s)")
    ev.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="bring a stack up, ingest the grocery photos, run queries, shut down")
    d.add_argument("--data", default=None, help="data folder holding grocery/ (default ../shared/data)")
    d.add_argument("--shards", type=int, default=2)
    d.add_argument("--queries", type=int, default=6, help="val photos to search with")
    d.add_argument("--limit", type=int, default=0, help="ingest only this many train photos (0: all)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "data", "unset") is None:
        from broker.catalogue import default_data_dir

        args.data = str(default_data_dir())
    from imgsearch.errors import ImgsearchError

    try:
        code = int(args.func(args) or 0)
        # Output still buffered would be written at interpreter exit, outside this try: a reader that left
        # (`| head`) then gave "Exception ignored ... BrokenPipeError" and exit status 120 (review).
        sys.stdout.flush()
        return code
    except ImgsearchError as exc:
        print(f"imgsearch {args.command}: {exc.code.name}: {exc}", file=sys.stderr)
        hint = _token_hint(exc)
        if hint:
            print(hint, file=sys.stderr)
        return 1
    except BrokenPipeError:  # `imgsearch search --json | head`: the reader left; not an error of ours to print
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # else Python's exit flush fails on the closed pipe again
        return 141  # 128 + SIGPIPE, as a shell tool killed by it
    except (OSError, ValueError) as exc:  # unreadable/missing files, bad CSVs, undecodable text
        print(f"imgsearch {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a traceback said nothing useful (`up` handles its own)
        hint = " Running the same command again is safe." if args.command == "ingest" else ""
        print(f"imgsearch {args.command}: interrupted.{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
