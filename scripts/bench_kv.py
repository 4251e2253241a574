#!/usr/bin/env python3
"""KV cache memory and speed, side by side in one run, against llama.cpp's f16 full cache.

For SmolLM2-135M at a long context (default: an 8,000-token prompt in an 8,192 context, then 128
decoded tokens), runs `qf bench` with the full cache and with each policy at a budget, for each
KV storage type pair, and `build-ref/llama_ref bench` (llama.cpp, f16 K/V cache, flash attention
on, same prompt length, context and threads) once, and prints one table:
  decode tok/s (median), decode speed against the first row and against llama.cpp, KV bytes in
  use and reserved, and the bytes in use as a fraction of llama.cpp's full f16 cache (its
  allocation for the whole context, as llama.cpp reports it), and the share of decode time spent
  scoring and evicting (the policy's own cost).
Type pairs: --types f32,f16,q8_0 (the same type for keys and values), or --cache-type-k and
--cache-type-v, comma-separated lists zipped pairwise (llama.cpp's -ctk / -ctv names).
Writes results/bench_kv.json.

The KV storage table (issue 12), about 10 minutes at one thread on an idle 2-core machine:
  scripts/bench_kv.py --threads 1 --reps 1 --policies qfilters --types f32,f16,q8_0
"""
import argparse
import json
import os
import re
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def fail(msg):
    sys.exit("bench_kv: error: " + msg)


def run_json(cmd, what):
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        fail("%s failed (exit %d): %s\n  command: %s" % (what, proc.returncode, proc.stderr.strip()[-2000:],
                                                         " ".join(cmd)))
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr
    except (ValueError, IndexError):
        fail("%s printed no JSON object on its last line\n  command: %s" % (what, " ".join(cmd)))


def run_qf(a, kv):
    cmd = [a.qf, "bench", "-m", a.model, "-p", str(a.prompt), "-n", str(a.gen), "-c", str(a.ctx), "-t",
           str(a.threads), "-r", str(a.reps), "--json"] + kv
    return run_json(cmd, "qf bench")[0]


# llama.cpp logs its cache allocation when the context is made, e.g.
#   llama_kv_cache: size =  180.00 MiB (  8192 cells,  30 layers,  1/1 seqs), K (f16):   90.00 MiB, V (f16): ...
KV_LOG = re.compile(r"size\s*=\s*([0-9.]+) MiB \(\s*(\d+) cells,[^)\n]*\), K \((\w+)\)")


def run_llama(a):
    cmd = [a.llama_ref, "bench", "-m", a.model, "-p", str(a.prompt), "-n", str(a.gen), "-c", str(a.ctx), "-t",
           str(a.threads), "-r", str(a.reps), "--flash-attn", "on", "-v"]
    out, log = run_json(cmd, "llama_ref bench")
    m = KV_LOG.search(log)
    out["kv_bytes_logged"] = float(m.group(1)) * 2**20 if m else None
    out["kv_cells_logged"] = int(m.group(2)) if m else None
    if m and m.group(3) != "f16":
        fail("llama.cpp made a %s cache, not f16" % m.group(3))
    return out


BYTES_PER_VALUE = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32}


def cache_shape(r):
    """(layers, KV values per token per layer: KV heads x head_dim) of a qf bench row; older qf
    builds do not report the shape, so it is then derived from the bytes they do report."""
    if "n_layers" in r:
        return r["n_layers"], r["n_kv_heads"] * r["head_dim"]
    per_layer = r["kv_bytes_per_token_per_layer"]
    values = per_layer / (BYTES_PER_VALUE[r["cache_type_k"]] + BYTES_PER_VALUE[r["cache_type_v"]])
    tokens = r["prompt_tokens"] + r["gen_tokens"]
    return round(r["kv_bytes_full"] / (tokens * per_layer)), round(values)


def f16_full_bytes(shape, n_ctx):
    """An f16 K and V cache of n_ctx tokens on the model's shape (2 bytes a value)."""
    layers, values = shape
    return n_ctx * layers * values * 2 * 2


def fraction(x):
    return "1/%.1f" % (1 / x) if 0 < x < 1 else "%.2fx" % x


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qf", default=os.path.join(ROOT, "build", "qf"))
    ap.add_argument("--llama-ref", default=os.path.join(ROOT, "build-ref", "llama_ref"))
    ap.add_argument("--no-llama", action="store_true", help="skip the llama.cpp row")
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
    ap.add_argument("--policies", default="qfilters,knorm,streaming,random,snapkv,tova,h2o",
                    help="comma-separated; the full cache always runs first")
    ap.add_argument("--types", help="KV types, comma-separated, each for both keys and values (e.g. f32,f16,q8_0)")
    ap.add_argument("--cache-type-k", default="f16", help="key storage types, comma-separated")
    ap.add_argument("--cache-type-v", default="f16", help="value storage types, comma-separated (zipped with -k)")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "bench_kv.json"))
    a = ap.parse_args()
    if a.types:
        ks = vs = a.types.split(",")
    else:
        ks, vs = a.cache_type_k.split(","), a.cache_type_v.split(",")
    if len(ks) != len(vs):
        fail("--cache-type-k and --cache-type-v need as many types each")
    if a.threads < 1 or a.reps < 1 or a.prompt < 1 or a.gen < 1 or a.prompt + a.gen > a.ctx:
        fail("--threads, --reps, --prompt and --gen must be positive, prompt + gen <= ctx")
    for path, what in ((a.qf, "qf binary"), (a.model, "model")):
        if not os.path.exists(path):
            fail("%s not found: %s" % (what, path))
    if not a.no_llama and not os.access(a.llama_ref, os.X_OK):
        fail("%s is missing (scripts/ref/build.sh builds it), or pass --no-llama" % a.llama_ref)
    policies = [p for p in a.policies.split(",") if p and p != "none"]
    if "qfilters" in policies and not os.path.exists(a.filters):
        fail(f"{a.filters} is missing: make it with  {a.qf} calibrate -m {a.model} -o {a.filters}")

    configs = [("none (full cache)", [])]
    for p in policies:
        kv = ["--kv-policy", p, "--kv-budget", str(a.budget), "--kv-window", str(a.window),
              "--kv-evict-every", str(a.evict_every)]
        if p == "qfilters":
            kv += ["--filters", a.filters]
        configs.append((p, kv))
    # llama.cpp first: a missing or broken reference fails the run before the long qf rows.
    llama = None
    if not a.no_llama:
        print("llama.cpp: full cache, f16/f16, flash attention on ...", file=sys.stderr, flush=True)
        llama = run_llama(a)
    rows = []
    for ctk, ctv in zip(ks, vs):
        for name, kv in configs:
            print(f"qf: {name} with {ctk}/{ctv} ...", file=sys.stderr, flush=True)
            r = run_qf(a, kv + ["-ctk", ctk, "-ctv", ctv])
            r["config"] = name
            rows.append(r)

    shape = cache_shape(rows[0])
    # The reference: llama.cpp's full f16 cache as it reports it; computed from the shape when
    # llama.cpp is skipped or its log line is not found (both are printed).
    computed = f16_full_bytes(shape, llama["n_ctx"] if llama else a.ctx)
    ref = llama["kv_bytes_logged"] if llama and llama["kv_bytes_logged"] else computed

    full = rows[0]
    print(f"\n{os.path.basename(a.model)}, {a.prompt}-token prompt, {a.gen} tokens decoded, context {a.ctx}, "
          f"{full['threads']} threads ({full['simd']}), median of {a.reps}; budget {a.budget}, window {a.window}, "
          f"evict every {a.evict_every}")
    src = "as llama.cpp logs it" if ref != computed else "computed: ctx x layers x KV heads x head_dim x 2 x 2 bytes"
    print(f"llama.cpp f16 full cache: {ref / 2**20:.2f} MiB ({src}; from the shape: {computed / 2**20:.2f} MiB)")
    print("(vs first: decode speed against the first row)\n")
    print("| engine | KV cache | K/V types | bytes/token/layer | decode tok/s | vs first | vs llama.cpp "
          "| KV in use (MiB) | KV reserved (MiB) | in use / llama.cpp f16 full | scoring+eviction share of decode |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        share = f"{100 * r['kv_overhead_share']:.2f}%" if "kv_overhead_share" in r else "-"
        vs_llama = f"{r['decode_tok_s'] / llama['decode_tok_s']:.2f}x" if llama else "-"
        r["kv_fraction_of_llama_f16_full"] = r["kv_bytes_used"] / ref
        print(f"| qf | {r['config']} | {r['cache_type_k']}/{r['cache_type_v']} | {r['kv_bytes_per_token_per_layer']} | "
              f"{r['decode_tok_s']:.1f} | {r['decode_tok_s'] / full['decode_tok_s']:.2f}x | {vs_llama} | "
              f"{r['kv_bytes_used'] / 2**20:.2f} | {r['kv_bytes_reserved'] / 2**20:.2f} | "
              f"{fraction(r['kv_fraction_of_llama_f16_full'])} | {share} |")
    if llama:
        print(f"| llama.cpp | full cache, flash attention | f16/f16 | "
              f"{shape[1] * 2 * 2} | {llama['decode_tok_s']:.1f} | "
              f"{llama['decode_tok_s'] / full['decode_tok_s']:.2f}x | 1.00x | - | {ref / 2**20:.2f} | 1 | - |")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"args": vars(a), "rows": rows, "llama_cpp": llama, "llama_f16_full_bytes": ref,
                   "llama_f16_full_bytes_computed": computed}, f, indent=1)
    print("\nwrote %s" % os.path.relpath(a.out, ROOT), file=sys.stderr)


if __name__ == "__main__":
    main()
