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
if [ -x "$bin" ] && [ "$bin" -nt "$src" ] && [ "$bin" -nt "$0" ]; then
  exit 0
fi
mkdir -p "$out"
# libllama and libggml carry RUNPATH $ORIGIN, so one rpath to the lib dir finds the whole set;
# the per-CPU libggml-cpu-*.so plugins are dlopen'ed at run time from that same directory.
g++ -O2 -std=c++17 -Wall -Wextra -o "$bin.tmp" "$src" \
  -I "$llama/include" \
  -L "$llama/lib" -l:libllama.v0.5.0.so -l:libggml.v0.5.0.so -l:libggml-base.so \
  -Wl,-rpath,"$llama/lib" -ldl
mv "$bin.tmp" "$bin"
echo "built $bin" >&2
