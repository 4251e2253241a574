#!/usr/bin/env bash
# The comparison of docs/results.md section 5 (issue 15): filters calibrated with query statistics
# before the rotary embedding (the default recipe: text sampled from the model, plus --stats-rank 8),
# then needles at x4 and x8 and streaming perplexity at B = 128 and 256, one thread each, niced.
#   scripts/eval_issue15.sh              both evaluations, one after the other
#   scripts/eval_issue15.sh niah|ppl     one of them
#   scripts/eval_issue15.sh adaptive     the adaptive filters (qfilters_adaptive): the needle sweep
#                                        over blend / horizon, the full needle protocol and perplexity
#                                        (docs/results.md section 5, "Adaptive filters"; ~30 min quiet)
#   scripts/eval_issue15.sh keydiff      KeyDiff: the needle protocol beside same-build baselines, then
#                                        perplexity (docs/results.md section 5, "KeyDiff"; ~10 min quiet)
#   scripts/eval_issue15.sh max          qfilters_max: the needle protocol on seeds 42-47 beside same-build
#                                        baselines, 4,096-token needles, perplexity, paired comparisons
#                                        (docs/results.md section 5, "One filter per query head"; ~20 min quiet)
#   scripts/eval_issue15.sh layers       per-layer budgets at equal memory (--layer-weights spread and a
#                                        middle-layer profile) on seeds 42-44 and held-out 45-47 (~25 min)
#   scripts/eval_issue15.sh memory       qfilters_max's memory: the --filter-decay sweep, then perplexity at
#                                        B = 128-1,024 on the development and held-out documents, and Gemma 3
#                                        (docs/results.md section 5, "qfilters_max remembers"; ~60 min quiet)
# Resumable: finished cells are kept in results/issue15-*/<eval>.jsonl.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
qf=${QF:-build/qf}
M=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
F=${FILTERS:-results/issue15/SmolLM2-135M-Instruct.qstats.safetensors}
what=${1:-all}
[ -x "$qf" ] || { echo "no $qf: build first" >&2; exit 1; }
mkdir -p "$(dirname "$F")"
if [ ! -f "$F" ]; then
  # The recipe of models/SmolLM2-135M-Instruct.qfilters.safetensors (same filters, bit for bit, when
  # the seed and sampling agree: --compare reports the cosine), plus the query statistics.
  nice -n 10 "$qf" calibrate -m "$M" -o "$F" --stats-rank 8 -t 1 \
    --compare models/SmolLM2-135M-Instruct.qfilters.safetensors
fi
P=none,qfilters,tova,h2o,expected_attention,qfilters_rope,ea_calibrated
P=$P,qfilters+layer,expected_attention+layer,qfilters_rope+layer,ea_calibrated+layer
if [ "$what" = all ] || [ "$what" = niah ]; then
  nice -n 10 "$qf" eval niah -m "$M" --filters "$F" -o results/issue15-niah --lengths 1024,2048 --depths 5 \
    --compressions 4,8 --seeds 42,43,44 --digits 7 --skip-layers 2 --policies "$P" -t 1 --no-progress
fi
if [ "$what" = all ] || [ "$what" = ppl ]; then
  nice -n 10 "$qf" eval ppl -m "$M" --filters "$F" -o results/issue15-ppl --docs 8 --tokens 1024 \
    --budgets 128,256 --window 64 --policies none,streaming,h2o,tova,qfilters,qfilters_rope,ea_calibrated,ea_calibrated+layer \
    -t 1 --no-progress
fi
if [ "$what" = adaptive ]; then
  # Choosing blend and horizon: 1,024 tokens, x4, 3 seeds (15 prompts) per setting.
  for bh in 1:1 1:4 1:16 0.9:1 0.5:1; do
    b=${bh%:*} h=${bh#*:}
    nice -n 10 "$qf" eval niah -m "$M" --filters "$F" -o "results/issue15-adaptive-sweep-b$b-h$h" --lengths 1024 \
      --depths 5 --compressions 4 --seeds 42,43,44 --digits 7 --skip-layers 2 -t 1 --no-progress \
      --policies qfilters_adaptive,qfilters_adaptive+layer --filter-blend "$b" --filter-horizon "$h"
  done
  # The full needle protocol (as "niah" above) for the defaults (blend 1, horizon 1) and blend 0.9.
  for b in 1 0.9; do
    nice -n 10 "$qf" eval niah -m "$M" --filters "$F" -o "results/issue15-adaptive-niah-b$b" --lengths 1024,2048 \
      --depths 5 --compressions 4,8 --seeds 42,43,44 --digits 7 --skip-layers 2 -t 1 --no-progress \
      --policies qfilters_adaptive,qfilters_adaptive+layer --filter-blend "$b" --filter-horizon 1
  done
  nice -n 10 "$qf" eval ppl -m "$M" --filters "$F" -o results/issue15-adaptive-ppl --docs 8 --tokens 1024 \
    --budgets 128,256 --window 64 --policies none,streaming,h2o,qfilters_adaptive,qfilters_adaptive+layer \
    --filter-blend 1 --filter-horizon 1 -t 1 --no-progress
  # Paired against the baselines of "niah" above (the same prompts).
  for p in tova ea_calibrated+layer qfilters_rope+layer; do
    scripts/niah_paired.py results/issue15-adaptive-niah-b1/niah.jsonl:qfilters_adaptive+layer \
      results/issue15-niah/niah.jsonl:$p
  done
fi
if [ "$what" = keydiff ]; then
  for run in keydiff:keydiff,keydiff+layer base:qfilters,ea_calibrated+layer,qfilters_adaptive+layer,qfilters+layer; do
    nice -n 10 "$qf" eval niah -m "$M" --filters "$F" -o "results/issue15-${run%%:*}-niah" --lengths 1024,2048 \
      --depths 5 --compressions 4,8 --seeds 42,43,44 --digits 7 --skip-layers 2 -t 1 --no-progress --policies "${run#*:}"
  done
  nice -n 10 "$qf" eval ppl -m "$M" --filters "$F" -o results/issue15-keydiff-ppl --docs 8 --tokens 1024 \
    --budgets 128,256 --window 64 --policies none,streaming,h2o,keydiff,keydiff+layer -t 1 --no-progress
  scripts/niah_paired.py results/issue15-keydiff-niah/niah.jsonl:keydiff results/issue15-base-niah/niah.jsonl:qfilters
  scripts/niah_paired.py results/issue15-keydiff-niah/niah.jsonl:keydiff+layer results/issue15-base-niah/niah.jsonl:ea_calibrated+layer
fi
if [ "$what" = layers ]; then
  mid3=1,1,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,1,1,1,1,1,1,1,1,1,1  # SmolLM2's 30 layers
  for run in mid3:42,43,44:$mid3 spread:42,43,44:spread uniform:45,46,47: spread:45,46,47:spread; do
    IFS=: read -r name seeds weights <<< "$run"
    nice -n 10 "$qf" eval niah -m "$M" --filters "$F" -o "results/issue15-layers-$name-${seeds//,/}" --lengths 1024,2048 \
      --depths 5 --compressions 4,8 --seeds "$seeds" --digits 7 --skip-layers 2 -t 1 --no-progress \
      --policies tova,ea_calibrated+layer,qfilters_adaptive+layer ${weights:+--layer-weights "$weights"}
  done
  nice -n 10 "$qf" eval ppl -m "$M" --filters "$F" -o results/issue15-layers-ppl-spread --docs 8 --tokens 1024 \
    --budgets 128,256 --window 64 --policies none,streaming,h2o,qfilters_adaptive --layer-weights spread -t 1 --no-progress
fi
if [ "$what" = max ]; then
  niah() {  # OUT SEEDS LENGTHS POLICIES
    nice -n 10 "$qf" eval niah -m "$M" --filters "$F" -o "results/issue15-max-$1" --lengths "$3" --depths 5 \
      --compressions 4,8 --seeds "$2" --digits 7 --skip-layers 2 -t 1 --no-progress --policies "$4"
  }
  base=none,tova,qfilters_max,ea_calibrated+layer,qfilters_adaptive+layer,qfilters+layer
  niah niah 42,43,44,45,46,47 1024,2048 "$base"
  niah 4k 42,43,44 4096 none,tova,qfilters_max,ea_calibrated+layer
  for b in 0.9 0.7; do
    nice -n 10 "$qf" eval niah -m "$M" --filters "$F" -o "results/issue15-max-blend$b" --lengths 1024,2048 --depths 5 \
      --compressions 4,8 --seeds 42,43,44 --digits 7 --skip-layers 2 -t 1 --no-progress --policies qfilters_max \
      --filter-blend "$b"
  done
  nice -n 10 "$qf" eval ppl -m "$M" --filters "$F" -o results/issue15-max-ppl --docs 8 --tokens 1024 \
    --budgets 128,256 --window 64 --policies none,streaming,h2o,tova,qfilters,qfilters_max -t 1 --no-progress
  for p in tova ea_calibrated+layer qfilters_adaptive+layer; do
    scripts/niah_paired.py results/issue15-max-niah/niah.jsonl:qfilters_max results/issue15-max-niah/niah.jsonl:$p
  done
  scripts/niah_paired.py results/issue15-max-4k/niah.jsonl:qfilters_max results/issue15-max-4k/niah.jsonl:tova --lengths 4096
  # Gemma 3 (scripts/fetch_model.sh gemma3 fetches it; its filters with query statistics are calibrated once)
  G=models/gemma-3-270m-q4_k_m.gguf GF=models/gemma-3-270m-q4_k_m.qstats.safetensors
  if [ -f "$G" ]; then
    [ -f "$GF" ] || nice -n 10 "$qf" calibrate -m "$G" -o "$GF" --stats-rank 8 -t 1
    nice -n 10 "$qf" eval ppl -m "$G" --filters "$GF" -o results/issue15-max-gemma-ppl --docs 8 --tokens 1024 \
      --budgets 128,256 --window 64 --policies none,streaming,h2o,tova,qfilters,qfilters_max -t 1 --no-progress
    nice -n 10 "$qf" eval niah -m "$G" --filters "$GF" -o results/issue15-max-gemma-niah --lengths 1024,2048 --depths 5 \
      --compressions 4,8 --seeds 42,43,44 --digits 7 --skip-layers 2 -t 1 --no-progress \
      --policies none,tova,qfilters_max,ea_calibrated+layer,qfilters
  fi
fi
if [ "$what" = memory ]; then
  for decay in 0.01 0.03 0.1 inf; do
    nice -n 10 "$qf" eval ppl -m "$M" --filters "$F" -o "results/issue15-memory-decay$decay" --docs 8 --tokens 1024 \
      --budgets 128,256 --window 64 --policies qfilters_max --filter-decay "$decay" -t 1 --no-progress
  done
  P=none,streaming,h2o,tova,qfilters,qfilters_max
  nice -n 10 "$qf" eval ppl -m "$M" --filters "$F" -o results/issue15-memory-dev --docs 8 --tokens 1024 \
    --budgets 128,256,512 --window 64 --policies "$P" -t 1 --no-progress
  # Held out: addresses of 1950-1999 (calibration reads earlier ones, development later ones).
  nice -n 10 "$qf" eval ppl -m "$M" --filters "$F" -o results/issue15-memory-held --docs 8 --tokens 1024 \
    --budgets 128,256,512 --window 64 --policies "$P" --min-year 1950 --max-year 1999 -t 1 --no-progress
  # B = 1,024 needs documents longer than the budget: 2,048 tokens.
  nice -n 10 "$qf" eval ppl -m "$M" --filters "$F" -o results/issue15-memory-dev-1024 --docs 8 --tokens 2048 \
    --budgets 1024 --window 64 --policies "$P" -t 1 --no-progress
  nice -n 10 "$qf" eval ppl -m "$M" --filters "$F" -o results/issue15-memory-held-1024 --docs 8 --tokens 2048 \
    --budgets 1024 --window 64 --policies "$P" --min-year 1950 --max-year 1999 -t 1 --no-progress
  G=models/gemma-3-270m-q4_k_m.gguf GF=models/gemma-3-270m-q4_k_m.qstats.safetensors
  if [ -f "$G" ]; then
    [ -f "$GF" ] || nice -n 10 "$qf" calibrate -m "$G" -o "$GF" --stats-rank 8 -t 1
    nice -n 10 "$qf" eval ppl -m "$G" --filters "$GF" -o results/issue15-memory-gemma --docs 8 --tokens 1024 \
      --budgets 128,256 --window 64 --policies none,streaming,h2o,qfilters_max -t 1 --no-progress
  fi
fi
