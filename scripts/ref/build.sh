#!/usr/bin/env bash
# Builds build-ref/llama_ref, the llama.cpp reference tool (scripts/ref/llama_ref.cpp), against the
# prebuilt libllama in third_party/llama.cpp (fetched by scripts/fetch_llamacpp.sh if missing).
# Not part of the CMake build: CI never needs llama.cpp. Rebuilds only when the source changed.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
llama="$root/third_party/llama.cpp"
out="$root/build-ref"
src="$root/scripts/ref/llama_ref.cpp"
bin="$out/llama_ref"

if [ ! -f "$llama/lib/libllama.v0.5.0.so" ] || [ ! -f "$llama/include/llama.h" ]; then
  "$root/scripts/fetch_llamacpp.sh"
fi
mkdir -p "$out"
# ggml_matmul_bench (per-type matmul speed through libggml, scripts/bench_kernels_vs_ggml.py).
gsrc="$root/scripts/ref/ggml_matmul_bench.cpp"
gbin="$out/ggml_matmul_bench"
if ! { [ -x "$gbin" ] && [ "$gbin" -nt "$gsrc" ] && [ "$gbin" -nt "$0" ]; }; then
  g++ -O2 -std=c++17 -Wall -Wextra -o "$gbin.tmp" "$gsrc" -I "$llama/include" \
    -L "$llama/lib" -l:libggml.v0.5.0.so -l:libggml-base.so -Wl,-rpath,'$ORIGIN/../third_party/llama.cpp/lib' -ldl
  mv "$gbin.tmp" "$gbin"
  echo "built $gbin" >&2
fi
# quantize_model (re-quantizes GGUF files with llama_model_quantize, scripts/requantize.sh).
qsrc="$root/scripts/ref/quantize_model.cpp"
qbin="$out/quantize_model"
if ! { [ -x "$qbin" ] && [ "$qbin" -nt "$qsrc" ] && [ "$qbin" -nt "$0" ]; }; then
  g++ -O2 -std=c++17 -Wall -Wextra -o "$qbin.tmp" "$qsrc" -I "$llama/include" \
    -L "$llama/lib" -l:libllama.v0.5.0.so -l:libggml.v0.5.0.so -l:libggml-base.so -Wl,-rpath,'$ORIGIN/../third_party/llama.cpp/lib' -ldl
  mv "$qbin.tmp" "$qbin"
  echo "built $qbin" >&2
fi
if [ -x "$bin" ] && [ "$bin" -nt "$src" ] && [ "$bin" -nt "$0" ]; then
  exit 0
fi
# libllama and libggml carry RUNPATH $ORIGIN, so one rpath to the lib dir finds the whole set;
# the per-CPU libggml-cpu-*.so plugins are dlopen'ed at run time from that same directory.
g++ -O2 -std=c++17 -Wall -Wextra -o "$bin.tmp" "$src" \
  -I "$llama/include" \
  -L "$llama/lib" -l:libllama.v0.5.0.so -l:libggml.v0.5.0.so -l:libggml-base.so \
  -Wl,-rpath,'$ORIGIN/../third_party/llama.cpp/lib' -ldl
mv "$bin.tmp" "$bin"
echo "built $bin" >&2
