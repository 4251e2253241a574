#!/usr/bin/env python3
"""Python overhead: decoding speed through qfilters.Session.generate (one Python iteration per
token) against `qf run` on the same prompt, model, threads and KV cache (greedy, fixed length).
    python3 scripts/bench_python.py [--model M] [--threads T] [-n 256] [--qf build/qf]
Prints tok/s for both and the ratio; run on a quiet machine."""
import argparse
import re
import subprocess
import time

import qfilters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("-n", type=int, default=256, help="tokens to generate")
    ap.add_argument("--qf", default="build/qf")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    prompt = "The history of the city begins"
    kv = ["--kv-policy", "knorm", "--kv-budget", "128", "--kv-window", "16"]

    model = qfilters.Model(a.model, threads=a.threads or None, n_ctx=2048)
    s = qfilters.Session(model, kv=qfilters.KVConfig(policy="knorm", budget=128, window=16), n_ctx=2048)
    py = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        first = None
        for _piece in s.generate(prompt, max_tokens=a.n, temperature=0, ignore_eos=True, stream=True):
            first = first or time.perf_counter()
        py.append((a.n - 1) / (time.perf_counter() - first))

    cli = []
    for _ in range(a.repeats):
        err = subprocess.run([a.qf, "run", "-m", a.model, "-p", prompt, "-n", str(a.n), "--temp", "0", "--ignore-eos",
                              "-t", str(a.threads), "-c", "2048", *kv], capture_output=True, text=True,
                             check=True).stderr
        cli.append(float(re.search(r"generation: \d+ tokens in [\d.]+ ms \(([\d.]+) tok/s\)", err).group(1)))
    print(f"python generate: {max(py):.1f} tok/s | qf run: {max(cli):.1f} tok/s | ratio {max(py) / max(cli):.3f} "
          f"({model.threads} threads, {qfilters.simd_target()}, best of {a.repeats})")


if __name__ == "__main__":
    main()
