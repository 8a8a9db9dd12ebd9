"""`imgsearch-embed`: train, evaluate, export and serve the embedding model.

Each subcommand lives in its own module with its own argument parser; this only dispatches.
"""

from __future__ import annotations

import csv
import importlib
import os
import pickle
import sys

from imgsearch.errors import ImgsearchError

SUBCOMMANDS = {
    "train": ("embedder.train", "train the ArcFace model on a catalogue (CSV or folders per product)"),
    "eval": ("embedder.evaluate", "Recall@K, MAP@R and a same-product threshold sweep"),
    "export": ("embedder.export", "export a checkpoint to ONNX (dynamic batch axis)"),
    "triton-repo": ("embedder.triton_repo", "write a Triton model repository for a model"),
    "serve": ("embedder.triton_server", "run a Triton Inference Server hosting the model"),
    "bench": ("embedder.bench", "embedding throughput: PyTorch, ONNX Runtime, Triton"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"imgsearch-embed: unknown command {argv[0]!r}", file=sys.stderr)
        print("usage: imgsearch-embed {" + ",".join(SUBCOMMANDS) + "} [options]   (COMMAND --help for its options)\n")
        for name, (_, text) in SUBCOMMANDS.items():
            print(f"  {name:12s} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    try:
        return int(module.main(argv[1:]) or 0)
    except BrokenPipeError:  # `imgsearch-embed eval | head`
        return 1
    except (OSError, ValueError, csv.Error, ImgsearchError, pickle.UnpicklingError) as exc:
        # What a user's input causes (a file that is missing, unreadable or does not decode, a malformed catalogue,
        # JSON or split list, a file that is not a checkpoint): one line, not a traceback (review). Our own errors
        # (InputFileError...) name the file; others also say their type, since they may be a bug of ours
        # (IMGSEARCH_DEBUG=1 shows the traceback).
        if os.environ.get("IMGSEARCH_DEBUG"):
            raise
        told = str(exc) if isinstance(exc, ImgsearchError | OSError) else f"{type(exc).__name__}: {exc}"
        print(f"imgsearch-embed {argv[0]}: error: {told}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
