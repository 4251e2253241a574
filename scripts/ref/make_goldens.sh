#!/usr/bin/env bash
# Regenerates tests/golden/smollm2_{teacher_forced,generate}.json from llama.cpp: fetches the
# model, the text and llama.cpp if missing, builds build-ref/llama_ref, then runs
# scripts/ref/make_goldens.py (extra arguments are passed on, e.g. --only generate).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
"$root/scripts/fetch_model.sh"
"$root/scripts/fetch_text.sh"
"$root/scripts/ref/build.sh"
exec python3 "$root/scripts/ref/make_goldens.py" "$@"
