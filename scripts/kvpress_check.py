#!/usr/bin/env python3
"""kvpress (transformers, CPU torch) compresses SmolLM2 with filters calibrated by qfilters, and
keeps the tokens qfilters keeps.

The filters are exported with Filters.export_hf (the bytes `qf filters export --layout hf` writes),
loaded with kvpress's own QFilters.from_pretrained, and handed to QFilterPress; transformers runs
the GGUF (dequantized to float32). For each compression ratio, the token set each (layer, KV head)
keeps after kvpress's prefill compression is compared with the one qfilters keeps after the same
prompt (`Session.prefill` with KVConfig(ratio=R): what `qf run --kv-ratio R` runs). Agreement is
|A & B| / |A| (both sets hold int(T * (1 - R)) tokens), per layer and overall.

Two qfilters runs: the model as given (Q4_1 weights, 8-bit activations, f16 KV cache: the default)
and, with --float-model, a float32 copy of the same weights (scripts/dequantize_gguf.py) with an
f32 KV cache, which leaves only float summation order between the two engines. Disagreements are
explained by the score margin: how far from kvpress's cut-off score the swapped tokens lie.

Not part of CI (torch, transformers and kvpress are several GB from PyPI; a run takes ~1 min):
    pip install . torch transformers kvpress
    python3 scripts/kvpress_check.py --filters models/SmolLM2-135M-Instruct.qfilters.safetensors \\
        --float-model /tmp/smollm2-f32.gguf --json /tmp/kvpress_check.json
(--float-model is made when missing.)"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prompt_tokens(model, path: str, n: int) -> List[int]:
    if os.path.isdir(path):
        path = os.path.join(path, sorted(f for f in os.listdir(path) if f.endswith(".txt"))[0])
    with open(path, encoding="utf-8") as f:
        ids = model.tokenize(f.read())
    if len(ids) < n:
        sys.exit(f"{path}: {len(ids)} tokens, fewer than --tokens {n}")
    return ids[:n]


def qfilters_kept(qfilters, model_path: str, filters, ids: List[int], ratio: float, cache_type: str):
    """[layer][kv_head] -> set of positions qfilters keeps after prefill compression."""
    model = qfilters.Model(model_path, threads=1, n_ctx=len(ids) + 16)
    kv = qfilters.KVConfig(filters=filters, ratio=ratio, cache_type_k=cache_type, cache_type_v=cache_type)
    s = qfilters.Session(model, kv=kv)
    s.prefill(ids)
    return [[set(h) for h in layer] for layer in s.kv_positions()]


def make_float_model(src: str, dst: str) -> None:
    if os.path.exists(dst):
        return
    print(f"writing {dst}: {src} with every quantized tensor expanded to F32", flush=True)
    from gguf import GGUFReader
    types = sorted({t.tensor_type.name for t in GGUFReader(src).tensors} - {"F32", "F16"})
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "dequantize_gguf.py"), src, dst,
                    "--types", ",".join(types)], check=True)


def kvpress_run(model_path: str, export_dir: str, ids: List[int], ratio: float):
    """Runs kvpress's QFilterPress on transformers; returns its kept sets [layer][kv_head] (exactly
    ScorerPress's top-k, checked against the compressed cache) and its scores [layer] -> [kv_head, T]."""
    import torch
    from kvpress import QFilterPress
    from kvpress.presses.qfilter_press import QFilters
    from kvpress.utils import compute_n_kept
    from transformers import AutoModelForCausalLM, DynamicCache

    @dataclass
    class ExportedQFilterPress(QFilterPress):
        """QFilterPress with filters from a local directory (kvpress looks them up on the Hub by model name)."""
        directory: str = ""

        def post_init_from_model(self, model):
            self.q_filters = QFilters.from_pretrained(self.directory).q_filters.detach().to(model.dtype)

    press = ExportedQFilterPress(compression_ratio=ratio, directory=export_dir)
    seen: Dict[int, tuple] = {}
    score = press.score

    def recording_score(module, hidden_states, keys, values, attentions, kwargs):
        out = score(module, hidden_states, keys, values, attentions, kwargs)
        seen[module.layer_idx] = (out[0].detach().clone(), keys[0].detach().clone())
        return out

    press.score = recording_score
    hf = _hf_model(AutoModelForCausalLM, torch, model_path)
    cache = DynamicCache()
    with torch.no_grad(), press(hf):
        hf(torch.tensor([ids]), past_key_values=cache, use_cache=True)

    n_kept = compute_n_kept(len(ids), ratio)
    kept, scores = [], []
    for layer in range(len(seen)):
        sc, keys = seen[layer]
        idx = sc.topk(n_kept, dim=-1).indices  # what ScorerPress.compress keeps, in its order
        cached = cache.layers[layer].keys[0]
        want = torch.stack([keys[h, idx[h]] for h in range(keys.shape[0])])
        if cached.shape != want.shape or not torch.equal(cached, want):
            sys.exit(f"layer {layer}: the compressed cache is not ScorerPress's top-{n_kept} (kvpress changed?)")
        kept.append([set(idx[h].tolist()) for h in range(idx.shape[0])])
        scores.append(sc.double().numpy())
    return kept, scores


_HF_CACHE: Dict[str, object] = {}


def _hf_model(AutoModelForCausalLM, torch, path: str):
    if path not in _HF_CACHE:
        kw = {"gguf_file": os.path.basename(path)}
        try:
            m = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(path)), dtype=torch.float32, **kw)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            m = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                     torch_dtype=torch.float32, **kw)
        _HF_CACHE[path] = m.eval()
    return _HF_CACHE[path]


def compare(kv_kept, qf_kept, scores) -> dict:
    """Agreement per layer and head, and how close to the cut-off the tokens they swap score."""
    layers, margins = [], []
    for l, (a_l, b_l) in enumerate(zip(kv_kept, qf_kept)):
        row = []
        for h, (a, b) in enumerate(zip(a_l, b_l)):
            if len(a) != len(b):
                sys.exit(f"layer {l} head {h}: kvpress keeps {len(a)} tokens, qfilters {len(b)}")
            row.append(len(a & b) / len(a))
            if a != b:
                s = scores[l][h]
                cut = np.sort(s)[::-1][len(a) - 1]  # the lowest score kvpress keeps
                spread = s.std()
                margins += [abs(s[t] - cut) / spread for t in (a ^ b)]
        layers.append(row)
    arr = np.array(layers)
    return {"mean": float(arr.mean()), "min_head": float(arr.min()), "exact_heads": int((arr == 1.0).sum()),
            "heads": int(arr.size), "per_layer": [round(float(x), 4) for x in arr.mean(axis=1)],
            "swapped_tokens": len(margins),
            "swap_margin_p50": float(np.median(margins)) if margins else 0.0,
            "swap_margin_max": float(np.max(margins)) if margins else 0.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--filters", help="qf filter file (default: calibrate now, about a minute)")
    ap.add_argument("--text", default=os.path.join(ROOT, "data/sotu"), help="prompt: a .txt file or a directory (first file)")
    ap.add_argument("--tokens", type=int, default=1024, help="prompt length")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="compression ratios")
    ap.add_argument("--float-model", help="also compare qfilters on a float32 copy of the model (made if missing)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import qfilters
    import torch
    torch.set_num_threads(args.threads)

    model = qfilters.Model(args.model, threads=1)
    filters = qfilters.Filters.load(args.filters) if args.filters else qfilters.calibrate(model)
    ids = prompt_tokens(model, args.text, args.tokens)
    runs = [("Q4_1 weights, f16 KV (qf default)", args.model, "f16")]
    if args.float_model:
        make_float_model(args.model, args.float_model)
        runs.append(("F32 weights, f32 KV", args.float_model, "f32"))

    results = {"model": args.model, "tokens": len(ids), "runs": []}
    with tempfile.TemporaryDirectory(prefix="qf-hf-filters-") as export_dir:
        filters.export_hf(export_dir)
        print(f"exported {filters.shape} to {sorted(os.listdir(export_dir))}; kvpress loads them with "
              f"QFilters.from_pretrained", flush=True)
        for ratio in args.ratios:
            kv_kept, scores = kvpress_run(args.model, export_dir, ids, ratio)
            for label, path, cache_type in runs:
                qf_kept = qfilters_kept(qfilters, path, filters, ids, ratio, cache_type)
                r = compare(kv_kept, qf_kept, scores)
                r.update({"ratio": ratio, "qfilters": label, "kept_per_head": len(kv_kept[0][0])})
                results["runs"].append(r)
                print(f"ratio {ratio:.2f} ({r['kept_per_head']}/{len(ids)} kept per head), qfilters on {label}: "
                      f"agreement {r['mean']:.4f} mean, {r['min_head']:.4f} worst head, "
                      f"{r['exact_heads']}/{r['heads']} heads identical; {r['swapped_tokens']} swapped tokens "
                      f"at {r['swap_margin_p50']:.4f} (median) / {r['swap_margin_max']:.4f} (max) score std "
                      f"from the cut-off", flush=True)
                print("  per layer: " + " ".join(f"{x:.3f}" for x in r["per_layer"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
