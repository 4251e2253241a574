#!/usr/bin/env python3
"""Paired comparison of one policy's streaming perplexity between two qf eval ppl runs on the same
documents (e.g. uniform against per-layer budgets):

    scripts/ppl_paired.py A/ppl.jsonl B/ppl.jsonl --policy h2o [--budgets 128,256]

Per budget: the pooled perplexity after the budget in each run, the relative change B/A - 1, and
its 95% percentile-bootstrap interval over documents (2,000 resamples, seed 1; the same resampled
documents for both runs, as qf eval ppl pairs its own comparisons).
"""
import argparse
import json
import math
import random


def load(path, policy):
    cells = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("policy") == policy:
                cells[(r["budget"], r["doc"])] = r["nll"]
    return cells


def ppl(docs, cells, budget):
    total = sum(sum(cells[(budget, d)]) for d in docs)
    count = sum(len(cells[(budget, d)]) for d in docs)
    return math.exp(total / count)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--policy", required=True)
    ap.add_argument("--budgets", default="")
    args = ap.parse_args()
    a, b = load(args.a, args.policy), load(args.b, args.policy)
    keys = a.keys() & b.keys()
    budgets = sorted({k[0] for k in keys})
    if args.budgets:
        budgets = [x for x in budgets if str(x) in args.budgets.split(",")]
    rng = random.Random(1)
    for budget in budgets:
        docs = sorted(d for (bb, d) in keys if bb == budget)
        for d in docs:
            if len(a[(budget, d)]) != len(b[(budget, d)]):
                raise SystemExit(f"{d}: the runs scored different targets")
        pa, pb = ppl(docs, a, budget), ppl(docs, b, budget)
        boots = []
        for _ in range(2000):
            s = [rng.choice(docs) for _ in docs]
            boots.append(ppl(s, b, budget) / ppl(s, a, budget) - 1)
        boots.sort()
        lo, hi = boots[50], boots[1949]
        print(f"{args.policy} B={budget} docs={len(docs)}: {pa:.3f} -> {pb:.3f} ({100 * (pb / pa - 1):+.2f}% "
              f"[{100 * lo:+.2f}, {100 * hi:+.2f}])")


if __name__ == "__main__":
    main()
