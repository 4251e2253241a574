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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402


def masked_forward(m, tokens, visible):
    """reference.forward with per-(layer, kv head) visibility masks visible[l][h] [T, T] (bool)."""
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
        k = ref.rope(k, pos, c.n_rot, c.rope_base)
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


def check(build_dir, model_path, policy, budget, window, every, chunk, n_tokens):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "trace.json")
        subprocess.run([os.path.join(build_dir, "kv_trace"), model_path, policy, str(budget), str(window),
                        str(every), str(chunk), str(n_tokens), out], check=True)
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
    want = masked_forward(m, tr["tokens"], visible)[-len(tr["last_logits"]):]
    got = np.asarray(tr["last_logits"])
    err = np.abs(got - want).max() / np.abs(want).max()
    held = [int(v[-1].sum()) for layer in visible for v in layer]
    print(f"{policy:10s} budget {budget} window {window} every {every} chunk {chunk}: "
          f"{tr['evicted']} evictions, last query sees {min(held)}..{max(held)} keys, max rel err {err:.2e}")
    assert tr["evicted"] >= 1000, "the trace should exercise thousands of evictions"
    assert max(held) <= budget + chunk, "a head held more than budget + chunk tokens"
    # A reference that ignores eviction must disagree, or this test could not fail.
    full = ref.forward(m, tr["tokens"])[-len(tr["last_logits"]):]
    assert np.abs(got - full).max() / np.abs(full).max() > 1e-3, "eviction had no visible effect"
    assert err < 1e-4, f"{policy}: logits differ from the masked reference by {err:.2e}"


def main():
    build_dir, fixtures = sys.argv[1], sys.argv[2]
    model = os.path.join(fixtures, "llama_f32_gqa_tied.gguf")
    check(build_dir, model, "qfilters", 64, 8, 1, 1, 1500)
    check(build_dir, model, "knorm", 48, 4, 7, 1, 1200)
    check(build_dir, model, "h2o", 64, 8, 1, 1, 1200)
    check(build_dir, model, "random", 40, 0, 3, 16, 1200)
    print("1 passed, 0 failed")


if __name__ == "__main__":
    main()
