#!/usr/bin/env python3
"""Attention fidelity (qf eval fidelity) against an independent numpy computation.

Runs tests/tools/eval_fidelity_dump (eval::run_fidelity over random tokens) on fixtures and checks,
against the numpy reference forward pass (reference.py):
  - the queries and keys the engine hands its QK hook (what `qf calibrate` collects) are the
    reference's post-norm, post-rotary ones;
  - the fidelity target of every layer (mean attention a key receives from the later queries that
    see it) uses the layer's score scale and sliding window;
  - the Spearman cells of knorm, qfilters and streaming equal numpy's on the reference keys;
  - the summary counts only the layers policies act on (not the sliding-window ones).
The gemma3 fixture has windows of 5 on six of its seven layers, so a target that ignored them
would differ by far more than the tolerance.
Usage: test_fidelity_numpy.py BUILD_DIR FIXTURES_DIR"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402

N_SINK = 4  # kv::PolicyOptions::n_sink, streaming's attention sinks


def ranks(x):
    """Average ranks (ties share their mean rank), 1-based."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        r[order[i:j + 1]] = 0.5 * (i + j) + 1
        i = j + 1
    return r


def spearman(a, b):
    ra, rb = ranks(a), ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float("nan") if den == 0 else float((ra * rb).sum() / den)


def target(q, k, window, scale, group):
    """[n_kv][T]: mean over the later queries i > j that see key j of softmax_i(j), averaged over
    the group's query heads; NaN where no later query sees the key."""
    T, H, _ = q.shape
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    visible = (j <= i) & ((i - j < window) if window > 0 else True)
    later = visible & (j < i)
    out = np.zeros((k.shape[1], T))
    for h in range(H):
        s = np.where(visible, q[:, h, :] @ k[:, h // group, :].T * scale, -np.inf)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        out[h // group] += np.where(later, p, 0.0).sum(axis=0) / group
    n_later = later.sum(axis=0)
    return np.where(n_later > 0, out / np.maximum(n_later, 1), np.nan)


def check(build_dir, model_path, T):
    m = ref.load(model_path)
    c = m.cfg
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "fidelity.json")
        subprocess.run([os.path.join(build_dir, "eval_fidelity_dump"), model_path, str(T), out], check=True)
        with open(out) as f:
            got = json.load(f)
    tokens = got["tokens"]
    qk = ref.queries_keys(m, tokens)
    scale = c.attn_scale or 1.0 / np.sqrt(c.head_dim)
    group = c.n_head // c.n_head_kv
    filters = np.asarray(got["filters"]).reshape(c.n_layer, c.n_head_kv, c.head_dim)
    windows = c.layer_window or [0] * c.n_layer
    worst = {"q": 0.0, "k": 0.0, "target": 0.0, "spearman": 0.0}
    for layer, (q, k) in enumerate(qk):
        q_got = np.asarray(got["q"][layer]).reshape(q.shape)
        k_got = np.asarray(got["k"][layer]).reshape(k.shape)
        worst["q"] = max(worst["q"], np.abs(q_got - q).max() / np.abs(q).max())
        worst["k"] = max(worst["k"], np.abs(k_got - k).max() / np.abs(k).max())
        want = target(q, k, windows[layer], scale, group)
        tg = np.array([[np.nan if v is None else v for v in row] for row in got["target"][layer]])
        assert np.array_equal(np.isnan(tg), np.isnan(want)), f"layer {layer}: keys without a later query differ"
        ok = ~np.isnan(want)
        worst["target"] = max(worst["target"], (np.abs(tg[ok] - want[ok]) / want[ok].max()).max())
        for h in range(c.n_head_kv):
            keys = k[:, h, :][ok[h]]
            scores = {
                "knorm": -np.linalg.norm(keys, axis=1),
                "qfilters": keys @ filters[layer, h],
                "streaming": np.where(np.arange(T) < N_SINK, 1e30, np.arange(T))[ok[h]],
            }
            for policy, score in scores.items():
                rho = spearman(score, want[h][ok[h]])
                cell = got["spearman"][policy][layer][h]
                worst["spearman"] = max(worst["spearman"], abs(cell - rho))
                assert abs(cell - rho) < 2e-3, f"{policy} layer {layer} head {h}: {cell} vs numpy {rho}"
    print(f"{os.path.basename(model_path)}: max relative error q {worst['q']:.1e}, k {worst['k']:.1e}, "
          f"target {worst['target']:.1e}; max |d Spearman| {worst['spearman']:.1e}")
    assert worst["q"] < 1e-4 and worst["k"] < 1e-4, "the hook's queries/keys are not the reference's"
    assert worst["target"] < 1e-4, "fidelity target differs from numpy"
    # Summary statistics: over the layers without a sliding window only.
    global_layers = [l for l in range(c.n_layer) if windows[l] == 0]
    summary = got["summary"]
    if len(global_layers) < c.n_layer:
        assert summary["summary_layers"] == global_layers, summary.get("summary_layers")
    for row in summary["results"]:
        assert row["n_heads"] == len(global_layers) * c.n_head_kv, row


def main():
    build_dir, fixtures = sys.argv[1], sys.argv[2]
    # T > window + a few, so that in the local layers most keys fall out of later queries' view.
    check(build_dir, os.path.join(fixtures, "gemma3_f32_mqa_tied.gguf"), 40)
    check(build_dir, os.path.join(fixtures, "llama_f32_gqa_tied.gguf"), 40)
    print("1 passed, 0 failed")


if __name__ == "__main__":
    main()
