#!/usr/bin/env bash
# Fetches llama.cpp, the reference engine, for correctness goldens and speed comparisons only:
# the prebuilt CPU libllama from the npm package @node-llama-cpp/linux-x64 and the matching
# headers from the source bundle inside node-llama-cpp. Lands in third_party/llama.cpp
# (git-ignored): lib/ (shared libraries) and include/ (llama.h, ggml*.h). Idempotent.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
version=3.22.1
dest="$root/third_party/llama.cpp"
if [ -f "$dest/.complete-$version" ]; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching node-llama-cpp@$version prebuilt CPU binaries and sources (npm) ..." >&2
(cd "$tmp" && npm pack --silent "node-llama-cpp@$version" "@node-llama-cpp/linux-x64@$version" >/dev/null)
mkdir -p "$tmp/nlc" "$tmp/bin"
tar xzf "$tmp/node-llama-cpp-$version.tgz" -C "$tmp/nlc"
tar xzf "$tmp/node-llama-cpp-linux-x64-$version.tgz" -C "$tmp/bin"
git clone -q "$tmp/nlc/package/llama/gitRelease.bundle" "$tmp/src" 2>/dev/null
rm -rf "$dest" && mkdir -p "$dest/lib" "$dest/include"
cp "$tmp"/bin/package/bins/linux-x64/*.so "$dest/lib/"
cp "$tmp"/src/include/*.h "$tmp"/src/ggml/include/*.h "$dest/include/"
cp "$tmp/nlc/package/llama/llama.cpp.info.json" "$dest/"
touch "$dest/.complete-$version"
echo "llama.cpp: $dest" >&2
