#!/usr/bin/env python3
"""Load generator for qf serve: N concurrent sessions, each a long prompt (State of the Union
text) and a fixed number of generated tokens, for each KV configuration, side by side in one run.

For every (configuration, N) it starts a fresh server on 127.0.0.1, fires N streaming
completions at once (asyncio + the openai client), and reports aggregate generated tokens/s,
time to first token (p50/p99), the server's peak resident memory and the KV bytes it held.

  scripts/bench_server.py --sessions 1,4,16 --prompt-tokens 4096 --gen 256 \
      --filters models/SmolLM2-135M-Instruct.qfilters.safetensors --json results/bench_server.json
"""
import argparse
import asyncio
import glob
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time

import openai

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        m = re.search(r"VmRSS:\s+(\d+) kB", f.read())
    return int(m.group(1)) / 1024 if m else 0.0


class Server:
    def __init__(self, qf, model, args):
        self.proc = subprocess.Popen([qf, "serve", "-m", model, "--port", "0", *args],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.port = None
        log = []
        for line in self.proc.stderr:
            log.append(line)
            m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        if self.port is None:
            raise RuntimeError("qf serve did not start: " + "".join(log))
        self.peak_rss = rss_mib(self.proc.pid)
        self._stop = False
        self._sampler = threading.Thread(target=self._sample_rss, daemon=True)
        self._sampler.start()

    def _sample_rss(self):
        while not self._stop:
            try:
                self.peak_rss = max(self.peak_rss, rss_mib(self.proc.pid))
            except OSError:
                return
            time.sleep(0.05)

    def metrics(self):
        import urllib.request
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30).read().decode()
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^qf_(\w+) (\S+)$", text, re.M)}

    def stop(self):
        self._stop = True
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        self.proc.stderr.close()


def prompts(n, n_tokens, tokenize):
    """n different prompts of about n_tokens tokens each, cut from the addresses after 2000."""
    files = sorted(glob.glob(os.path.join(ROOT, "data", "sotu", "*.txt")))
    files = [f for f in files if int(os.path.basename(f)[:4]) >= 2000] or files
    text = " ".join(open(f, encoding="utf-8").read() for f in files)
    words = text.split()
    out, i = [], 0
    per = int(n_tokens * 0.7)  # about 1.3-1.4 tokens a word; trimmed below
    for _ in range(n):
        chunk = " ".join(words[i:i + per])
        i = (i + per) % max(1, len(words) - per)
        ids = tokenize(chunk)
        while len(ids) > n_tokens:
            chunk = chunk[: int(len(chunk) * n_tokens / len(ids) * 0.98)]
            ids = tokenize(chunk)
        out.append(chunk + "\n\nSummary:")
    return out


async def one(api, model, prompt, gen):
    t0 = time.perf_counter()
    ttft, n = None, 0
    stream = await api.completions.create(model=model, prompt=prompt, max_tokens=gen, temperature=0.8, seed=1,
                                          stream=True, extra_body={"n_predict": gen})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text and ttft is None:
            ttft = time.perf_counter() - t0
        n += 1
    end = time.perf_counter() - t0
    ttft = ttft or end
    # this session's own decode speed: the tokens after the first over the time they took
    decode_tok_s = (n - 1) / (end - ttft) if n > 1 and end > ttft else 0.0
    return ttft, end, decode_tok_s


async def run_load(port, model, batch, gen):
    api = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=3600, max_retries=0)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(api, model, p, gen) for p in batch))
    return results, time.perf_counter() - t0


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qf", default=os.path.join(ROOT, "build", "qf"))
    ap.add_argument("-m", "--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--filters", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.qfilters.safetensors"))
    ap.add_argument("--sessions", default="1,4,16,64")
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=0)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    sessions = [int(x) for x in a.sessions.split(",")]
    ctx = a.prompt_tokens + a.gen + 64
    configs = [("full cache", ["--kv-policy", "none"]),
               (f"qfilters B={a.budget}", ["--kv-policy", "qfilters", "--filters", a.filters, "--kv-budget", str(a.budget),
                                           "--kv-window", str(a.window), "--kv-evict-every", "16"])]
    rows = []
    print(f"# load average at start: {os.getloadavg()}", flush=True)
    print("| KV cache | sessions | prompt tok | gen tok | aggregate gen tok/s | aggregate decode tok/s | TTFT p50 s | TTFT p99 s | peak RSS MiB | KV reserved MiB | KV full-cache MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, kv in configs:
        for n in sessions:
            srv = Server(a.qf, a.model, ["-np", str(n), "-c", str(ctx), "-t", str(a.threads), "--max-queued", str(n), *kv])
            try:
                import urllib.request

                def tokenize(s):
                    req = urllib.request.Request(f"http://127.0.0.1:{srv.port}/tokenize",
                                                 data=json.dumps({"content": s}).encode(), method="POST",
                                                 headers={"Content-Type": "application/json"})
                    return json.loads(urllib.request.urlopen(req, timeout=60).read())["tokens"]

                batch = prompts(n, a.prompt_tokens, tokenize)
                results, wall = asyncio.run(run_load(srv.port, os.path.basename(a.model), batch, a.gen))
                m = srv.metrics()
                ttfts = [r[0] for r in results]
                row = {"kv": name, "sessions": n, "prompt_tokens": a.prompt_tokens, "gen": a.gen,
                       "aggregate_gen_tok_s": m["tokens_generated_total"] / wall, "wall_s": wall,
                       # sum of every session's own decode speed (tokens after its first / their time)
                       "aggregate_decode_tok_s": sum(r[2] for r in results),
                       "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": pct(ttfts, 0.99),
                       "peak_rss_mib": srv.peak_rss, "kv_reserved_mib": m["kv_bytes_reserved"] / 2**20,
                       "kv_full_mib": m["kv_bytes_full_cache"] / 2**20, "load_avg": os.getloadavg()}
                rows.append(row)
                print(f"| {name} | {n} | {a.prompt_tokens} | {a.gen} | {row['aggregate_gen_tok_s']:.1f} | {row['aggregate_decode_tok_s']:.1f} | "
                      f"{row['ttft_p50_s']:.2f} | {row['ttft_p99_s']:.2f} | {row['peak_rss_mib']:.0f} | "
                      f"{row['kv_reserved_mib']:.1f} | {row['kv_full_mib']:.1f} |", flush=True)
            finally:
                srv.stop()
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "args": vars(a)}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
