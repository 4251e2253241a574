#!/usr/bin/env python3
"""Positions and rotary phases stay right after thousands of evictions.

Runs tests/tools/kv_trace (the C++ engine with a bounded, per-head compressed cache) over random
tokens, then recomputes the last logits with an independent numpy forward pass in which each
query sees exactly the keys its (layer, KV head) still held when it ran: keys keep their
original positions, so any slip in positions or rotary phases after eviction shows up here.
Usage: test_eviction_trace.py BUILD_DIR FIXTURES_DIR"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from gguf import GGMLQuantizationType, quants

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402


def stored(x, kv_type):
    """x [T, n_kv, head_dim] as the cache stores it: rounded to kv_type by gguf-py's quantizer."""
    if kv_type == "f32":
        return x
    qt = getattr(GGMLQuantizationType, kv_type.upper())
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    return quants.dequantize(quants.quantize(x32, qt), qt).reshape(x.shape).astype(np.float64)


def masked_forward(m, tokens, visible, ctk="f32", ctv="f32"):
    """reference.forward with per-(layer, kv head) visibility masks visible[l][h] [T, T] (bool),
    keys and values rounded to the cache's storage types."""
    c = m.cfg
    tokens = np.asarray(tokens, dtype=np.int64)
    T = len(tokens)
    pos = np.arange(T)
    x = m.tok_embd[tokens].copy()
    group = c.n_head // c.n_head_kv
    for li, L in enumerate(m.layers):
        h = ref.rmsnorm(x, L.attn_norm, c.rms_eps)
        q = ref.matmul(h, L.wq, False).reshape(T, c.n_head, c.head_dim)
        k = ref.matmul(h, L.wk, False).reshape(T, c.n_head_kv, c.head_dim)
        v = ref.matmul(h, L.wv, False).reshape(T, c.n_head_kv, c.head_dim)
        q = ref.rope(q, pos, c.n_rot, c.rope_base)
        k = stored(ref.rope(k, pos, c.n_rot, c.rope_base), ctk)
        v = stored(v, ctv)
        att = np.empty((T, c.n_head, c.head_dim))
        for hh in range(c.n_head):
            kv = hh // group
            s = q[:, hh, :] @ k[:, kv, :].T / np.sqrt(c.head_dim)
            s = np.where(visible[li][kv], s, -np.inf)
            s = np.exp(s - s.max(axis=1, keepdims=True))
            s /= s.sum(axis=1, keepdims=True)
            att[:, hh, :] = s @ v[:, kv, :]
        x = x + ref.matmul(att.reshape(T, -1), L.wo, False)
        h = ref.rmsnorm(x, L.ffn_norm, c.rms_eps)
        x = x + ref.matmul(ref.silu(ref.matmul(h, L.w_gate, False)) * ref.matmul(h, L.w_up, False), L.w_down, False)
    return ref.matmul(ref.rmsnorm(x, m.output_norm, c.rms_eps), m.output, False)


# Largest relative logit error allowed per KV type pair. f32: float rounding only. Otherwise the
# engine rounds keys computed in float32 and the reference rounds its own (float64) keys, so a
# value lying within float error of a rounding boundary can land one step apart: rare for the
# 16-bit types and q8_0 (steps of 1/256-1/127 of a block's range), more frequent for q4_0's 1/8.
TOLERANCE = {"f32": 1e-4, "f16": 3e-4, "bf16": 1e-3, "q8_0": 1e-3, "q4_0": 1e-2}


def check(build_dir, model_path, policy, budget, window, every, chunk, n_tokens, ctk="f32", ctv="f32"):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "trace.json")
        subprocess.run([os.path.join(build_dir, "kv_trace"), model_path, policy, str(budget), str(window),
                        str(every), str(chunk), str(n_tokens), out, ctk, ctv], check=True)
        with open(out) as f:
            tr = json.load(f)
    m = ref.load(model_path)
    T = n_tokens
    start = np.asarray(tr["step_start"])
    causal = np.arange(T)[None, :] <= np.arange(T)[:, None]
    visible = []
    for layer in tr["evicted_at"]:
        per_head = []
        for ev in layer:
            ev = np.asarray(ev)
            # key j is visible to query t if it was not evicted by a step that ended before t's step began
            alive = (ev[None, :] < 0) | (ev[None, :] > start[:, None])
            per_head.append(causal & alive)
        visible.append(per_head)
    want = masked_forward(m, tr["tokens"], visible, ctk, ctv)[-len(tr["last_logits"]):]
    got = np.asarray(tr["last_logits"])
    err = np.abs(got - want).max() / np.abs(want).max()
    held = [int(v[-1].sum()) for layer in visible for v in layer]
    print(f"{policy:10s} {ctk}/{ctv} budget {budget} window {window} every {every} chunk {chunk}: "
          f"{tr['evicted']} evictions, last query sees {min(held)}..{max(held)} keys, max rel err {err:.2e}")
    assert tr["evicted"] >= 1000, "the trace should exercise thousands of evictions"
    assert max(held) <= budget + chunk, "a head held more than budget + chunk tokens"
    # A reference that ignores eviction must disagree, or this test could not fail.
    tol = max(TOLERANCE[ctk], TOLERANCE[ctv])
    full = masked_forward(m, tr["tokens"], [[causal] * len(layer) for layer in visible], ctk, ctv)[-len(got):]
    assert np.abs(got - full).max() / np.abs(full).max() > 10 * tol, "eviction had no visible effect"
    assert err < tol, f"{policy} {ctk}/{ctv}: logits differ from the masked reference by {err:.2e}"


def main():
    build_dir, fixtures = sys.argv[1], sys.argv[2]
    model = os.path.join(fixtures, "llama_f32_gqa_tied.gguf")
    check(build_dir, model, "qfilters", 64, 8, 1, 1, 1500)
    check(build_dir, model, "knorm", 48, 4, 7, 1, 1200)
    check(build_dir, model, "h2o", 64, 8, 1, 1, 1200)
    check(build_dir, model, "random", 40, 0, 3, 16, 1200)
    # Every KV storage type: attention reads the stored keys (qfilters and knorm score the F32 ones).
    for ctk, ctv in [("f16", "f16"), ("bf16", "bf16"), ("q8_0", "q8_0"), ("q8_0", "f16"), ("q4_0", "q4_0")]:
        check(build_dir, model, "qfilters", 64, 8, 1, 1, 1200, ctk, ctv)
    check(build_dir, model, "h2o", 64, 8, 1, 1, 1200, "q8_0", "q8_0")
    check(build_dir, model, "knorm", 48, 4, 7, 1, 1200, "q4_0", "f16")
    print("1 passed, 0 failed")


if __name__ == "__main__":
    main()
