#!/usr/bin/env bash
# The evaluation sweep behind docs/results.md: Q-Filters calibrated on State of the Union addresses
# before 1950, evaluated on those from 2000 on (held out), every policy, then the plots.
#   scripts/eval_sweep.sh            default sweep   (results/<model>/,       plots in docs/img/)
#   scripts/eval_sweep.sh --quick    a few minutes   (results/<model>-quick/, plots in results/<model>-quick/img/)
# Extra arguments go to every `qf eval` call (e.g. -t 2). Interrupted? Run it again: finished cells
# are kept (results/*/<eval>.jsonl) and only the missing ones are computed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
qf=${QF:-build/qf}
model=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
name=$(basename "$model" .gguf)
quick=0
args=()
for a in "$@"; do
  if [ "$a" = --quick ]; then quick=1; else args+=("$a"); fi
done
[ -x "$qf" ] || { echo "no $qf: build first (cmake -S . -B build -G Ninja && cmake --build build)" >&2; exit 1; }
[ -f "$model" ] || { echo "no $model: run scripts/fetch_model.sh" >&2; exit 1; }
[ -d data/sotu ] || { echo "no data/sotu: run scripts/fetch_text.sh" >&2; exit 1; }

out=results/$name
img=docs/img
if [ $quick = 1 ]; then out=results/$name-quick; img=$out/img; args+=(--quick); fi
mkdir -p "$out"

filters=${FILTERS:-results/$name.qfilters.safetensors}
if [ ! -f "$filters" ]; then
  # Calibration text: addresses up to 1949 only (qf calibrate's default --max-year); the
  # evaluation uses those from 2000 on.
  echo "calibrating $filters on data/sotu (addresses before 1950)" >&2
  "$qf" calibrate -m "$model" --text data/sotu --max-year 1949 -o "$filters"
fi

start=$(date +%s)
# Every evaluation with its defaults (the sweep of docs/results.md): perplexity at budgets
# 128-1024 on two 2,048-token documents, the needle at 1k-8k tokens x 11 depths x 4
# compressions, attention fidelity on two documents. About 30 minutes on 2 cores.
"$qf" eval all -m "$model" --filters "$filters" -o "$out" "${args[@]}"
echo "sweep: $(( $(date +%s) - start )) s, results in $out" >&2
python3 scripts/plot_results.py "$out" --out "$img" --markdown "$out/tables.md"
