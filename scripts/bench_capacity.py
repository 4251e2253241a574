#!/usr/bin/env python3
"""How many concurrent sessions of a given context fit in a KV memory limit: the server's
admission control measured, not computed. For each KV configuration it starts qf serve with
--kv-memory MIB and many slots, opens more streaming sessions than can fit (each generating
until stopped), counts the ones admitted and the ones refused with 503, reads the server's KV
bytes, then disconnects them all. Beside it, the arithmetic for llama.cpp's default cache (f16
keys and values for the whole context, as llama.cpp allocates at start-up).

  scripts/bench_capacity.py --kv-memory 2048 -c 8192 --try 256
"""
import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import http.client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(qf, model, args):
    proc = subprocess.Popen([qf, "serve", "-m", model, "--port", "0", *args], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, int(m.group(1))
    raise RuntimeError("qf serve did not start")


def open_session(port, i, results):
    """Starts a streaming completion and records whether it was admitted (first token) or not."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"prompt": f"Session {i}: once upon a time", "max_tokens": 100000, "stream": True,
            "ignore_eos": True, "temperature": 0.8}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        results[i] = r.status
        r.read()
        conn.close()
        return None
    r.fp.readline()  # the first event: this session has its cache and is generating
    results[i] = 200
    return conn


def metrics(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^qf_(\w+) (\S+)$", text, re.M)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qf", default=os.path.join(ROOT, "build", "qf"))
    ap.add_argument("-m", "--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--filters", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.qfilters.safetensors"))
    ap.add_argument("--kv-memory", type=int, default=2048, help="MiB")
    ap.add_argument("-c", "--ctx", type=int, default=8192)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("-b", "--batch", type=int, default=512)
    ap.add_argument("--try", dest="n_try", type=int, default=256, help="sessions to open")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    from gguf import GGUFReader  # the model's shape, for llama.cpp's arithmetic
    g = GGUFReader(a.model)
    arch = bytes(g.fields["general.architecture"].parts[-1]).decode()
    val = lambda k: int(g.fields[f"{arch}.{k}"].parts[-1][0])
    n_layer, n_head, n_head_kv = val("block_count"), val("attention.head_count"), val("attention.head_count_kv")
    head_dim = val("embedding_length") // n_head
    llama_bytes = n_layer * 2 * n_head_kv * head_dim * 2 * a.ctx  # f16 K and V for the whole context
    llama_fit = (a.kv_memory << 20) // llama_bytes
    print(f"# llama.cpp default (f16 K/V, full {a.ctx}-token context): {llama_bytes / 2**20:.1f} MiB a session, "
          f"{llama_fit} fit in {a.kv_memory} MiB")
    configs = [("full cache, f16", ["--kv-policy", "none"]),
               (f"qfilters B={a.budget}, f16", ["--kv-policy", "qfilters", "--filters", a.filters, "--kv-budget", str(a.budget)]),
               (f"qfilters B={a.budget}, q8_0", ["--kv-policy", "qfilters", "--filters", a.filters, "--kv-budget", str(a.budget),
                                                 "-ctk", "q8_0", "-ctv", "q8_0"])]
    rows = []
    print("| KV cache | admitted | refused (503) | KV reserved MiB | MiB a session | vs llama.cpp |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, kv in configs:
        proc, port = start(a.qf, a.model, ["-np", str(a.n_try), "-c", str(a.ctx), "-b", str(a.batch), "-t", "1",
                                           "--kv-memory", str(a.kv_memory), "--max-queued", str(a.n_try), *kv])
        results, conns = {}, []
        try:
            for i in range(a.n_try):
                c = open_session(port, i, results)
                if c:
                    conns.append(c)
            m = metrics(port)
        finally:
            for c in conns:
                c.close()
            proc.terminate()
            proc.wait(60)
        admitted = sum(1 for s in results.values() if s == 200)
        refused = sum(1 for s in results.values() if s == 503)
        per = m["kv_bytes_reserved"] / max(1, admitted) / 2**20
        row = {"kv": name, "admitted": admitted, "refused": refused, "other": len(results) - admitted - refused,
               "kv_reserved_mib": m["kv_bytes_reserved"] / 2**20, "mib_per_session": per,
               "vs_llamacpp": admitted / max(1, llama_fit)}
        rows.append(row)
        print(f"| {name} | {admitted} | {refused} | {row['kv_reserved_mib']:.0f} | {per:.1f} | {row['vs_llamacpp']:.1f}x |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"llama_cpp_mib_per_session": llama_bytes / 2**20, "llama_cpp_fit": llama_fit, "rows": rows,
                       "args": vars(a)}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
