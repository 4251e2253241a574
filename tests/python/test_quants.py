#!/usr/bin/env python3
"""Row dequantization is bit-exact with gguf-py's numpy dequantizers (gguf.quants).

For every quantized type in qf's table: random blocks (every byte random), blocks whose fp16
scales are extreme (largest finite, subnormal, zero, negative zero, negative mins) and all-zero
blocks go through tests/tools/dequant_tool and are compared bit for bit with
gguf.quants.dequantize. When models/gemma-3-270m-q4_k_m.gguf is present, rows spread over every
tensor of that real file are compared the same way (all its types go through the same table).
Finally a fixture whose tensor type is patched to IQ2_XXS (a type qf cannot run) must make
`qf info` list the type and report, in one line, which tensor has it.
Usage: test_quants.py BUILD_DIR FIXTURES_DIR"""
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

# Byte offsets of the fp16 scale fields of each type's block (d first, then min/dmin if any).
HALF_FIELDS = {
    Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0], Q.IQ4_NL: [0],
    Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
}
EXTREME_HALVES = np.array([65504.0, -65504.0, 6e-8, -6e-8, 6.1e-5, 0.0, -0.0, 1.0, -1.0, 1e-3, -7.5],
                          dtype=np.float16)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GEMMA = os.path.join(ROOT, "models", "gemma-3-270m-q4_k_m.gguf")


def random_blocks(qtype, rng, n=400):
    _, size = GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    for k, off in enumerate(HALF_FIELDS[qtype]):
        # Blocks 0..99: fp16 fields drawn from the extreme set; 100..299: ordinary random halves
        # (either sign: negative mins included); 300..349 all-zero blocks; the rest raw random.
        extreme = rng.choice(EXTREME_HALVES, size=100)
        b[:100, off:off + 2] = extreme.view(np.uint8).reshape(100, 2)
        ordinary = (rng.standard_normal(200) * (0.02 if k == 0 else 0.5)).astype(np.float16)
        b[100:300, off:off + 2] = ordinary.view(np.uint8).reshape(200, 2)
        # Raw random halves may be inf/NaN; NaN payloads are not compared, so keep them finite.
        raw = b[350:, off:off + 2].copy().view(np.uint16)
        raw &= np.uint16(0xBBFF)  # clears an exponent bit: finite
        b[350:, off:off + 2] = raw.view(np.uint8)
    b[300:350] = 0
    return b


def run_tool(build, *args):
    tool = os.path.join(build, "dequant_tool")
    r = subprocess.run([tool, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"dequant_tool {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


def same_bits(a, b):
    return a.shape == b.shape and np.array_equal(a.astype(np.float32).view(np.uint32), b.view(np.uint32))


def check_random_blocks(build, tmp):
    rng = np.random.default_rng(2025)
    for qtype in HALF_FIELDS:
        blocks = random_blocks(qtype, rng)
        src, out = os.path.join(tmp, "blocks.bin"), os.path.join(tmp, "out.f32")
        blocks.tofile(src)
        run_tool(build, "raw", qtype.name, src, out)
        got = np.fromfile(out, dtype=np.float32)
        want = dequantize(blocks.reshape(-1), qtype).reshape(-1)
        if not same_bits(want, got):
            bad = np.flatnonzero(want.astype(np.float32).view(np.uint32) != got.view(np.uint32)) if want.shape == got.shape else []
            i = bad[0] if len(bad) else -1
            raise SystemExit(f"{qtype.name}: {len(bad)} values differ from gguf-py; first at {i}: "
                             f"qf {got[i] if i >= 0 else got.shape} gguf {want[i] if i >= 0 else want.shape}")
        print(f"{qtype.name}: {got.size} values bit-exact")


def check_gemma(build, tmp, rows_per_tensor=3):
    if not os.path.exists(GEMMA):
        print(f"skip real file: {GEMMA} not present (scripts/fetch_model.sh gemma3)")
        return
    out = os.path.join(tmp, "gemma.f32")
    listing = run_tool(build, "gguf", GEMMA, str(rows_per_tensor), out).split("\n")
    got = np.fromfile(out, dtype=np.float32)
    reader = GGUFReader(GEMMA)
    pos, types = 0, {}
    if len(reader.tensors) != len([l for l in listing if l]):
        raise SystemExit("tensor count differs between qf and gguf-py")
    for t, line in zip(reader.tensors, listing):
        name, tname, n = line.split()
        if name != t.name or tname != t.tensor_type.name:
            raise SystemExit(f"tensor {t.name} {t.tensor_type.name}: qf lists {name} {tname}")
        cols = int(t.shape[0])
        rows = int(t.n_elements) // cols
        data = np.asarray(t.data).reshape(rows, -1)
        pick = [i * rows // int(n) for i in range(int(n))]
        want = dequantize(data[pick].reshape(-1) if t.tensor_type not in (Q.F32, Q.F16) else data[pick],
                          t.tensor_type).reshape(-1)
        have = got[pos:pos + want.size]
        pos += want.size
        if not same_bits(want, have):
            raise SystemExit(f"{t.name} ({t.tensor_type.name}): rows differ from gguf-py")
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    if pos != got.size:
        raise SystemExit("qf wrote more values than compared")
    print(f"{GEMMA}: {len(reader.tensors)} tensors bit-exact ({', '.join(f'{k} x{v}' for k, v in sorted(types.items()))})")


def check_unsupported_type(build, fixtures, tmp):
    src = os.path.join(fixtures, "llama_q4_k_gqa.gguf")
    if not os.path.exists(src):
        raise SystemExit(f"{src} missing: run tests/python/make_fixtures.py")
    name = "blk.0.attn_q.weight"
    data = bytearray(open(src, "rb").read())
    # Tensor info: u64 name length, name, u32 n_dims, u64 dims[n_dims], u32 type, u64 offset.
    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.find(key)
    if at < 0 or data.find(key, at + 1) >= 0:
        raise SystemExit(f"cannot locate the tensor info of {name}")
    at += len(key)
    n_dims = struct.unpack_from("<I", data, at)[0]
    type_at = at + 4 + 8 * n_dims
    if struct.unpack_from("<I", data, type_at)[0] != int(Q.Q4_K):
        raise SystemExit(f"{name} is not Q4_K in {src}")
    struct.pack_into("<I", data, type_at, int(Q.IQ2_XXS))  # fewer bytes: still inside the file
    path = os.path.join(tmp, "iq2_xxs.gguf")
    open(path, "wb").write(bytes(data))
    r = subprocess.run([os.path.join(build, "qf"), "info", path], capture_output=True, text=True)
    lines = r.stdout.splitlines()
    listed = [l for l in lines if l.startswith("tensor types:") and "IQ2_XXS x1" in l]
    verdict = [l for l in lines if l.startswith("runnable: no")]
    if r.returncode != 0 or not listed or len(verdict) != 1 or name not in verdict[0] or "IQ2_XXS" not in verdict[0]:
        raise SystemExit(f"qf info on an IQ2_XXS tensor: rc {r.returncode}\n{r.stdout}{r.stderr}")
    print(f"unsupported type reported: {verdict[0]}")


def main():
    build, fixtures = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as tmp:
        check_random_blocks(build, tmp)
        check_gemma(build, tmp)
        check_unsupported_type(build, fixtures, tmp)
    print("ok")


if __name__ == "__main__":
    main()
