#!/usr/bin/env python3
"""Decode speed against the thread count, alone and beside competing busy processes.

Runs `qf bench --json` at each -t, for one or more qf binaries (to compare a branch against
main: --qf build/qf --qf ../main/build/qf; settings alternate between binaries so both see the
same noise), first on an otherwise idle machine, then with --busy processes spinning beside it.
Prints a table with the median decode/prefill tok/s, the ratio to the best setting of the same
binary and mode (the pool's target: no setting below 0.5), and the load average. A run that takes
longer than --timeout is killed and reported as such; the busy processes are always killed.

  scripts/bench_threads.py --qf build/qf --threads 1,2,4,8 --busy 1
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_average():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def start_busy(n):
    # Pure-Python spin loops: each keeps one core busy, like a neighbour compiling or serving.
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop_busy(procs):
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def bench_once(qf, args, threads):
    cmd = [qf, "bench", "-m", args.model, "-t", str(threads), "-p", str(args.prompt), "-n", str(args.gen),
           "-r", str(args.reps), "--json"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {args.timeout:.0f}s"}
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["exit %d" % out.returncode])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(args, mode):
    rows = []
    busy = start_busy(args.busy) if mode == "busy" else []
    try:
        if busy:
            time.sleep(1.0)  # let the load settle
        for t in args.threads:
            for qf in args.qf:
                r = bench_once(qf, args, t)
                r.update(qf=qf, mode=mode, t=t, load=load_average())
                rows.append(r)
                print(f"  {mode:5} {qf} -t {t}: " +
                      (r["error"] if "error" in r else f"decode {r['decode_tok_s']:.1f} tok/s"), file=sys.stderr)
    finally:
        stop_busy(busy)
    return rows


def print_table(rows):
    best = {}
    for r in rows:
        if "error" not in r:
            key = (r["qf"], r["mode"])
            best[key] = max(best.get(key, 0.0), r["decode_tok_s"])
    print(f"cores available: {len(os.sched_getaffinity(0))}")
    print("| qf | mode | -t | threads used | decode tok/s | vs best of row's qf+mode | prefill tok/s | load avg (1 min) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['qf']} | {r['mode']} | {r['t']} | - | {r['error']} | - | - | {r['load']:.2f} |")
            continue
        ratio = r["decode_tok_s"] / best[(r["qf"], r["mode"])]
        print(f"| {r['qf']} | {r['mode']} | {r['t']} | {r['threads']} | {r['decode_tok_s']:.1f} | {ratio:.2f} | "
              f"{r['prefill_tok_s']:.1f} | {r['load']:.2f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qf", action="append", help="qf binary (repeat to compare builds; default build/qf)")
    ap.add_argument("-m", "--model", default=os.path.join(ROOT, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--threads", default="1,2,4,8", help="comma-separated -t values")
    ap.add_argument("--busy", type=int, default=1, help="competing busy processes in the second pass (0: skip it)")
    ap.add_argument("-p", "--prompt", type=int, default=64, help="prompt tokens before decoding")
    ap.add_argument("-n", "--gen", type=int, default=128, help="decoded tokens per repetition")
    ap.add_argument("-r", "--reps", type=int, default=3, help="repetitions (qf bench reports the median)")
    ap.add_argument("--timeout", type=float, default=120, help="seconds before one qf bench run is killed")
    args = ap.parse_args()
    args.qf = args.qf or [os.path.join(ROOT, "build/qf")]
    args.threads = [int(t) for t in args.threads.split(",")]
    rows = measure(args, "alone")
    if args.busy > 0:
        rows += measure(args, "busy")
    print_table(rows)


if __name__ == "__main__":
    main()
