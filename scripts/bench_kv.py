#!/usr/bin/env python3
"""KV cache memory and speed, side by side in one run (issue: bounded per-head KV cache).

For SmolLM2-135M at a long context (default: an 8,000-token prompt in an 8,192 context), runs
`qf bench` with the full cache and with each policy at a budget, and prints:
  decode tok/s (median), KV bytes in use vs a full cache, and the share of decode time spent
  scoring and evicting (the policy's own cost; attention-based policies also pay for the
  non-fused attention path, which shows in their decode speed).
Every row is repeated for each KV storage type pair (--cache-type-k / --cache-type-v, comma-
separated lists zipped pairwise, like llama.cpp's -ctk / -ctv; default f16 as qf's default).
Writes results/bench_kv.json. Usage: scripts/bench_kv.py [--threads 2] [--reps 3]
  e.g. scripts/bench_kv.py --threads 1 --policies qfilters --cache-type-k f32,f16,q8_0 --cache-type-v f32,f16,q8_0
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def run(qf, model, args, threads, reps, n_prompt, n_gen, ctx):
    cmd = [qf, "bench", "-m", model, "-p", str(n_prompt), "-n", str(n_gen), "-c", str(ctx), "-t", str(threads),
           "-r", str(reps), "--json"] + args
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qf", default=os.path.join(ROOT, "build", "qf"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--filters", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.qfilters.safetensors"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=8000)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--evict-every", type=int, default=16)
    ap.add_argument("--policies", default="qfilters,knorm,streaming,random,snapkv,tova,h2o")
    ap.add_argument("--cache-type-k", default="f16", help="key storage types, comma-separated")
    ap.add_argument("--cache-type-v", default="f16", help="value storage types, comma-separated (zipped with -k)")
    a = ap.parse_args()
    ks, vs = a.cache_type_k.split(","), a.cache_type_v.split(",")
    if len(ks) != len(vs):
        sys.exit("--cache-type-k and --cache-type-v need as many types each")
    if not os.path.exists(a.filters):
        sys.exit(f"{a.filters} is missing: make it with  {a.qf} calibrate -m {a.model} -o {a.filters}")
    rows = []
    configs = [("none (full cache)", [])]
    for p in a.policies.split(","):
        kv = ["--kv-policy", p, "--kv-budget", str(a.budget), "--kv-window", str(a.window),
              "--kv-evict-every", str(a.evict_every)]
        if p == "qfilters":
            kv += ["--filters", a.filters]
        configs.append((p, kv))
    for ctk, ctv in zip(ks, vs):
        for name, kv in configs:
            print(f"running {name} with {ctk}/{ctv} ...", file=sys.stderr, flush=True)
            r = run(a.qf, a.model, kv + ["-ctk", ctk, "-ctv", ctv], a.threads, a.reps, a.prompt, a.gen, a.ctx)
            r["config"] = name
            rows.append(r)
    full = rows[0]
    print(f"\nSmolLM2-135M Q4_1, {a.prompt}-token prompt, {a.gen} tokens decoded, context {a.ctx}, "
          f"{full['threads']} threads ({full['simd']}), median of {a.reps}; budget {a.budget}, window {a.window}, "
          f"evict every {a.evict_every}\n")
    print("(vs full: against the first row, the full cache of the first type pair)\n")
    print("| KV cache | K/V types | bytes/token/layer | decode tok/s | vs full | KV in use (MiB) | KV reserved (MiB) "
          "| scoring+eviction share of decode |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        share = f"{100 * r['kv_overhead_share']:.2f}%" if "kv_overhead_share" in r else "-"
        print(f"| {r['config']} | {r['cache_type_k']}/{r['cache_type_v']} | {r['kv_bytes_per_token_per_layer']} | "
              f"{r['decode_tok_s']:.1f} | {r['decode_tok_s'] / full['decode_tok_s']:.2f}x | "
              f"{r['kv_bytes_used'] / 2**20:.2f} | {r['kv_bytes_reserved'] / 2**20:.2f} | {share} |")
    os.makedirs(os.path.join(ROOT, "results"), exist_ok=True)
    with open(os.path.join(ROOT, "results", "bench_kv.json"), "w") as f:
        json.dump({"args": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
