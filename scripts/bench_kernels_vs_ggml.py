#!/usr/bin/env python3
"""Per weight type matmul speed of qf against llama.cpp's libggml, side by side in one run.

Runs build/kernels_bench (BM_TypeDecode, BM_TypePrefill, BM_ReadBandwidth) and
build-ref/ggml_matmul_bench (scripts/ref/ggml_matmul_bench.cpp, built by scripts/ref/build.sh)
on the same shapes: 4096 x 4096 weights; decode = one token through 256 MiB of weight copies
(GB/s of weights streamed), prefill = 128 tokens through one matrix (GFLOP/s, 2 per weight and
token). Prints a markdown table and writes results/bench_kernels_vs_ggml.json.

  scripts/bench_kernels_vs_ggml.py [--threads 1] [--types q4_k,q6_k] [--repack] [--min-time 1]

--repack also times llama.cpp with its weight repacking (extra CPU buffer types, what llama.cpp
uses for model weights by default; AMX / interleaved layouts on some CPUs).
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
QF_BENCH = os.path.join(ROOT, "build", "kernels_bench")
GGML_BENCH = os.path.join(ROOT, "build-ref", "ggml_matmul_bench")
TYPE_IDS = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11, "Q4_K": 12,
            "Q5_K": 13, "Q6_K": 14, "IQ4_NL": 20}


def fail(msg):
    sys.exit("bench_kernels_vs_ggml: error: " + msg)


def run_qf(types, threads, min_time):
    ids = "|".join(str(TYPE_IDS[t]) for t in types)
    filt = f"BM_Type(Decode|Prefill)/type:({ids})/threads:{threads}/|BM_ReadBandwidth/real_time/threads:{min(threads, 2)}$"
    r = subprocess.run([QF_BENCH, f"--benchmark_filter={filt}", f"--benchmark_min_time={min_time}",
                        "--benchmark_format=json"], capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"kernels_bench failed: {r.stderr.strip()}")
    out, bandwidth = {}, None
    by_id = {v: k for k, v in TYPE_IDS.items()}
    for b in json.loads(r.stdout)["benchmarks"]:
        name = b["name"]
        if name.startswith("BM_ReadBandwidth"):
            bandwidth = b["GB/s"]
            continue
        mode = "decode" if name.startswith("BM_TypeDecode") else "prefill"
        tid = int(name.split("type:")[1].split("/")[0])
        out[(by_id[tid], mode)] = {"GB/s": b["GB/s"], "GFLOP/s": b["GOPS"], "label": b.get("label", "")}
    return out, bandwidth


def run_ggml(types, threads, min_time, repack):
    cmd = [GGML_BENCH, "--types", ",".join(types), "--threads", str(threads), "--min-time", str(min_time)]
    if repack:
        cmd.append("--repack")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"ggml_matmul_bench failed: {r.stderr.strip()}")
    return {(j["type"], j["mode"]): j for j in map(json.loads, r.stdout.splitlines()) if j}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1, choices=[1, 2, 4])
    ap.add_argument("--types", default=",".join(TYPE_IDS))
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--repack", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "bench_kernels_vs_ggml.json"))
    a = ap.parse_args()
    types = [t.strip().upper() for t in a.types.split(",")]  # q4_k and Q4_K alike
    for t in types:
        if t not in TYPE_IDS:
            fail(f"unknown type {t}")
    if not os.access(QF_BENCH, os.X_OK):
        fail(f"{QF_BENCH} missing: cmake --build build --target kernels_bench")
    subprocess.run([os.path.join(ROOT, "scripts", "ref", "build.sh")], check=True)

    qf, bandwidth = run_qf(types, a.threads, a.min_time)
    gg = run_ggml(types, a.threads, a.min_time, False)
    rp = run_ggml(types, a.threads, a.min_time, True) if a.repack else {}
    rows = []
    print(f"threads {a.threads}; streaming read bandwidth (BM_ReadBandwidth, {min(a.threads, 2)} thread(s)) {bandwidth:.1f} GB/s")
    head = "| type | decode GB/s qf | llama.cpp | qf/llama | qf/read bw | prefill GFLOP/s qf | llama.cpp | qf/llama |"
    if rp:
        head += " llama.cpp repacked decode | prefill |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for t in types:
        qd, qp, gd, gp = qf[(t, "decode")], qf[(t, "prefill")], gg[(t, "decode")], gg[(t, "prefill")]
        row = {"type": t, "qf_decode_GBs": qd["GB/s"], "ggml_decode_GBs": gd["GB/s"],
               "qf_prefill_GFLOPs": qp["GFLOP/s"], "ggml_prefill_GFLOPs": gp["GFLOP/s"]}
        line = (f"| {t} | {qd['GB/s']:.2f} | {gd['GB/s']:.2f} | {qd['GB/s'] / gd['GB/s']:.2f} | "
                f"{qd['GB/s'] / bandwidth:.2f} | {qp['GFLOP/s']:.1f} | {gp['GFLOP/s']:.1f} | "
                f"{qp['GFLOP/s'] / gp['GFLOP/s']:.2f} |")
        if rp:
            row["ggml_repack_decode_GBs"] = rp[(t, "decode")]["GB/s"]
            row["ggml_repack_prefill_GFLOPs"] = rp[(t, "prefill")]["GFLOP/s"]
            line += f" {row['ggml_repack_decode_GBs']:.2f} | {row['ggml_repack_prefill_GFLOPs']:.1f} |"
        print(line)
        rows.append(row)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"threads": a.threads, "read_bandwidth_GBs": bandwidth, "rows": rows}, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
