#!/usr/bin/env python3
"""Cross-check qf filter files against the `safetensors` Python package (the reader kvpress and
the published Q-Filters use).

  check_filters.py verify FILE  FILE was written by qf (tests/calib_test.cpp, PythonCrossCheck):
                                load it with safetensors.numpy and check values, dtype, shape and
                                metadata; also re-parse the raw bytes by hand.
  check_filters.py write DIR    write files with the safetensors package for the C++ reader:
                                ours_f32 / ours_f16 (our metadata) and published (reference
                                convention: HF row order, -v1 stored, metadata {"format": "pt"}).

The filter values follow pattern() below, mirrored in calib_test.cpp; every value is a multiple of
1/16 in [-2, 2), exact in F32 and F16. Exit status 0 means every check passed.
"""
import json
import struct
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

L, KV, D = 3, 2, 8
FINGERPRINT = "llama:L3:H4:KV2:D8:E32:V100"


def pattern():
    l, h, d = np.meshgrid(np.arange(L), np.arange(KV), np.arange(D), indexing="ij")
    return ((((l * 37 + h * 11 + d * 5) % 64) - 32) / 16).astype(np.float32)


def gguf_to_hf(f):
    # Inverse of llama.cpp's Q/K row permutation: gguf[2i] = hf[i], gguf[2i+1] = hf[i + d/2].
    return np.concatenate([f[..., 0::2], f[..., 1::2]], axis=-1)


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}")
        sys.exit(1)


def verify(path):
    tensors = load_file(path)
    check(set(tensors) == {"q_filters"}, f"tensors {sorted(tensors)}")
    a = tensors["q_filters"]
    check(a.dtype == np.float32, f"dtype {a.dtype}")
    check(a.shape == (L, KV, D), f"shape {a.shape}")
    check(np.array_equal(a, pattern()), "values differ from the pattern")
    with safe_open(path, framework="np") as f:
        md = f.metadata()
    expected = {"format": "qfilters", "sign_convention": "keep_largest_dot", "layout": "gguf",
                "fingerprint": FINGERPRINT, "corpus": "unit test", "seed": "42"}
    for k, v in expected.items():
        check(md.get(k) == v, f"metadata {k} = {md.get(k)!r}, expected {v!r}")
    check("tool_version" in md, "metadata tool_version missing")

    # Independent byte-level parse: u64 LE length, JSON, 8-aligned F32 little-endian data.
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    check(n % 8 == 0, f"header length {n} not a multiple of 8")
    header = json.loads(raw[8:8 + n])
    begin, end = header["q_filters"]["data_offsets"]
    check(8 + n + end == len(raw), "data does not end at the end of the file")
    data = np.frombuffer(raw[8 + n + begin:8 + n + end], dtype="<f4").reshape(L, KV, D)
    check(np.array_equal(data, pattern()), "raw bytes differ from the pattern")
    print(f"OK {path}: {a.shape} {a.dtype}, {len(md)} metadata entries")


def write(out_dir):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ours = {"format": "qfilters", "sign_convention": "keep_largest_dot", "layout": "gguf",
            "fingerprint": FINGERPRINT}
    p = pattern()
    save_file({"q_filters": p}, str(out / "ours_f32.safetensors"), metadata=ours)
    save_file({"q_filters": p.astype(np.float16)}, str(out / "ours_f16.safetensors"), metadata=ours)
    # What PyTorchModelHubMixin.save_pretrained produces for the reference QFilters module.
    published = np.ascontiguousarray(-gguf_to_hf(p))
    save_file({"q_filters": published}, str(out / "published.safetensors"), metadata={"format": "pt"})
    print(f"OK wrote 3 files to {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("verify", "write"):
        print(__doc__)
        sys.exit(2)
    (verify if sys.argv[1] == "verify" else write)(sys.argv[2])
