#!/usr/bin/env bash
# The main job on a fresh machine: set everything up, calibrate Q-Filters for SmolLM2 (once),
# and generate with a compressed KV cache.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
filters=models/SmolLM2-135M-Instruct.qfilters.safetensors
[ -f "$filters" ] || build/qf calibrate -m "$model" -o "$filters"
build/qf run -m "$model" \
  -p "<|im_start|>user
Write a short story about a lighthouse keeper.<|im_end|>
<|im_start|>assistant
" -n 256 --kv-policy qfilters --filters "$filters" --kv-budget 128 --kv-window 32
