#!/usr/bin/env python3
"""Plots the results of `qf eval` (ppl, niah, fidelity) from a results directory.

    python3 scripts/plot_results.py results/SmolLM2-135M-Instruct.Q4_1 --out docs/img [--format svg]

Reads what is there among ppl.json, niah.json, fidelity.json / fidelity_heads.csv and writes:
  ppl_curve_B<budget>.<fmt>   perplexity along the sequence per policy (one plot per budget)
  ppl_budgets.<fmt>           perplexity after the budget vs the budget, per policy
  niah_heatmaps.<fmt>         accuracy per (length x depth), one panel per policy and compression
  niah_bars.<fmt>             average accuracy of each policy at each compression
  fidelity_hist.<fmt>         per-head Spearman correlation histograms, one panel per policy
  fidelity_qf_vs_knorm.<fmt>  per-head Spearman of qfilters against knorm
and, with --markdown FILE, the tables of docs/results.md (so the page quotes the files exactly).
Only matplotlib and the standard library are needed.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# One colour per policy, the same in every plot.
COLORS = {
    "none": "#000000",
    "qfilters": "#d62728",
    "knorm": "#1f77b4",
    "streaming": "#2ca02c",
    "random": "#7f7f7f",
    "snapkv": "#9467bd",
    "tova": "#ff7f0e",
    "h2o": "#8c564b",
    "expected_attention": "#e377c2",
    "keydiff": "#bcbd22",
}
LABELS = {"none": "full cache"}


def color(p: str) -> str:
    return COLORS.get(p, "#17becf")


def label(p: str) -> str:
    return LABELS.get(p, p)


def load(path: Path):
    with path.open() as f:
        return json.load(f)


def as_list(x):
    return x if isinstance(x, list) else [x]


def niah_primary(d: dict) -> dict:
    """The needle results of the first (digits, skip_layers) setting, the shape the plots draw;
    older files (one setting, no such keys) pass through."""
    st = d["settings"]
    digits, skip = as_list(st.get("digits", 7))[0], as_list(st.get("skip_layers", 2))[0]

    def mine(r):
        if "digits" not in r:
            return True
        return r["digits"] == digits and (r["skip_layers"] == skip or r["policy"] == "none")
    out = dict(d)
    out["results"] = [r for r in d["results"] if mine(r)]
    out["grid"] = [g for g in d["grid"] if mine(g)]
    out["settings"] = dict(st, skip_layers=skip, digits=digits)
    return out


def save(fig, out: Path, name: str, fmt: str) -> Path:
    p = out / f"{name}.{fmt}"
    fig.savefig(p, dpi=130, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {p}")
    return p


def smooth(values: list[float], k: int) -> list[float]:
    """Centered moving average over k points (shorter at the ends)."""
    if k <= 1:
        return values
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - k // 2), min(len(values), i + k // 2 + 1)
        out.append(sum(values[lo:hi]) / (hi - lo))
    return out


def plot_ppl(d: dict, out: Path, fmt: str, smoothing: int) -> list[Path]:
    made = []
    budgets = sorted({c["budget"] for c in d["curve"]})
    policies = d["policies"]
    title_docs = f'{len(d["docs"])} docs x {d["settings"]["n_tokens"]} tokens, window {d["settings"]["window"]}'
    for b in budgets:
        fig, (ax, dx) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
        full = next((c for c in d["curve"] if c["budget"] == b and c["policy"] == "none"), None)
        for p in policies:
            cur = next((c for c in d["curve"] if c["budget"] == b and c["policy"] == p), None)
            if cur is None:
                continue
            xs = [(pt[0] + pt[1]) / 2 for pt in cur["points"]]
            nll = [pt[2] for pt in cur["points"]]
            # Smooth before and after the budget separately: before it every policy is the full cache.
            cut = sum(1 for pt in cur["points"] if pt[1] <= b)
            sm = lambda v: smooth(v[:cut], smoothing) + smooth(v[cut:], smoothing)  # noqa: E731
            lw = 2.2 if p in ("none", "qfilters") else 1.3
            ax.plot(xs, [math.exp(v) for v in sm(nll)], label=label(p), color=color(p), lw=lw)
            if full is not None:
                diff = [a - f[2] for a, f in zip(nll, full["points"])]
                dx.plot(xs, sm(diff), label=label(p), color=color(p), lw=lw)
        for a in (ax, dx):
            a.axvline(b, color="#999999", ls="--", lw=1)
            a.grid(alpha=0.3)
        ax.text(b, ax.get_ylim()[1], f" budget {b}", va="top", fontsize=8, color="#666666")
        ax.set_ylabel("perplexity (moving average)")
        ax.set_title(f"Streaming perplexity, cache budget {b} ({title_docs})", fontsize=10)
        ax.legend(fontsize=8, ncol=2)
        dx.set_ylabel("NLL - NLL(full cache)")
        dx.set_xlabel("position in the document (tokens)")
        fig.tight_layout()
        made.append(save(fig, out, f"ppl_curve_B{b}", fmt))

    # Budgets: the increase over the full cache (left) and the gap ratio (right). Policies far
    # off the scale (random) would flatten every other line, so the axis is cut and they are named.
    get = {(r["budget"], r["policy"]): r for r in d["results"]}
    compressed = [p for p in policies if p != "none"]
    fig, (ax, gx) = plt.subplots(1, 2, figsize=(12, 4.5))
    incr = {}
    for p in compressed:
        pts = [(b, 100 * (get[(b, p)]["ppl_after_budget"] / get[(b, "none")]["ppl_after_budget"] - 1))
               for b in budgets if (b, p) in get and (b, "none") in get and get[(b, p)]["ppl_after_budget"]]
        if pts:
            incr[p] = pts
    typical = sorted(v for p, pts in incr.items() if p != "random" for _, v in pts)
    top = max(typical) * 1.25 if typical else None
    off_scale = []
    for p, pts in incr.items():
        if top is not None and all(v > top for _, v in pts):
            off_scale.append(f"{label(p)}: +{min(v for _, v in pts):.0f}% to +{max(v for _, v in pts):.0f}%")
            continue
        ax.plot([b for b, _ in pts], [v for _, v in pts], marker="o", label=label(p), color=color(p),
                lw=2.2 if p == "qfilters" else 1.3)
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets)
    ax.set_xticklabels([str(b) for b in budgets])
    if top is not None:
        ax.set_ylim(0, top)
    ax.set_xlabel("cache budget (tokens per KV head)")
    ax.set_ylabel("perplexity after the budget: % above the full cache")
    ax.set_title(f"Perplexity cost of compression ({title_docs})", fontsize=10)
    if off_scale:
        ax.text(0.98, 0.97, "off the scale: " + "; ".join(off_scale), transform=ax.transAxes, ha="right", va="top",
                fontsize=7, color="#555555")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="lower left")
    bar_pols = [p for p in compressed if p not in ("streaming", "random")]
    w = 0.8 / max(len(bar_pols), 1)
    for k, p in enumerate(bar_pols):
        ys = [get[(b, p)]["gap_ratio_after_budget"] if (b, p) in get else None for b in budgets]
        xs = [i + (k - (len(bar_pols) - 1) / 2) * w for i in range(len(budgets))]
        gx.bar([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], width=w, color=color(p),
               label=label(p))
    gx.axhline(1.0, color=color("streaming"), ls="--", lw=1.2, label="streaming (= 1)")
    gx.set_xticks(range(len(budgets)))
    gx.set_xticklabels([f"B={b}" for b in budgets])
    gx.set_ylabel("gap ratio (ppl - full) / (streaming - full)")
    gx.set_title("Gap ratio: below 1 beats StreamingLLM, 0 = no loss", fontsize=10)
    gx.grid(axis="y", alpha=0.3)
    gx.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    made.append(save(fig, out, "ppl_budgets", fmt))
    return made


def plot_niah(d: dict, out: Path, fmt: str) -> list[Path]:
    made = []
    lengths, depths = d["lengths"], d["depths"]
    comps = d["settings"]["compressions"]
    grid = {}
    for g in d["grid"]:
        grid.setdefault((g["policy"], g["compression"]), {})[(g["length"], round(g["depth"], 3))] = (
            g["accuracy"] if "accuracy" in g else (1.0 if g["correct"] else 0.0))
    panels = [(p, 1) for p in d["policies"] if p == "none"] + [(p, x) for p in d["policies"] if p != "none" for x in comps]
    panels = [k for k in panels if k in grid]
    if panels:
        rows_p = [p for p in d["policies"] if any(k[0] == p for k in panels)]
        ncols = max(len(comps), 1)
        fig, axes = plt.subplots(len(rows_p), ncols, figsize=(2.4 * ncols + 1, 1.9 * len(rows_p) + 0.6), squeeze=False)
        for i, p in enumerate(rows_p):
            xs = [1] if p == "none" else comps
            for j in range(ncols):
                ax = axes[i][j]
                if j >= len(xs) or (p, xs[j]) not in grid:
                    ax.axis("off")
                    continue
                cells = grid[(p, xs[j])]
                m = [[cells.get((L, round(dp, 3)), float("nan")) for L in lengths] for dp in depths]
                ax.imshow(m, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="upper")
                acc = [v for row in m for v in row if not math.isnan(v)]
                ax.set_title(f"{label(p)} x{xs[j]}: {100 * sum(acc) / max(len(acc), 1):.0f}%", fontsize=8)
                ax.set_xticks(range(len(lengths)))
                ax.set_xticklabels([f"{L / 1024:.1f}k" if L % 1024 else f"{L // 1024}k" for L in lengths], fontsize=6)
                ax.set_yticks(range(len(depths)))
                ax.set_yticklabels([f"{dp:.0f}" for dp in depths], fontsize=5)
                if j == 0:
                    ax.set_ylabel("depth %", fontsize=7)
        fig.suptitle("Needle in a haystack: exact match (green) per context length (x) and needle depth (y)", fontsize=10)
        fig.tight_layout()
        made.append(save(fig, out, "niah_heatmaps", fmt))

    res = d["results"]
    full = next((r["accuracy"] for r in res if r["policy"] == "none"), None)
    pols = [p for p in d["policies"] if p != "none"]
    if pols and comps:
        fig, ax = plt.subplots(figsize=(8, 4.2))
        w = 0.8 / len(pols)
        for k, p in enumerate(pols):
            ys = [next((r["accuracy"] for r in res if r["policy"] == p and r["compression"] == x), None) for x in comps]
            ax.bar([i + (k - (len(pols) - 1) / 2) * w for i in range(len(comps))], [y if y is not None else 0 for y in ys],
                   width=w, color=color(p), label=label(p))
        if full is not None:
            ax.axhline(full, color="black", ls="--", lw=1, label=f"full cache ({100 * full:.0f}%)")
        ax.set_xticks(range(len(comps)))
        ax.set_xticklabels([f"x{x}" for x in comps])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("exact-match accuracy")
        ax.set_xlabel("compression (prefill)")
        ax.set_title("Needle in a haystack: accuracy per policy and compression", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=3)
        made.append(save(fig, out, "niah_bars", fmt))
    return made


def plot_fidelity(d: dict, heads_csv: Path, out: Path, fmt: str) -> list[Path]:
    made = []
    per = {}
    with heads_csv.open() as f:
        for r in csv.DictReader(f):
            if r["spearman"]:
                per.setdefault(r["policy"], {})[(int(r["layer"]), int(r["kv_head"]))] = float(r["spearman"])
    pols = [p for p in d["policies"] if p in per]
    if not pols:
        return made
    circ = {r["policy"]: r["circular"] for r in d["results"]}
    n = len(pols)
    ncols = min(4, n)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(3 * ncols, 2.4 * nrows), squeeze=False, sharex=True)
    bins = [i / 20 - 1 for i in range(41)]
    for i, p in enumerate(pols):
        ax = axes[i // ncols][i % ncols]
        vals = list(per[p].values())
        ax.hist(vals, bins=bins, color=color(p))
        mean = sum(vals) / len(vals)
        ax.axvline(mean, color="black", lw=1)
        ax.set_title(f"{label(p)}{' (circular)' if circ.get(p) else ''}: mean {mean:.2f}", fontsize=8)
        ax.tick_params(labelsize=7)
    for i in range(n, nrows * ncols):
        axes[i // ncols][i % ncols].axis("off")
    fig.supxlabel("Spearman correlation of key score with attention received (per layer x KV head)", fontsize=9)
    fig.tight_layout()
    made.append(save(fig, out, "fidelity_hist", fmt))

    if "qfilters" in per and "knorm" in per:
        keys = sorted(set(per["qfilters"]) & set(per["knorm"]))
        fig, ax = plt.subplots(figsize=(4.6, 4.4))
        sc = ax.scatter([per["knorm"][k] for k in keys], [per["qfilters"][k] for k in keys], c=[k[0] for k in keys],
                        cmap="viridis", s=18)
        ax.plot([-1, 1], [-1, 1], color="#999999", lw=1, ls="--")
        wins = sum(per["qfilters"][k] > per["knorm"][k] for k in keys)
        ax.set_xlabel("knorm Spearman")
        ax.set_ylabel("qfilters Spearman")
        ax.set_title(f"per head: qfilters above the diagonal on {wins}/{len(keys)}", fontsize=9)
        fig.colorbar(sc, ax=ax, label="layer")
        ax.grid(alpha=0.3)
        made.append(save(fig, out, "fidelity_qf_vs_knorm", fmt))
    return made


def fmt(x, f="{:.3f}") -> str:
    return "-" if x is None else f.format(x)


def markdown_tables(res: Path) -> str:
    out = []
    if (res / "ppl.json").exists():
        d = load(res / "ppl.json")
        budgets = sorted({r["budget"] for r in d["results"]})
        pols = d["policies"]
        get = {(r["budget"], r["policy"]): r for r in d["results"]}
        st = d["settings"]
        out.append(f"**Streaming perplexity** ({len(d['docs'])} documents x {st['n_tokens']} tokens, window "
                   f"{st['window']}, eviction every {st['evict_every']} token(s)): perplexity of the tokens after "
                   "the budget; gap ratio in brackets (0 = full cache, 1 = StreamingLLM) with its 95% bootstrap "
                   "interval over the documents.\n")
        out.append("| policy | " + " | ".join(f"B={b}" for b in budgets) + " |")
        out.append("|---|" + "---:|" * len(budgets))
        for p in pols:
            cells = []
            for b in budgets:
                r = get.get((b, p))
                if r is None:
                    cells.append("-")
                elif p == "none":
                    cells.append(fmt(r["ppl_after_budget"]))
                elif "gap_ratio_after_budget_ci" in r:
                    lo, hi = r["gap_ratio_after_budget_ci"]
                    cells.append(f'{fmt(r["ppl_after_budget"])} ({fmt(r["gap_ratio_after_budget"], "{:+.2f}")} '
                                 f'[{fmt(lo, "{:.2f}")}, {fmt(hi, "{:.2f}")}])')
                else:
                    cells.append(f'{fmt(r["ppl_after_budget"])} ({fmt(r["gap_ratio_after_budget"], "{:+.2f}")})')
            out.append(f"| {label(p)} | " + " | ".join(cells) + " |")
        out.append("")
        out.append("Perplexity over all tokens (the first B are the full cache's):\n")
        out.append("| policy | " + " | ".join(f"B={b}" for b in budgets) + " |")
        out.append("|---|" + "---:|" * len(budgets))
        for p in pols:
            out.append(f"| {label(p)} | " + " | ".join(fmt(get[(b, p)]["ppl_all"]) if (b, p) in get else "-"
                                                      for b in budgets) + " |")
        out.append("")
    if (res / "niah.json").exists():
        full_d = load(res / "niah.json")
        d = niah_primary(full_d)
        comps = d["settings"]["compressions"]
        lengths = d["lengths"]
        get = {(r["policy"], r["compression"]): r for r in d["results"]}
        out.append(f"**Needle in a haystack** (lengths {', '.join(str(L) for L in lengths)}; {len(d['depths'])} depths; "
                   f"first {d['settings']['skip_layers']} layers uncompressed): exact-match accuracy.\n")
        out.append("| policy | " + " | ".join(f"x{x}" for x in comps) + " |")
        out.append("|---|" + "---:|" * len(comps))
        if ("none", 1) in get:
            out.append("| full cache (x1) | " + fmt(get[("none", 1)]["accuracy"], "{:.0%}") + " |" + " |" * (len(comps) - 1))
        for p in d["policies"]:
            if p == "none":
                continue
            out.append(f"| {label(p)} | " + " | ".join(fmt(get[(p, x)]["accuracy"], "{:.0%}") if (p, x) in get else "-"
                                                      for x in comps) + " |")
        out.append("")
        if any(r.get("number_kept") is not None for r in d["results"]):
            out.append("Share of the needle's number tokens still in the cache after compression (mean over the "
                       "compressed layers' KV heads and all prompts; keeping a random subset would give 1/x):\n")
            out.append("| policy | " + " | ".join(f"x{x}" for x in comps) + " |")
            out.append("|---|" + "---:|" * len(comps))
            for p in d["policies"]:
                if p == "none":
                    continue
                out.append(f"| {label(p)} | " + " | ".join(
                    fmt(get[(p, x)].get("number_kept"), "{:.0%}") if (p, x) in get else "-" for x in comps) + " |")
            out.append("")
        if any("accuracy_ci" in r for r in full_d["results"]):
            seeds = full_d["settings"].get("seeds", [])
            out.append(f"Every setting ({len(seeds)} needle seed(s) x {len(lengths)} length(s) x {len(d['depths'])} "
                       "depth(s) per cell): exact match with its 95% bootstrap interval over the prompts, and partial "
                       "credit (share of the number's leading digits answered right).\n")
            out.append("| digits | skip | policy | x | exact match | 95% interval | partial | needle kept |")
            out.append("|---:|---:|---|---:|---:|---|---:|---:|")
            for r in full_d["results"]:
                ci = r["accuracy_ci"]
                out.append(f'| {r["digits"]} | {r["skip_layers"] if r["policy"] != "none" else "-"} | {label(r["policy"])} | '
                           f'{r["compression"]} | {fmt(r["accuracy"], "{:.0%}")} | '
                           f'[{fmt(ci[0], "{:.0%}")}, {fmt(ci[1], "{:.0%}")}] | {fmt(r.get("partial"), "{:.0%}")} | '
                           f'{fmt(r.get("number_kept"), "{:.0%}")} |')
            out.append("")
        out.append("Accuracy per context length, averaged over the compressions (full cache: uncompressed):\n")
        out.append("| policy | " + " | ".join(str(L) for L in lengths) + " |")
        out.append("|---|" + "---:|" * len(lengths))
        for p in d["policies"]:
            xs = [1] if p == "none" else comps
            row = []
            for L in lengths:
                v = [get[(p, x)]["by_length"].get(str(L)) for x in xs if (p, x) in get]
                v = [x for x in v if x is not None]
                row.append(fmt(sum(v) / len(v), "{:.0%}") if v else "-")
            out.append(f"| {label(p)} | " + " | ".join(row) + " |")
        out.append("")
    if (res / "fidelity.json").exists():
        d = load(res / "fidelity.json")
        out.append(f"**Attention fidelity** ({len(d['docs'])} documents x {d['settings']['n_tokens']} tokens, "
                   "90 (layer, KV head) pairs): Spearman correlation per head of the key score with the mean "
                   "attention the key receives from later queries.\n")
        out.append("| policy | mean | median | min | max | note |")
        out.append("|---|---:|---:|---:|---:|---|")
        for r in d["results"]:
            out.append(f'| {label(r["policy"])} | {fmt(r["mean_spearman"])} | {fmt(r["median_spearman"])} | '
                       f'{fmt(r["min_spearman"])} | {fmt(r["max_spearman"])} | '
                       f'{"circular (scored from attention)" if r["circular"] else ""} |')
        if "qfilters_beats_knorm" in d:
            w = d["qfilters_beats_knorm"]
            out.append(f"\nqfilters has the higher correlation on {w['wins']} of {w['heads']} heads "
                       f"({fmt(w['share'], '{:.0%}')}).")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="directory written by qf eval (--out)")
    ap.add_argument("--out", type=Path, default=Path("docs/img"), help="where to write the plots (default docs/img)")
    ap.add_argument("--format", choices=("png", "svg"), default="png")
    ap.add_argument("--smoothing", type=int, default=5, help="moving average over this many curve bins")
    ap.add_argument("--markdown", type=Path, help="also write the result tables (markdown) to this file")
    a = ap.parse_args(argv)
    if not a.results.is_dir():
        print(f"error: {a.results} is not a directory", file=sys.stderr)
        return 1
    a.out.mkdir(parents=True, exist_ok=True)
    made = []
    if (a.results / "ppl.json").exists():
        made += plot_ppl(load(a.results / "ppl.json"), a.out, a.format, a.smoothing)
    if (a.results / "niah.json").exists():
        made += plot_niah(niah_primary(load(a.results / "niah.json")), a.out, a.format)
    if (a.results / "fidelity.json").exists() and (a.results / "fidelity_heads.csv").exists():
        made += plot_fidelity(load(a.results / "fidelity.json"), a.results / "fidelity_heads.csv", a.out, a.format)
    if not made:
        print(f"error: no ppl.json, niah.json or fidelity.json in {a.results}", file=sys.stderr)
        return 1
    if a.markdown:
        a.markdown.write_text(markdown_tables(a.results))
        print(f"wrote {a.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
