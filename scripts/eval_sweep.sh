#!/usr/bin/env bash
# The evaluation sweep behind docs/results.md: Q-Filters calibrated on State of the Union addresses
# before 1950, evaluated on those from 2000 on (held out), every policy, then the plots.
#   scripts/eval_sweep.sh            default sweep   (results/<model>/ and <model>-8k/, plots in docs/img/)
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
common=(-m "$model" --filters "$filters" "${args[@]}")
if [ $quick = 1 ]; then
  "$qf" eval all "${common[@]}" -o "$out"
else
  # The sweep of docs/results.md, sized for ~30-40 minutes on 2 cores: perplexity at budgets
  # 128-1024, the needle at 1k-4k tokens x 11 depths and at 8k x 5 depths (an 8k prefill is
  # the costliest cell), attention fidelity.
  "$qf" eval ppl "${common[@]}" -o "$out"
  "$qf" eval niah "${common[@]}" -o "$out" --lengths 1024,2048,4096
  "$qf" eval niah "${common[@]}" -o "$out-8k" --lengths 8192 --depths 5
  "$qf" eval fidelity "${common[@]}" -o "$out"
fi
echo "sweep: $(( $(date +%s) - start )) s, results in $out" >&2
python3 scripts/plot_results.py "$out" --out "$img" --markdown "$out/tables.md"
if [ $quick = 0 ]; then
  python3 scripts/plot_results.py "$out-8k" --out "$img/8k" --markdown "$out-8k/tables.md"
fi
