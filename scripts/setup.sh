#!/usr/bin/env bash
# Prepares a fresh machine, idempotently: Debian packages, Python packages, the default model
# (SmolLM2-135M-Instruct Q4_1) and Gemma 3 270M Q4_K_M, the State of the Union text, and a Release
# build in build/.
#   scripts/setup.sh            everything
#   scripts/setup.sh --deps     packages, model and text only (no build)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

apt_packages=(g++ cmake ninja-build pkg-config libhwy-dev libeigen3-dev nlohmann-json3-dev libcli11-dev
              libgtest-dev libbenchmark-dev libcpp-httplib-dev python3-pip python3-dev python3-venv ccache
              nodejs npm
              clang-19 libfuzzer-19-dev)  # clang + libFuzzer: scripts/fuzz.sh
missing=()
for p in "${apt_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
# nodejs/npm may come from outside Debian (e.g. a preinstalled Node): only the commands matter.
if command -v npm >/dev/null 2>&1; then
  missing=("${missing[@]/nodejs}"); missing=("${missing[@]/npm}")
fi
missing=($(printf '%s\n' "${missing[@]}" | grep -v '^$' || true))
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! python3 -c "import numpy, gguf, safetensors, matplotlib, openai, nanobind, scikit_build_core, pytest" 2>/dev/null; then
  echo "installing Python packages (scripts/requirements.txt)" >&2
  python3 -m pip install -q -r scripts/requirements.txt
fi

scripts/fetch_model.sh
scripts/fetch_model.sh gemma3
scripts/fetch_text.sh

if [ "${1:-}" != "--deps" ]; then
  cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build build -j"$(nproc)"
fi
