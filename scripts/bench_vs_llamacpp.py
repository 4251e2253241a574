#!/usr/bin/env python3
"""Prefill and decode speed of qf against llama.cpp on the same model, threads and shapes.

Runs `qf bench` and `llama_ref bench` (scripts/ref/llama_ref.cpp) one repetition at a time,
alternating engines (qf, llama.cpp, qf, ...) so that both see the same machine noise, then
prints a markdown table of medians and writes results/bench_vs_llamacpp.json.

Both engines measure llama-bench style: prefill = one P-token prompt fed in chunks of -b tokens
(512: a single batch at P = 512); decode = N greedy single-token steps on top of that P-token
context.

  scripts/bench_vs_llamacpp.py [--model M] [--threads T] [--reps R] [--qf build/qf]
  scripts/bench_vs_llamacpp.py --llama-only     # just llama.cpp (e.g. before qf bench exists)

Several qf configurations against one llama.cpp run: repeat --qf-args, e.g. the full cache and a
Q-Filters budget at a 16k-token depth (each row's ratios are against llama.cpp's full cache):

  scripts/bench_vs_llamacpp.py --model models/gemma-3-270m-q4_k_m.gguf -p 16384 -n 64 --qf-args '' \
      --qf-args '--kv-policy qfilters --filters F --kv-budget 1024 --kv-window 64'
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEFAULT_MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
LLAMA_REF = os.path.join(ROOT, "build-ref", "llama_ref")
REQUIRED = ["prefill_tok_s", "decode_tok_s", "prompt_tokens", "gen_tokens", "threads",
            "peak_rss_mb"]


def fail(msg):
    sys.exit("bench_vs_llamacpp: error: " + msg)


def ensure_llama_ref():
    # build.sh fetches llama.cpp when missing and is a no-op when the binary is up to date.
    subprocess.run([os.path.join(ROOT, "scripts", "ref", "build.sh")], check=True)
    if not os.access(LLAMA_REF, os.X_OK):
        fail("scripts/ref/build.sh did not produce " + LLAMA_REF)


def check_qf(qf, model):
    if not os.access(qf, os.X_OK):
        fail("qf binary not found at %s (build it: cmake --build build --target qf, or pass --qf)"
             % qf)
    # CLI11 answers --help even for an unknown subcommand, so also look for bench in the text.
    proc = subprocess.run([qf, "bench", "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    if proc.returncode != 0 or "bench" not in proc.stdout:
        first = (proc.stdout.strip().splitlines() or ["(no output)"])[0]
        fail("`%s bench` is not available (%s); run with --llama-only to time llama.cpp alone"
             % (qf, first))


def run_json(cmd, engine, expect):
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        fail("%s failed (exit %d): %s\n  command: %s"
             % (engine, proc.returncode, proc.stderr.strip()[-2000:], " ".join(cmd)))
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        fail("%s printed no JSON object on its last line\n  command: %s" % (engine, " ".join(cmd)))
    missing = [k for k in REQUIRED if k not in out]
    if missing:
        fail("%s output lacks %s" % (engine, ", ".join(missing)))
    # Both engines must have measured the same shapes, or the ratio means nothing.
    for k, v in expect.items():
        if out[k] != v:
            fail("%s reports %s = %s, asked for %s" % (engine, k, out[k], v))
    return out


def summarize(engine, outs):
    # One rep per call, so each call's median is that rep's value; fall back to the median key.
    pre = [r for o in outs for r in o.get("prefill_runs", [o["prefill_tok_s"]])]
    dec = [r for o in outs for r in o.get("decode_runs", [o["decode_tok_s"]])]
    # Tokens per CPU second (1 thread on a shared machine: about the idle speed), where reported.
    cpu = {k: statistics.median(o[k] for o in outs)
           for k in ("prefill_tok_per_cpu_s", "decode_tok_per_cpu_s") if all(k in o for o in outs)}
    return {
        "engine": engine,
        "prefill_tok_s": statistics.median(pre),
        "decode_tok_s": statistics.median(dec),
        "prefill_runs": pre,
        "decode_runs": dec,
        **cpu,
        "peak_rss_mb": max(o["peak_rss_mb"] for o in outs),
        "details": {k: v for k, v in outs[-1].items()
                    if k not in ("prefill_runs", "decode_runs", "prefill_tok_s", "decode_tok_s",
                                 "prefill_tok_per_cpu_s", "decode_tok_per_cpu_s")},
    }


def print_ratios(rows, llama, unit, prefill, decode, suffix, with_rss=False):
    """A markdown table of each engine's prefill and decode rates and their ratios to llama.cpp's;
    the ratios are also stored in each row (ratio_prefill<suffix>, ratio_decode<suffix>)."""
    print("| engine | prefill %s | decode %s | prefill qf/llama.cpp | decode qf/llama.cpp |%s" %
          (unit, unit, " peak RSS MB |" if with_rss else ""))
    print("|---|---:|---:|---:|---:|" + ("---:|" if with_rss else ""))
    for r in rows:
        rp, rd = r[prefill] / llama[prefill], r[decode] / llama[decode]
        r["ratio_prefill" + suffix], r["ratio_decode" + suffix] = round(rp, 4), round(rd, 4)
        print("| %s | %.1f | %.1f | %.2f | %.2f |" % (r["engine"], r[prefill], r[decode], rp, rd) +
              (" %.0f |" % r["peak_rss_mb"] if with_rss else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--qf", default=os.path.join(ROOT, "build", "qf"))
    ap.add_argument("-p", "--prompt", type=int, default=512, help="prefill tokens (one batch)")
    ap.add_argument("-n", "--gen", type=int, default=128, help="decode tokens after the prompt")
    ap.add_argument("-c", "--ctx", type=int, default=0,
                    help="context of both engines (default: prompt + decode tokens)")
    ap.add_argument("-b", "--batch", type=int, default=512,
                    help="prompt tokens per forward chunk, both engines (default 512)")
    ap.add_argument("--llama-args", default="",
                    help="extra llama_ref bench options, e.g. '--flash-attn off --kv-f32'")
    ap.add_argument("--qf-args", action="append",
                    help="extra qf bench options, e.g. '--kv-policy qfilters --filters F --kv-budget 1024'; "
                         "repeat for several qf rows ('' = the full cache; default: one row, no options)")
    ap.add_argument("--llama-only", action="store_true", help="skip qf")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "bench_vs_llamacpp.json"))
    args = ap.parse_args()
    if args.threads < 1 or args.reps < 1 or args.prompt < 1 or args.gen < 1 or args.batch < 1:
        fail("--threads, --reps, -p, -n and -b must be positive")
    ctx = args.ctx or args.prompt + args.gen
    if ctx < args.prompt + args.gen:
        fail("-c %d is shorter than -p + -n = %d" % (ctx, args.prompt + args.gen))
    qf_rows = args.qf_args if args.qf_args else [""]
    if not os.path.isfile(args.model):
        fail("model not found: %s (scripts/fetch_model.sh fetches the default)" % args.model)
    if not args.llama_only:
        check_qf(args.qf, args.model)
    ensure_llama_ref()

    shape = ["-m", args.model, "-p", str(args.prompt), "-n", str(args.gen),
             "-t", str(args.threads), "-r", "1", "-c", str(ctx), "-b", str(args.batch)]
    llama_cmd = [LLAMA_REF, "bench"] + shape + args.llama_args.split()

    engines = [] if args.llama_only else [
        ("qf" + (" " + extra.strip() if extra.strip() else ""),
         [args.qf, "bench"] + shape + ["--json"] + extra.split()) for extra in qf_rows]
    engines.append(("llama.cpp", llama_cmd))
    expect = {"prompt_tokens": args.prompt, "gen_tokens": args.gen, "threads": args.threads}
    outs = {name: [] for name, _ in engines}
    load_before = os.getloadavg()
    for rep in range(args.reps):
        for name, cmd in engines:
            o = run_json(cmd, name, expect)
            outs[name].append(o)
            print("rep %d/%d %-9s prefill %8.1f tok/s  decode %7.1f tok/s"
                  % (rep + 1, args.reps, name, o["prefill_tok_s"], o["decode_tok_s"]),
                  file=sys.stderr)

    rows = [summarize(name, outs[name]) for name, _ in engines]
    llama = rows[-1]
    print("\nmodel %s, %d threads, pp%d / tg%d at depth %d, batch %d, median of %d (load avg %.1f -> %.1f)\n"
          % (os.path.basename(args.model), args.threads, args.prompt, args.gen, args.prompt,
             args.batch, args.reps, load_before[0], os.getloadavg()[0]))
    print_ratios(rows, llama, "tok/s", "prefill_tok_s", "decode_tok_s", "", with_rss=True)
    if args.threads == 1 and all("decode_tok_per_cpu_s" in r for r in rows):
        print("\nper CPU second (1 thread: close to the idle-machine speed when other jobs share the cores)\n")
        print_ratios(rows, llama, "tok/CPU s", "prefill_tok_per_cpu_s", "decode_tok_per_cpu_s", "_cpu")

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                 "cpu": _cpu_name(),
                 "loadavg_1m_before_after": [round(load_before[0], 2),
                                             round(os.getloadavg()[0], 2)]},
        "model": os.path.basename(args.model),
        "threads": args.threads, "reps": args.reps,
        "prompt_tokens": args.prompt, "gen_tokens": args.gen, "ctx": ctx, "batch": args.batch,
        "commands": {name: cmd for name, cmd in engines},
        "engines": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("\nwrote %s" % os.path.relpath(args.out, ROOT), file=sys.stderr)


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
