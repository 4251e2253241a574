#!/usr/bin/env python3
"""Endless generation with a bounded cache (issue 14 item 3): memory and perplexity past the context.

1. Memory: samples --tokens tokens with SmolLM2 at -c --ctx, --policy with --budget tokens per
   head and --kv-positions shift (the tool build/endless, one thread, f16 KV), printing the
   resident memory every 500 tokens; reports its spread after --warmup tokens (the first shift
   happens at --ctx) and whether the run ended without error. --max-seconds stops it early (the
   report says how far it got).
2. Perplexity: teacher-forces --ppl-tokens tokens of State of the Union addresses (years >=
   --min-year, held out from calibration) in chunks of --chunk with the same cache, once with
   shift and once with keep, and compares the perplexity of the targets past the context with
   that of the targets inside it (the issue asks for past/in within 10%).

  scripts/bench_endless.py --build build                  # both, ~1 h at -t 1 on a quiet core
  scripts/bench_endless.py --skip-gen --ppl-tokens 24576   # perplexity only, ~10 min
Memory and perplexity do not depend on the machine's load; only the duration does.
"""
import argparse
import glob
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def text_file(min_year, n_chars, tmpdir):
    """The addresses from min_year on, oldest first, concatenated until n_chars."""
    files = sorted(f for f in glob.glob(os.path.join(ROOT, "data/sotu/*.txt"))
                   if os.path.basename(f)[:4].isdigit() and int(os.path.basename(f)[:4]) >= min_year)
    parts, size = [], 0
    for f in files:
        with open(f, encoding="utf-8") as fh:
            parts.append(fh.read().strip())
        size += len(parts[-1])
        if size >= n_chars:
            break
    path = os.path.join(tmpdir, "sotu.txt")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n\n".join(parts))
    return path, len(parts)


def run_tool(cmd, max_seconds):
    """Runs the tool, yielding its JSON lines; returns (lines, exit status or 'stopped', stderr)."""
    lines = []
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        t0 = time.time()
        status = None
        try:
            for line in p.stdout:
                lines.append(json.loads(line))
                if max_seconds and time.time() - t0 > max_seconds:
                    p.terminate()
                    status = "stopped"
                    break
        finally:
            rc = p.wait()
        err.seek(0)
        return lines, status or rc, err.read().decode(errors="replace").strip()


def memory(args, kv, text):
    cmd = ["nice", "-n", str(args.nice), args.tool, "gen", args.model, kv, str(args.ctx), "shift", text,
           str(args.tokens), "500"]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    lines, status, err = run_tool(cmd, args.max_seconds)
    secs = time.time() - t0
    after = [l for l in lines if l["tokens"] > args.warmup]
    rss = [l["rss_kib"] / 1024 for l in after]
    out = {
        "tokens": lines[-1]["tokens"] if lines else 0,
        "status": status, "stderr": err[-500:], "seconds": round(secs, 1),
        "max_position": max((l["n_past"] for l in lines), default=0),
        "positions_shifted": lines[-1]["shifted"] if lines else 0,
        "rss_mib_after_warmup": [round(min(rss), 2), round(max(rss), 2)] if rss else None,
        "rss_spread_mib": round(max(rss) - min(rss), 3) if rss else None,
        "rss_samples": [(l["tokens"], l["rss_kib"]) for l in lines],
    }
    print(f"memory: {out['tokens']} tokens in {secs:.0f} s, status {status}, highest position {out['max_position']}, "
          f"{out['positions_shifted']} positions shifted; RSS after {args.warmup} tokens "
          f"{out['rss_mib_after_warmup']} MiB (spread {out['rss_spread_mib']} MiB)", flush=True)
    return out


def perplexity(args, kv, text):
    out = {}
    for mode in args.modes.split(","):
        cmd = ["nice", "-n", str(args.nice), args.tool, "nll", args.model, kv, str(args.ctx), mode, text,
               str(args.ppl_tokens), str(args.chunk)]
        print("$ " + " ".join(cmd), flush=True)
        t0 = time.time()
        lines, status, err = run_tool(cmd, 0)
        if status != 0:
            sys.exit(f"{mode}: exit {status}: {err}")
        summary = lines[-1]
        bins = [l for l in lines[:-1]]
        out[mode] = {
            "ppl_in_context": summary["ppl_in_context"], "ppl_past_context": summary["ppl_past_context"],
            "ratio": summary["ppl_past_context"] / summary["ppl_in_context"] if summary["ppl_past_context"] else None,
            "targets": [summary["targets_in_context"], summary["targets_past_context"]],
            "seconds": round(time.time() - t0, 1),
            "curve": [(b["end"], round(math.exp(b["nll_sum"] / b["count"]), 3)) for b in bins],
        }
        r = out[mode]
        past = f"past it {r['ppl_past_context']:.3f} (x{r['ratio']:.3f})" if r["ratio"] else "no target past it"
        print(f"{mode}: perplexity in context {r['ppl_in_context']:.3f}, {past} over {r['targets']} targets; "
              f"per 512 targets: {' '.join(f'{p}' for _, p in r['curve'])}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default="build")
    ap.add_argument("--model", default=os.path.join(ROOT, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--filters", default=os.path.join(ROOT, "models/SmolLM2-135M-Instruct.qfilters.safetensors"))
    ap.add_argument("--policy", default="qfilters")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=100000, help="tokens to generate (memory)")
    ap.add_argument("--warmup", type=int, default=10000, help="tokens before the memory spread is measured")
    ap.add_argument("--max-seconds", type=float, default=0, help="stop the generation after this long (0 = never)")
    ap.add_argument("--ppl-tokens", type=int, default=24576, help="teacher-forced tokens (perplexity)")
    ap.add_argument("--chunk", type=int, default=16, help="teacher-forced tokens per step")
    ap.add_argument("--modes", default="shift,keep", help="--kv-positions modes to teacher-force (comma-separated)")
    ap.add_argument("--min-year", type=int, default=2000)
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--skip-gen", action="store_true")
    ap.add_argument("--skip-ppl", action="store_true")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args()
    args.tool = os.path.join(args.build, "endless")
    if not os.path.exists(args.tool):
        sys.exit(f"{args.tool} missing: cmake --build {args.build} --target endless")
    # Policies that read a filter file: Q-Filters and the ones scoring with its query statistics.
    base = args.policy.split("+")[0]
    reads_filters = base in ("qfilters", "qfilters_rope", "ea_calibrated")
    kv = f"{args.policy}:{args.budget}" + (f":{args.filters}" if reads_filters else "")
    results = {"model": os.path.basename(args.model), "kv": f"{args.policy}:{args.budget}", "ctx": args.ctx,
               "load_average": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        text, n_files = text_file(args.min_year, max(args.ppl_tokens, 64) * 6, tmp)
        results["text_files"] = n_files
        if not args.skip_gen:
            results["memory"] = memory(args, kv, text)
        if not args.skip_ppl:
            results["perplexity"] = perplexity(args, kv, text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
