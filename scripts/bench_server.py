#!/usr/bin/env python3
"""Load generator for qf serve: N concurrent sessions, each a long prompt (State of the Union
text) and a fixed number of generated tokens, for each KV configuration, side by side in one run.

For every (configuration, N) it starts a fresh server on 127.0.0.1 and, with the openai client
(asyncio), runs two phases: N new prompts at once (time to first token p50/p99, prefill tok/s),
then every session continues its own prompt from its cache and generates `--gen` tokens with
all N decoding together (aggregate decode tok/s, as llama.cpp's batched-bench counts it). It
reports the server's peak resident memory and the KV bytes it held, in use and reserved.

  scripts/bench_server.py --sessions 1,4,16 --prompt-tokens 4096 --gen 256 \
      --filters models/SmolLM2-135M-Instruct.qfilters.safetensors --json results/bench_server.json

-ctk / -ctv set the servers' KV storage types (default f16, as qf serve's); --kv none,qfilters
picks the caches to run (none = full cache).

"Ask many" (--ask-many): one document of --doc-tokens tokens and 10 different questions about it,
answered one after another on one slot, (a) re-reading the document with each question, and
(b) reading it once, saving the slot's compressed state (POST /slots/0?action=save), then for
each question restoring it (action=restore) and sending document + question, of which only the
question is new. Reports each question's time to first token (b: restore + TTFT) and the ratio.

  scripts/bench_server.py --ask-many --doc-tokens 8192 --json results/bench_ask_many.json
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
import tempfile
import threading
import urllib.request
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
        # keep reading the server's log so it never blocks on a full pipe; the tail is kept for errors
        self.log = log
        threading.Thread(target=self._drain_log, daemon=True).start()
        self.peak_rss = rss_mib(self.proc.pid)
        self._stop = False
        self._sampler = threading.Thread(target=self._sample_rss, daemon=True)
        self._sampler.start()

    def _drain_log(self):
        for line in self.proc.stderr:
            self.log.append(line)
            del self.log[:-200]

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


def prompts(n, n_tokens, tokenize):
    """n different prompts (token ids) of about n_tokens tokens each, cut from the addresses after
    2000 and ending in an instruction, so a continuation is a natural text."""
    files = sorted(glob.glob(os.path.join(ROOT, "data", "sotu", "*.txt")))
    files = [f for f in files if int(os.path.basename(f)[:4]) >= 2000] or files
    text = " ".join(open(f, encoding="utf-8").read() for f in files)
    words = text.split()
    tail = tokenize("\n\nSummary:")
    want = n_tokens - len(tail)
    out, i = [], 0
    per = int(n_tokens * 0.7)  # about 1.3-1.4 tokens a word: more words until they make n_tokens, then cut
    for _ in range(n):
        while True:
            ids = tokenize(" ".join((words[i:] + words)[:per]))
            if len(ids) >= want or per >= len(words):
                break
            per = int(per * 1.2) + 1
        if len(ids) < want:
            raise RuntimeError(f"the corpus has fewer than {n_tokens} tokens")
        i = (i + per) % len(words)
        out.append(ids[:want] + tail)
    return out


async def request(api, model, prompt, slot, max_tokens):
    """One streaming completion on a given slot. Returns (time to first token, total time, this
    request's decode speed: tokens after the first over the time they took, usage)."""
    t0 = time.perf_counter()
    ttft, n, usage = None, 0, None
    stream = await api.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.8, seed=slot + 1,
                                          stream=True, stream_options={"include_usage": True},
                                          extra_body={"id_slot": slot, "ignore_eos": True, "cache_prompt": True})
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].text:
            ttft = ttft or time.perf_counter() - t0
            n += 1
    end = time.perf_counter() - t0
    ttft = ttft or end
    decode_tok_s = (n - 1) / (end - ttft) if n > 1 and end > ttft else 0.0
    return ttft, end, decode_tok_s, usage


async def run_phase(port, model, batch, max_tokens):
    api = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=7200, max_retries=0)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(request(api, model, p, slot, max_tokens) for slot, p in enumerate(batch)))
    wall = time.perf_counter() - t0
    await api.close()
    return results, wall


QUESTIONS = [
    "What did the speaker say about the economy?",
    "Which countries are mentioned, and why?",
    "What is said about health care?",
    "What does the speaker ask Congress to do?",
    "What is said about education and schools?",
    "Which threats to national security are named?",
    "What is said about taxes?",
    "What is said about energy?",
    "Who is thanked or honoured in the speech?",
    "What is the closing message?",
]


def post(port, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=3600).read())


def ttft(api, model, prompt, gen):
    """Seconds to the first streamed token of one greedy completion (prompt: token ids), and its text."""
    t0 = time.perf_counter()
    first, text = None, ""
    stream = api.completions.create(model=model, prompt=prompt, max_tokens=gen, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            if first is None:
                first = time.perf_counter() - t0
            text += chunk.choices[0].text
    return (first if first is not None else time.perf_counter() - t0), text


def ask_many(a, kv):
    """(a) re-prefill the document for each question vs (b) restore its saved state, on one slot."""
    with tempfile.TemporaryDirectory() as states:
        srv = Server(a.qf, a.model, ["-np", "1", "-c", str(a.doc_tokens + 256), "-t", str(a.threads),
                                     "--slot-save-path", states, "-ctk", a.cache_type_k, "-ctv", a.cache_type_v, *kv])
        try:
            model = os.path.basename(a.model)
            api = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="none", timeout=3600, max_retries=0)
            tokenize = lambda text: post(srv.port, "/tokenize", {"content": text})["tokens"]
            bos = post(srv.port, "/tokenize", {"content": "", "add_special": True})["tokens"]  # BOS, if the model adds one
            doc = bos + prompts(1, a.doc_tokens - 16, tokenize)[0]  # token ids, as a prompt
            questions = [tokenize(f"\n\nQuestion: {q}\nAnswer:") for q in QUESTIONS[:a.questions]]
            rows = []
            for q in questions:  # (a) the document read again with every question
                post(srv.port, "/slots/0?action=erase", {})
                t, _ = ttft(api, model, doc + q, a.answer_tokens)
                rows.append({"question_tokens": len(q), "reprefill_ttft_s": t})
            post(srv.port, "/slots/0?action=erase", {})
            t0 = time.perf_counter()
            ttft(api, model, doc, 1)  # (b) read once ...
            prefill_s = time.perf_counter() - t0
            saved = post(srv.port, "/slots/0?action=save", {"filename": "doc.qfstate"})
            for row, q in zip(rows, questions):  # ... and restored for every question
                t0 = time.perf_counter()
                restored = post(srv.port, "/slots/0?action=restore", {"filename": "doc.qfstate"})
                restore_s = time.perf_counter() - t0
                t, _ = ttft(api, model, doc + q, a.answer_tokens)
                row.update({"restore_s": restore_s, "restore_ms_server": restored["timings"]["restore_ms"],
                            "restored_ttft_s": t, "restored_total_s": restore_s + t})
            return {"doc_tokens": len(doc), "prefill_once_s": prefill_s, "state_bytes": saved["n_written"],
                    "save_ms": saved["timings"]["save_ms"], "rows": rows, "peak_rss_mib": srv.peak_rss}
        finally:
            srv.stop()


def print_ask_many(name, r):
    print(f"\n## ask many, {name}: document {r['doc_tokens']} tokens, read once in {r['prefill_once_s']:.2f} s; "
          f"state file {r['state_bytes'] / 2**20:.2f} MiB saved in {r['save_ms']:.0f} ms")
    print("| question | tokens | (a) re-prefill TTFT s | (b) restore s | (b) TTFT s | (b) total s | (a) / (b) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for i, row in enumerate(r["rows"]):
        print(f"| {i + 1} | {row['question_tokens']} | {row['reprefill_ttft_s']:.3f} | {row['restore_s']:.3f} | "
              f"{row['restored_ttft_s']:.3f} | {row['restored_total_s']:.3f} | "
              f"{row['reprefill_ttft_s'] / row['restored_total_s']:.1f}x |")
    a = statistics.median(x["reprefill_ttft_s"] for x in r["rows"])
    b = statistics.median(x["restored_total_s"] for x in r["rows"])
    r["median_ratio"] = a / b
    print(f"| median | | {a:.3f} | | | {b:.3f} | {a / b:.1f}x |", flush=True)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qf", default=os.path.join(ROOT, "build", "qf"))
    ap.add_argument("-m", "--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--filters", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.qfilters.safetensors"))
    ap.add_argument("--sessions", default="1,4,16,64")
    ap.add_argument("--full-sessions", default=None,
                    help="session counts for the full cache (default: --sessions); its N=64 prefill alone is ~13 min on 2 cores")
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=0)
    ap.add_argument("-ctk", "--cache-type-k", default="f16", help="KV storage type of keys (the server's -ctk)")
    ap.add_argument("-ctv", "--cache-type-v", default="f16", help="KV storage type of values (the server's -ctv)")
    ap.add_argument("--kv", default="none,qfilters", help="KV caches to run: none (full cache), qfilters (at --budget)")
    ap.add_argument("--json", default="")
    ap.add_argument("--ask-many", action="store_true", help="the ask-many benchmark instead of the load test")
    ap.add_argument("--doc-tokens", type=int, default=8192, help="--ask-many: document length")
    ap.add_argument("--questions", type=int, default=10, help="--ask-many: questions (at most 10)")
    ap.add_argument("--answer-tokens", type=int, default=8, help="--ask-many: tokens generated per answer")
    ap.add_argument("--ask-many-kv", default="qfilters,none",
                    help="--ask-many: KV caches to compare (qfilters at --budget, none = full cache)")
    a = ap.parse_args()
    qfilters_kv = ["--kv-policy", "qfilters", "--filters", a.filters, "--kv-budget", str(a.budget),
                   "--kv-window", str(a.window), "--kv-evict-every", "16"]
    if a.ask_many:
        print(f"# load average at start: {os.getloadavg()}", flush=True)
        out = {}
        for which in a.ask_many_kv.split(","):
            name, kv = (f"qfilters B={a.budget}", qfilters_kv) if which == "qfilters" else ("full cache", ["--kv-policy", "none"])
            out[name] = ask_many(a, kv)
            print_ask_many(name, out[name])
        if a.json:
            os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
            with open(a.json, "w") as f:
                json.dump({"ask_many": out, "args": vars(a), "load_avg": os.getloadavg()}, f, indent=1)
        return 0
    sessions = [int(x) for x in a.sessions.split(",")]
    ctx = a.prompt_tokens + a.gen + 64
    types = ["-ctk", a.cache_type_k, "-ctv", a.cache_type_v]
    configs = [c for c in [("full cache", ["--kv-policy", "none"]), (f"qfilters B={a.budget}", qfilters_kv)]
               if ("none" if c[0] == "full cache" else "qfilters") in a.kv.split(",")]
    rows = []
    print(f"# load average at start: {os.getloadavg()}; KV types -ctk {a.cache_type_k} -ctv {a.cache_type_v}", flush=True)
    print("| KV cache | sessions | prompt tok | gen tok | TTFT p50 s | TTFT p99 s | prefill tok/s | aggregate decode tok/s | decode tok/s per session | peak RSS MiB | KV in use MiB | KV reserved MiB | KV full-cache MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    full_sessions = [int(x) for x in a.full_sessions.split(",")] if a.full_sessions else sessions
    for name, kv in configs:
        for n in (full_sessions if name == "full cache" else sessions):
            srv = Server(a.qf, a.model, ["-np", str(n), "-c", str(ctx), "-t", str(a.threads), "--max-queued", str(n), *types, *kv])
            try:
                def tokenize(s):
                    req = urllib.request.Request(f"http://127.0.0.1:{srv.port}/tokenize",
                                                 data=json.dumps({"content": s}).encode(), method="POST",
                                                 headers={"Content-Type": "application/json"})
                    return json.loads(urllib.request.urlopen(req, timeout=60).read())["tokens"]

                batch = prompts(n, a.prompt_tokens, tokenize)
                # Phase 1, prefill: N new prompts arrive at once (one token each), as a burst of
                # new conversations does. Phase 2, decode: each slot continues its own prompt
                # (the prompt's cache is reused, checked below) and generates `gen` tokens, so
                # all N sessions decode together, as llama.cpp's batched-bench measures it.
                first, wall1 = asyncio.run(run_phase(srv.port, os.path.basename(a.model), batch, 1))
                suffix = tokenize(" In short,")
                second, wall2 = asyncio.run(run_phase(srv.port, os.path.basename(a.model),
                                                      [p + suffix for p in batch], a.gen))
                reused = [r[3].prompt_tokens_details.cached_tokens if r[3] and r[3].prompt_tokens_details else 0
                          for r in second]
                if min(reused) < min(len(p) for p in batch):
                    raise RuntimeError(f"the decode phase did not reuse the prompts' caches: {reused}")
                m = srv.metrics()
                ttfts = [r[0] for r in first]
                generated = sum(r[3].completion_tokens for r in second)
                row = {"kv": name, "ctk": a.cache_type_k, "ctv": a.cache_type_v, "sessions": n, "prompt_tokens": a.prompt_tokens,
                       "prompt_tokens_measured": statistics.mean(len(p) for p in batch), "gen": a.gen,
                       "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": pct(ttfts, 0.99),
                       "prefill_tok_s": sum(len(p) for p in batch) / wall1,
                       "aggregate_decode_tok_s": generated / wall2,
                       "decode_tok_s_per_session": statistics.mean(r[2] for r in second),
                       "peak_rss_mib": srv.peak_rss, "kv_reserved_mib": m["kv_bytes_reserved"] / 2**20,
                       "kv_in_use_mib": m["kv_bytes_used"] / 2**20,
                       "kv_full_mib": m["kv_bytes_full_cache"] / 2**20, "load_avg": os.getloadavg()}
                rows.append(row)
                print(f"| {name} | {n} | {a.prompt_tokens} | {a.gen} | {row['ttft_p50_s']:.2f} | {row['ttft_p99_s']:.2f} | "
                      f"{row['prefill_tok_s']:.0f} | {row['aggregate_decode_tok_s']:.1f} | {row['decode_tok_s_per_session']:.1f} | "
                      f"{row['peak_rss_mib']:.0f} | {row['kv_in_use_mib']:.1f} | {row['kv_reserved_mib']:.1f} | "
                      f"{row['kv_full_mib']:.1f} |", flush=True)
            except Exception:
                print(f"server exit code {srv.proc.poll()}; its last log lines:\n" + "".join(srv.log[-20:]), file=sys.stderr)
                raise
            finally:
                srv.stop()
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "args": vars(a)}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
