#!/usr/bin/env bash
# Builds the libFuzzer harnesses (fuzz/*_fuzz.cpp, clang, ASan + UBSan, in build-fuzz/) and runs
# each for SECONDS (default 30) on its seed corpus (fuzz/corpus/<name>) plus the corpus grown
# by earlier runs (build-fuzz/corpus/<name>). Exits non-zero if any harness hits a crash, leak,
# hang or sanitizer report; the input that caused it lands in build-fuzz/artifacts/<name>/
# (copy it to fuzz/regressions/<name>/ once fixed). Seeds: fuzz/make_seeds.py.
#   scripts/fuzz.sh [SECONDS] [HARNESS...]     e.g. scripts/fuzz.sh 600 gguf_fuzz
#   QF_FUZZ_NICE=19     run the fuzzers at low priority (a long campaign beside other work)
#   QF_FUZZ_PARALLEL=1  run all harnesses at once instead of one after another
#   QF_FUZZ_TIMEOUT=10  seconds one input may take before it counts as a hang (wall clock: raise
#                       it on an overloaded machine, where a low-priority fuzzer can wait that long)
# Each harness's full libFuzzer output is in build-fuzz/<harness>.log.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
seconds=${1:-30}
shift || true

cxx=""
for c in clang++-19 clang++; do
  if command -v "$c" >/dev/null; then cxx=$c; break; fi
done
if [ -z "$cxx" ]; then
  echo "scripts/fuzz.sh needs clang and libFuzzer: apt-get install clang-19 libfuzzer-19-dev (scripts/setup.sh --deps)" >&2
  exit 1
fi
[ -f models/SmolLM2-135M-Instruct.Q4_1.gguf ] || scripts/fetch_model.sh

build=build-fuzz
cmake -S . -B "$build" -G Ninja -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DQF_FUZZ=ON -DQF_BUILD_TESTS=OFF -DQF_BUILD_BENCH=OFF >/dev/null
harnesses=("$@")
if [ ${#harnesses[@]} -eq 0 ]; then
  for f in fuzz/*_fuzz.cpp; do harnesses+=("$(basename "$f" .cpp)"); done
fi
cmake --build "$build" -j"$(nproc)" --target "${harnesses[@]}"

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

run_one() {  # harness -> its log; exit status of libFuzzer
  local h=$1 name=${1%_fuzz}
  mkdir -p "$build/corpus/$name" "$build/artifacts/$name"
  # -timeout: one input taking longer is a hang; -rss_limit_mb: so is unbounded memory.
  nice -n "${QF_FUZZ_NICE:-0}" "$build/fuzz/$h" "$build/corpus/$name" "fuzz/corpus/$name" \
    -max_total_time="$seconds" -timeout="${QF_FUZZ_TIMEOUT:-10}" -rss_limit_mb=2048 -max_len=8192 \
    -artifact_prefix="$build/artifacts/$name/" -print_final_stats=1 >"$build/$h.log" 2>&1
}

report() {  # the last status line (executions, coverage, features) and the totals
  local h=$1
  echo "$h: $(grep -E '^#[0-9]+' "$build/$h.log" | tail -n 1)"
  echo "$h: $(grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$build/$h.log" | tr -s ' \n' ' ')"
}

failed=0
if [ "${QF_FUZZ_PARALLEL:-0}" = 1 ]; then  # all harnesses at once (a long campaign)
  pids=()
  for h in "${harnesses[@]}"; do run_one "$h" & pids+=($!); done
  for i in "${!harnesses[@]}"; do wait "${pids[$i]}" || { echo "${harnesses[$i]}: FAILED" >&2; failed=1; }; done
else
  for h in "${harnesses[@]}"; do
    echo "== $h: ${seconds}s"
    run_one "$h" || { echo "$h: FAILED" >&2; failed=1; }
  done
fi
for h in "${harnesses[@]}"; do
  report "$h"
  if grep -qE '^==[0-9]+==ERROR|runtime error|^SUMMARY|deadly signal|Test unit written' "$build/$h.log"; then
    tail -n 40 "$build/$h.log" >&2
    echo "$h: finding saved in $build/artifacts/${h%_fuzz}/" >&2
    failed=1
  fi
done
exit $failed
