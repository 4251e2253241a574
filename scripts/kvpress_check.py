#!/usr/bin/env python3
"""Checks that kvpress (transformers, CPU torch) uses filters calibrated by qfilters: exports them
with Filters.export_hf, loads the directory with kvpress's QFilters.from_pretrained, runs
QFilterPress's scoring on SmolLM2 (transformers reads the GGUF, dequantized to float32), and
compares the token set each (layer, KV head) keeps with qfilters' own prefill compression
(`qf --kv-ratio R`) on the same prompt tokens.

Not part of CI (needs torch, transformers and kvpress from PyPI, several GB):
    pip install . torch transformers kvpress
    python3 scripts/kvpress_check.py --filters models/SmolLM2-135M-Instruct.qfilters.safetensors

Prints the mean and minimum share of kept tokens the two agree on. Exact agreement is not expected:
transformers runs float32 weights while qfilters runs Q4_1 with 8-bit activations, so keys near the
cut-off can swap places."""
import argparse
import os
import sys
import tempfile

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--filters", help="qf filter file (default: calibrate now)")
    ap.add_argument("--text", default="data/sotu", help="prompt text: a .txt file or a directory (first file)")
    ap.add_argument("--tokens", type=int, default=512, help="prompt length")
    ap.add_argument("--ratio", type=float, default=0.5, help="compression ratio (kvpress) = --kv-ratio (qf)")
    args = ap.parse_args()

    import qfilters
    import torch
    from kvpress import QFilterPress
    from kvpress.presses.qfilter_press import QFilters
    from transformers import AutoModelForCausalLM

    model = qfilters.Model(args.model, n_ctx=max(args.tokens + 16, 1024))
    filters = qfilters.Filters.load(args.filters) if args.filters else qfilters.calibrate(model)
    text_path = args.text
    if os.path.isdir(text_path):
        text_path = os.path.join(text_path, sorted(f for f in os.listdir(text_path) if f.endswith(".txt"))[0])
    with open(text_path, encoding="utf-8") as f:
        ids = model.tokenize(f.read())[: args.tokens]

    # qfilters: prefill compression keeps int(T * (1 - ratio)) tokens per head.
    s = qfilters.Session(model, kv=qfilters.KVConfig(filters=filters, ratio=args.ratio))
    s.prefill(ids)
    held = s.kv_positions()

    with tempfile.TemporaryDirectory() as export_dir:
        filters.export_hf(export_dir)
        loaded = QFilters.from_pretrained(export_dir)  # kvpress's own loader
    print(f"kvpress loaded the exported filters: {tuple(loaded.q_filters.shape)}")
    if hasattr(QFilterPress, "load_q_filters"):  # kvpress looks filters up by model name: point it at ours
        QFilterPress.load_q_filters = staticmethod(lambda model_name: loaded.q_filters.detach())
        press = QFilterPress(compression_ratio=args.ratio)
    else:
        press = QFilterPress(compression_ratio=args.ratio)
        press.q_filters = loaded

    # Record the scores QFilterPress gives each layer's keys during the prefill it compresses.
    scores = {}
    score = press.score

    def recording_score(module, *a, **kw):
        out = score(module, *a, **kw)
        scores[module.layer_idx] = out[0].detach().float()  # [kv_heads, T]
        return out

    press.score = recording_score
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(args.model)),
                                              gguf_file=os.path.basename(args.model), torch_dtype=torch.float32)
    hf.eval()
    with torch.no_grad(), press(hf):
        hf(torch.tensor([ids]))

    # ScorerPress keeps the top int(T * (1 - compression_ratio)) scores of each head.
    n_kept = int(len(ids) * (1 - args.ratio))
    agree = []
    for layer in sorted(scores):
        kept = scores[layer].topk(n_kept, dim=-1).indices
        for h in range(kept.shape[0]):
            agree.append(len(set(kept[h].tolist()) & set(held[layer][h])) / n_kept)
    agree = np.array(agree)
    print(f"{len(agree)} KV heads, {len(ids)} prompt tokens, ratio {args.ratio}: kvpress and qfilters keep the same "
          f"tokens at {agree.mean():.4f} (mean), {agree.min():.4f} (worst head)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
