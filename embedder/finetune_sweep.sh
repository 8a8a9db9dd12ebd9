#!/usr/bin/env bash
# Fine-tuning more of the backbone: the recipes of "Fine-tuning the whole backbone" in docs/embedder-eval.md,
# each trained on the selection splits (training photos only) and on all training photos, several at a time.
#
#   bash embedder/finetune_sweep.sh GROCERY_DIR OUT_DIR [PARALLEL_RUNS] [WORKERS_PER_RUN]
#
# Written for a GPU machine (one H200 ran it); on a CPU it runs too, for hours. Every run is a plain
# `imgsearch-embed train` (python -m embedder.train), and its selection-split figures come from
# `imgsearch-embed eval --checkpoint` (python -m embedder.evaluate); val is never read here. OUT_DIR gets one
# folder per run (metrics.json, eval JSONs, last.pt) and results.json with every run's figures.
set -euo pipefail
grocery=${1:?grocery dataset folder}
out=${2:?output folder}
parallel=${3:-4}
workers=${4:-4}
# The project's .venv (make install) when there is one, else python3 (which then needs the train extra).
default_python=python3
[ -x .venv/bin/python ] && default_python=.venv/bin/python
python=${PYTHON:-$default_python}
extra=${EXTRA:-}  # appended to every run's options, e.g. EXTRA="--max-steps 2" for a smoke run
mkdir -p "$out"
"$python" -m embedder.selection_sets --grocery "$grocery" --out "$out/sets" >/dev/null

shipped="--feature-views 4 --trainable-blocks 1 --epochs 12"
whole="--feature-views 0 --trainable-blocks 16 --epochs 30 --workers $workers"
# name | training data | recipe
runs=(
  "early-shipped|early|$shipped"
  "early-all-lr1e-4|early|$whole --backbone-lr 1e-4"
  "early-all-lr3e-4|early|$whole --backbone-lr 3e-4"
  "early-top6-lr3e-4|early|--feature-views 0 --trainable-blocks 6 --epochs 30 --workers $workers --backbone-lr 3e-4"
  "open-all-lr1e-4|open|$whole --backbone-lr 1e-4"
  "open-all-lr3e-4|open|$whole --backbone-lr 3e-4"
  "open-top6-lr3e-4|open|--feature-views 0 --trainable-blocks 6 --epochs 30 --workers $workers --backbone-lr 3e-4"
  "full-all-lr1e-4|full|$whole --backbone-lr 1e-4"
  "full-all-lr3e-4|full|$whole --backbone-lr 3e-4"
  "full-top6-lr3e-4|full|--feature-views 0 --trainable-blocks 6 --epochs 30 --workers $workers --backbone-lr 3e-4"
)

one_run() {
  local name=${1%%|*} rest=${1#*|}
  local split=${rest%%|*} recipe=${rest#*|}
  local dir="$out/$name" evaluate=("$python" -m embedder.evaluate --device "$device" --threads 2)
  mkdir -p "$dir"
  case $split in
    early) data=(--catalogue "$out/sets/early-a-plus-iconic4.csv" --val-fraction 0) ;;
    open) data=(--catalogue "$out/sets/train-plus-iconic4.csv") ;;  # holds the 8 products out (seed 0)
    full) data=(--grocery "$grocery" --iconic-copies 4 --val-fraction 0) ;;
  esac
  # shellcheck disable=SC2086  # the recipe is a list of options
  "$python" -m embedder.train "${data[@]}" --out "$dir" --device "$device" $recipe $extra >"$dir/train.log" 2>&1
  case $split in
    early)
      "${evaluate[@]}" --checkpoint "$dir/last.pt" --queries "$out/sets/late-b.csv" --gallery "$out/sets/iconic.csv" \
        --out "$dir/eval-packshots.json" >>"$dir/eval.log" 2>&1
      "${evaluate[@]}" --checkpoint "$dir/last.pt" --queries "$out/sets/late-b.csv" --gallery "$out/sets/early-a.csv" \
        --out "$dir/eval-photos.json" >>"$dir/eval.log" 2>&1 ;;
    open)
      "${evaluate[@]}" --checkpoint "$dir/last.pt" --queries "$out/sets/heldout-train-photos.csv" \
        --gallery "$out/sets/iconic.csv" --out "$dir/eval-packshots.json" >>"$dir/eval.log" 2>&1
      "${evaluate[@]}" --checkpoint "$dir/last.pt" --queries "$out/sets/heldout-train-photos.csv" \
        --out "$dir/eval-photos.json" >>"$dir/eval.log" 2>&1 ;;
  esac
  rm -f "$dir/best.pt"  # without held-out products it is last.pt again
  echo "$(date -u +%H:%M:%SZ) done $name"
}

device=$("$python" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
export -f one_run
export out python device grocery extra
printf '%s\n' "${runs[@]}" | xargs -d '\n' -P "$parallel" -I{} bash -c 'one_run "$@"' _ {} \
  || echo "some runs failed: see their train.log / eval.log"

"$python" - "$out" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
summary = {}
for run in sorted(p for p in out.iterdir() if (p / "metrics.json").exists()):
    metrics = json.loads((run / "metrics.json").read_text())
    entry = {"total_seconds": metrics.get("total_seconds"), "device": metrics.get("device"),
             "train_images": metrics.get("train_images"), "last_epoch": metrics["epochs"][-1]}
    for kind in ("packshots", "photos"):
        path = run / f"eval-{kind}.json"
        if path.exists():
            (result,) = json.loads(path.read_text())["results"].values()
            entry[kind] = {k: result[k] for k in ("queries", "gallery", "recall@1", "recall@5", "recall@10",
                                                  "map@r")}
    summary[run.name] = entry
(out / "results.json").write_text(json.dumps(summary, indent=1))
for name, entry in summary.items():
    figures = "  ".join(f"{kind} R@1 {entry[kind]['recall@1']:.3f} MAP@R {entry[kind]['map@r']:.3f}"
                        for kind in ("packshots", "photos") if kind in entry)
    print(f"{name:22s} {entry['total_seconds']:>7} s  {figures}")
EOF
