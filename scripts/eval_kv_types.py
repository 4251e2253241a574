#!/usr/bin/env python3
"""Quality of the KV storage types: `qf eval ppl` and `qf eval niah` once per type, then tables.

For each type T (the same for keys and values, -ctk T -ctv T) runs, into OUT/ppl-T and OUT/niah-T:
  qf eval ppl  ... --policies none,qfilters,knorm,streaming --budgets 128,256,512,1024 --window 64
               --evict-every 1 --tokens N --docs D
  qf eval niah ... --policies none,qfilters --lengths 1024,2048 --depths 5 --compressions 4,8
(niced, one thread each, --jobs at a time; finished cells are kept, so a rerun resumes), then
prints and writes OUT/tables.md: perplexity after the budget per type, policy and budget with
the change against f32 for the same policy and budget, and needle accuracy per type.

  scripts/eval_kv_types.py                    # the table in docs/results.md (KV storage types)
  scripts/eval_kv_types.py --tables-only      # reprint the tables from OUT
"""
import argparse
import json
import math
import os
import random
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TARGETS = {"f16": 0.1, "q8_0": 0.5}  # issue 12: max perplexity change against f32, percent


def commands(a, t):
    common = [a.qf, "eval", None, "-m", a.model, "--filters", a.filters, "-t", "1", "--no-progress",
              "-ctk", t, "-ctv", t]
    ppl = list(common)
    ppl[2] = "ppl"
    ppl += ["-o", os.path.join(a.out, "ppl-" + t), "--policies", a.policies, "--budgets", a.budgets,
            "--window", "64", "--evict-every", "1", "--tokens", str(a.tokens), "--docs", str(a.docs)]
    niah = list(common)
    niah[2] = "niah"
    niah += ["-o", os.path.join(a.out, "niah-" + t), "--policies", "none,qfilters", "--lengths", a.lengths,
             "--depths", str(a.depths), "--compressions", "4,8"]
    return [ppl, niah]


def run_all(a, types):
    todo = [c for t in types for c in commands(a, t)]
    running = []
    while todo or running:
        while todo and len(running) < a.jobs:
            cmd = todo.pop(0)
            print("running: nice -n 10 " + " ".join(cmd), file=sys.stderr, flush=True)
            running.append((cmd, subprocess.Popen(["nice", "-n", "10"] + cmd, stdout=subprocess.DEVNULL)))
        time.sleep(2)
        for cmd, p in list(running):
            if p.poll() is not None:
                running.remove((cmd, p))
                if p.returncode != 0:
                    sys.exit("eval_kv_types: failed (exit %d): %s" % (p.returncode, " ".join(cmd)))


def read_cells(path):
    """The finished cells of an evaluation's JSON-lines log (the first line holds its settings)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [c for c in map(json.loads, f) if "key" in c]


def nll_after_budget(a, t):
    """(policy, budget) -> {doc: nll list of the targets after position B}; cells not finished for
    every document are left out. Targets after B: the full cache's nll[B:] (its nll[i] predicts
    token i + 1), a compressed cell's whole list (it starts at target B + 1)."""
    full, comp = {}, {}
    for c in read_cells(os.path.join(a.out, "ppl-" + t, "ppl.jsonl")):
        (full if c["policy"] == "none" else comp.setdefault((c["policy"], c["budget"]), {}))[c["doc"]] = c["nll"]
    out = {}
    for b in [int(x) for x in a.budgets.split(",")]:
        if len(full) == a.docs:
            out[("none", b)] = {d: nll[b:] for d, nll in full.items()}
        for (p, cb), docs in comp.items():
            if cb == b and len(docs) == a.docs:
                out[(p, b)] = docs
    return out


def perplexity(docs, picks):
    """Perplexity of the pooled targets of the documents `picks` (repeats allowed)."""
    total = sum(sum(docs[d]) for d in picks)
    count = sum(len(docs[d]) for d in picks)
    return math.exp(total / count)


def change_interval(docs, ref, resamples=2000, seed=0):
    """95% bootstrap interval, over documents, of the percent change of pooled perplexity against
    the reference (the same resampled documents for both)."""
    rng = random.Random(seed)
    names = sorted(docs)
    changes = sorted(100 * (perplexity(docs, p) / perplexity(ref, p) - 1)
                     for p in ([rng.choice(names) for _ in names] for _ in range(resamples)))
    return changes[int(0.025 * resamples)], changes[int(0.975 * resamples) - 1]


def ppl_table(a, types):
    cells = {t: nll_after_budget(a, t) for t in types}
    budgets = [int(b) for b in a.budgets.split(",")]
    interval = a.docs > 1
    lines = ["Perplexity of the tokens after position B, pooled over %d document(s) (in brackets: change "
             "against f32, same policy and budget%s; targets f16 within 0.1%%, q8_0 within 0.5%%; "
             "- = not measured):" % (a.docs, ", then its 95% bootstrap interval over documents" if interval
                                     else ""), "",
             "| policy | KV type | " + " | ".join("B=%d" % b for b in budgets) + " |",
             "|---|---|" + "---:|" * len(budgets)]
    worst, beyond_noise = {}, {}
    for p in a.policies.split(","):
        for t in types:
            row = []
            for b in budgets:
                x, ref = cells[t].get((p, b)), cells["f32"].get((p, b))
                if x is None:
                    row.append("-")
                    continue
                names = sorted(x)
                value = perplexity(x, names)
                if t == "f32" or ref is None:
                    row.append("%.3f" % value)
                    continue
                d = 100 * (value / perplexity(ref, names) - 1)
                worst[t] = max(worst.get(t, 0.0), abs(d))
                text = "%.3f (%+.2f%%" % (value, d)
                if interval:
                    lo, hi = change_interval(x, ref)
                    if lo > 0 or hi < 0:
                        beyond_noise.setdefault(t, []).append("%s B=%d" % ("full cache" if p == "none" else p, b))
                    text += " [%+.2f, %+.2f]" % (lo, hi)
                row.append(text + ")")
            lines.append("| %s | %s | %s |" % ("full cache" if p == "none" else p, t, " | ".join(row)))
    lines.append("")
    for t in types:
        if t in worst:
            target = TARGETS.get(t)
            verdict = "" if target is None else (" (target %.1f%%: %s)" % (target, "met" if worst[t] <= target
                                                                            else "missed"))
            lines.append("- %s: largest change against f32 over the measured cells %.2f%%%s" % (t, worst[t], verdict))
            if interval:
                lines.append("  - changes beyond the noise (95%% interval excludes 0): %s" %
                             (", ".join(beyond_noise.get(t, [])) or "none"))
    return lines


def niah_table(a, types):
    """Needles found per type, over the cells every type has finished (so the counts compare)."""
    types = [t for t in types if os.path.exists(os.path.join(a.out, "niah-" + t, "niah.jsonl"))]
    if not types:
        return []
    cells = {t: {c["key"]: c for c in read_cells(os.path.join(a.out, "niah-" + t, "niah.jsonl"))} for t in types}
    common = set.intersection(*(set(c) for c in cells.values()))
    lines = ["Needles found (lengths %s, %d depths; exact match of the number; over the %d cells every type "
             "finished):" % (a.lengths, a.depths, len(common)), "",
             "| KV type | full cache | qfilters x4 | qfilters x8 |", "|---|---:|---:|---:|"]
    for t in types:
        hits = {}
        for k in common:
            c = cells[t][k]
            h = hits.setdefault((c["policy"], c["compression"]), [0, 0])
            h[0] += bool(c["correct"])
            h[1] += 1
        show = lambda key: "%d/%d" % tuple(hits[key]) if key in hits else "-"
        lines.append("| %s | %s | %s | %s |" % (t, show(("none", 1)), show(("qfilters", 4)), show(("qfilters", 8))))
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qf", default=os.path.join(ROOT, "build", "qf"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--filters", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.qfilters.safetensors"))
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "kv_types"))
    ap.add_argument("--types", default="f32,f16,q8_0,q4_0")
    ap.add_argument("--policies", default="none,qfilters,knorm,streaming")
    ap.add_argument("--budgets", default="128,256,512,1024")
    ap.add_argument("--tokens", type=int, default=1280)
    ap.add_argument("--docs", type=int, default=1)
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--depths", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=2, help="evaluations at a time (each one thread)")
    ap.add_argument("--tables-only", action="store_true")
    a = ap.parse_args()
    types = a.types.split(",")
    # A directory OUT/ppl-NAME made otherwise (e.g. f32 again with another batch size) can be
    # compared like a type with --tables-only --types f32,NAME.
    if "f32" not in types:
        sys.exit("eval_kv_types: f32 is the reference; keep it in --types")
    if not a.tables_only:
        for path in (a.qf, a.model, a.filters):
            if not os.path.exists(path):
                sys.exit("eval_kv_types: missing " + path)
        run_all(a, types)
    lines = ppl_table(a, types) + [""] + niah_table(a, types)
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "tables.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
