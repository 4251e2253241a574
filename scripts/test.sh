#!/usr/bin/env bash
# Runs every test: sets up what is missing, writes the Python fixtures, builds, and runs ctest
# (C++ unit tests against numpy references, llama.cpp goldens on SmolLM2, CLI tests), then the
# Python package's tests (pip install . into a virtual environment, pytest bindings/python/tests).
#   QF_SANITIZE=1 scripts/test.sh   the C++ suites under AddressSanitizer + UBSan (build-asan/): all
#                                   but the end-to-end runs of the real models (below), which
#                                   take most of the plain run's time and 3-10x more under ASan
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh --deps
python3 tests/python/make_fixtures.py --out tests/fixtures
# Gemma 3 270M with its K-quant and Q5_0 tensors expanded to F32 (tests/gemma3_test.cpp), made
# once; QF_GEMMA3_MODEL=models/gemma-3-270m-q4_k_m.gguf tests the original file instead.
if [ ! -f models/gemma-3-270m-deq.gguf ]; then
  scripts/fetch_model.sh gemma3
  python3 scripts/dequantize_gguf.py models/gemma-3-270m-q4_k_m.gguf models/gemma-3-270m-deq.gguf
fi

build=build
flags=(-DCMAKE_BUILD_TYPE=Release)
skip=()
if [ "${QF_SANITIZE:-0}" = 1 ]; then
  build=build-asan
  flags=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DQF_SANITIZE=ON -DQF_BUILD_BENCH=OFF)
  # Left to the plain run: llama.cpp goldens on SmolLM2 and Gemma 3 (teacher forcing, greedy
  # generation, whole-corpus tokenization), calibration and evaluation through the CLI, the
  # Python checks. The parsers, kernels, cache, policies, sessions, server protocol, CLI errors
  # and fuzz replays run here, on the fixtures and SmolLM2's metadata and tokenizer.
  skip=(-E '^(Files/)?(Gemma3\.|CalibSmolLM2\.|CliCalibrate|CliEval\.|SmolLM2\.(TeacherForced|GreedyGeneration|WholeCorpus|WholeDocuments)|ModelBatch\.SmolLM2|python\.)')
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
fi
cmake -S . -B "$build" -G Ninja "${flags[@]}" >/dev/null
cmake --build "$build" -j"$(nproc)"
cd "$build"
ctest --output-on-failure -j"$(nproc)" --timeout 1800 "${skip[@]}"
cd "$root"
[ "${QF_SANITIZE:-0}" = 1 ] && exit 0  # the Python package is tested in the plain build

# The Python package: installed (no build isolation: setup.sh installed nanobind and
# scikit-build-core) into a venv that sees the system's numpy and pytest; QF_TEST_INSTALL=1 also
# installs it into a fresh venv with pip's isolated build.
venv="$build/venv"
[ -x "$venv/bin/python" ] || python3 -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q --no-build-isolation .
QF_BUILD_DIR="$root/$build" QF_TEST_INSTALL="${QF_TEST_INSTALL:-1}" "$venv/bin/python" -m pytest -q bindings/python/tests
