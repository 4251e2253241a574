#!/usr/bin/env python3
"""Paired comparison of two policies' needle answers on the same prompts (qf eval niah logs).

    scripts/niah_paired.py A.jsonl[,A2.jsonl...]:POLICY_A B.jsonl[,...]:POLICY_B [--lengths 1024,2048] [--compressions 4,8]

Pairs the cells of equal (length, depth, seed, digits, skip, compression); prints, per length and
over all, how many needles each policy finds, how many only one of them finds (wins / losses), the
two-sided exact sign test's p over those, and the mean difference of partial credit (over all
cells also its 95% paired-bootstrap interval: 4,000 resamples of the prompts, seed 1). Several logs
per side (comma-separated: runs of other seeds) are pooled. The logs may
come from different runs (e.g. a new policy against an earlier baseline) as long as the prompts
agree: the needle number is checked.
"""
import argparse
import json
import math
import random


def load(spec):
    paths, policy = spec.rsplit(":", 1)
    cells = {}
    for path in paths.split(","):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if r.get("policy") != policy:
                    continue
                key = (r["length"], r["depth_index"], r["seed"], r["digits"], r["skip_layers"], r["compression"])
                cells[key] = r
    if not cells:
        raise SystemExit(f"{paths}: no cells of policy {policy}")
    return policy, cells


def sign_test(wins, losses):
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    p = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * p)


def bootstrap_interval(diffs, resamples=4000, seed=1):
    """95% percentile interval of the mean of `diffs` over resamples of them."""
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--lengths", default="")
    ap.add_argument("--compressions", default="")
    args = ap.parse_args()
    name_a, a = load(args.a)
    name_b, b = load(args.b)
    lengths = {int(x) for x in args.lengths.split(",") if x}
    comps = {int(x) for x in args.compressions.split(",") if x}
    keys = sorted(k for k in a.keys() & b.keys() if (not lengths or k[0] in lengths) and (not comps or k[5] in comps))
    for k in keys:
        if a[k]["number"] != b[k]["number"]:
            raise SystemExit(f"prompt {k}: the needle numbers differ ({a[k]['number']} vs {b[k]['number']})")
    groups = {}
    for k in keys:
        groups.setdefault(f"L={k[0]} x{k[5]}", []).append(k)
    groups["all"] = keys
    print(f"{'cells':<12} {'n':>3} {name_a:>24} {name_b:>24} {'wins':>5} {'losses':>6} {'p':>6} {'partial diff':>12}")
    for g, ks in groups.items():
        fa = sum(a[k]["correct"] for k in ks)
        fb = sum(b[k]["correct"] for k in ks)
        wins = sum(a[k]["correct"] and not b[k]["correct"] for k in ks)
        losses = sum(b[k]["correct"] and not a[k]["correct"] for k in ks)
        dp = sum(a[k]["partial"] - b[k]["partial"] for k in ks) / len(ks)
        interval = ""
        if g == "all":
            lo, hi = bootstrap_interval([a[k]["partial"] - b[k]["partial"] for k in ks])
            interval = f" [{lo:+.2f}, {hi:+.2f}]"
        print(f"{g:<12} {len(ks):>3} {fa:>24} {fb:>24} {wins:>5} {losses:>6} {sign_test(wins, losses):>6.3f} {dp:>+12.2f}{interval}")


if __name__ == "__main__":
    main()
