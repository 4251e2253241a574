#!/usr/bin/env bash
# Writes K-quant (or other) versions of SmolLM2-135M-Instruct into the git-ignored models/
# folder with llama.cpp's llama_model_quantize (scripts/ref/quantize_model.cpp), for qf's
# end-to-end benchmarks:  scripts/requantize.sh [FTYPE ...]   (default: Q4_K_M)
# e.g. scripts/requantize.sh Q4_K_M Q5_K_M Q6_K -> models/SmolLM2-135M-Instruct.<FTYPE>.gguf
# The source is the Q4_1 file (re-quantized: right for speed, not for quality comparisons).
# SmolLM2's rows of 576 are not whole 256-element super-blocks, so llama.cpp falls back to
# 32-element types (Q5_0 / Q5_1 / Q8_0) for those tensors: the files are K-quant mixes.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
src="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$src" ] || "$root/scripts/fetch_model.sh"
"$root/scripts/ref/build.sh"
for ftype in "${@:-Q4_K_M}"; do
  out="$root/models/SmolLM2-135M-Instruct.$ftype.gguf"
  "$root/build-ref/quantize_model" "$src" "$out.tmp" "$ftype" > /dev/null 2> "$out.log" || {
    cat "$out.log" >&2
    exit 1
  }
  mv "$out.tmp" "$out"
  rm -f "$out.log"
  echo "wrote $out"
done
