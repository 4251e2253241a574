#!/usr/bin/env python3
"""Rewrites a GGUF file with some tensor types expanded to F32, everything else (metadata,
tensor order, other tensors) copied as is. Lets qf run a model whose weight types it does not
support yet, and lets llama.cpp run the very same file for a comparison.

    scripts/dequantize_gguf.py models/gemma-3-270m-q4_k_m.gguf models/gemma-3-270m-deq.gguf \\
        [--types Q4_K,Q5_0,Q6_K]

Dequantization is gguf-py's (gguf.quants, ggml's block layouts).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize

SKIP_KEYS = ("GGUF.", "general.architecture", "general.alignment")  # written by GGUFWriter itself


def copy_metadata(r: GGUFReader, w: GGUFWriter) -> None:
    for name, f in r.fields.items():
        if name.startswith(SKIP_KEYS):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), vtype, sub)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--types", default="Q4_K,Q5_0,Q6_K", help="tensor types to expand to F32 (comma-separated)")
    a = ap.parse_args(argv)
    expand = {QT[t.strip()] for t in a.types.split(",") if t.strip()}
    r = GGUFReader(a.src)
    arch = r.fields["general.architecture"].contents()
    tmp = a.dst + ".tmp"
    w = GGUFWriter(tmp, arch)
    copy_metadata(r, w)
    counts: dict[str, int] = {}
    for t in r.tensors:
        qt = QT(int(t.tensor_type))
        shape = [int(x) for x in reversed(t.shape)]  # numpy order: rows first
        if qt in expand:
            data = dequantize(t.data, qt).astype(np.float32).reshape(shape)
            w.add_tensor(t.name, data)
            key = f"{qt.name}->F32"
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_shape=t.data.shape, raw_dtype=qt)
            key = qt.name
        counts[key] = counts.get(key, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, a.dst)
    print(f"{a.dst}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
