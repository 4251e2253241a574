#!/usr/bin/env python3
"""Writes the llama.cpp goldens for a model into tests/golden/ (see scripts/ref/README.md).

  <set>_teacher_forced.json  teacher-forced logits summary over the first 2,100 tokens of a
                             State of the Union address, plus how much llama.cpp disagrees with
                             itself across configurations (a floor for test tolerances)
  <set>_generate.json        greedy continuations of a few prompts

<set> is --set smollm2 (default; SmolLM2-135M-Instruct Q4_1), gemma3 (Gemma 3 270M, the F32 copy
scripts/dequantize_gguf.py makes of the Q4_K_M file) or gemma3_q4_k_m (the Q4_K_M file itself);
--model for another file. `--only long` adds <set>_long.json (20,000 tokens, second half scored).

Run through scripts/ref/make_goldens.sh, which fetches llama.cpp and builds build-ref/llama_ref.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
TOOL = os.path.join(ROOT, "build-ref", "llama_ref")
TEXT = os.path.join(ROOT, "data", "sotu", "2001_george_w_bush_r.txt")
N_TEACHER = 2100
N_CTX = 4096
# The tightest llama.cpp configuration: F32 K/V and plain (non-flash) attention, which on CPU
# keeps K/V, scores and softmax in F32 (in this build flash attention, which `auto` picks on CPU,
# gives bit-identical logits with F32 and F16 caches, i.e. F16 precision either way).
TIGHT = ["--kv-f32", "--flash-attn", "off"]
# A greedy step whose top1 - top2 logit gap is below this is a near tie: llama.cpp's own logits
# move by a few tenths between configurations on this model (see llama_cpp_self_agreement).
STABLE_MARGIN = 1.0

CHAT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n")
PROMPTS = [
    ("plain", "The capital of France is"),
    # ChatML for the instruct model, special tokens parsed. llama.cpp's first answer token here
    # is a near tie (margin ~0.06, "L" over "The"), so the second chat prompt is the one whose
    # continuation is stable enough to compare token for token.
    ("chat", CHAT % "What is the capital of France?"),
    ("chat_colors", CHAT % "What are the three primary colors?"),
    ("code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"),
]


GEMMA_CHAT = "<start_of_turn>user\n%s<end_of_turn>\n<start_of_turn>model\n"
GEMMA_PROMPTS = [
    ("plain", "The capital of France is"),
    ("chat", GEMMA_CHAT % "What is the capital of France?"),
    ("chat_colors", GEMMA_CHAT % "What are the three primary colors?"),
    ("code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"),
]

# Per model set: file, whether tokenization adds BOS (Gemma needs it), generation prompts.
SETS = {
    "smollm2": {"model": MODEL, "add_special": False, "prompts": PROMPTS, "n_predict": 64},
    "gemma3": {"model": os.path.join(ROOT, "models", "gemma-3-270m-deq.gguf"), "add_special": True,
               "prompts": GEMMA_PROMPTS, "n_predict": 32},
    "gemma3_q4_k_m": {"model": os.path.join(ROOT, "models", "gemma-3-270m-q4_k_m.gguf"), "add_special": True,
                      "prompts": GEMMA_PROMPTS, "n_predict": 32},
}
SET = "smollm2"
ADD_SPECIAL = False


def run_tool(args):
    proc = subprocess.run([TOOL] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit("llama_ref %s failed: %s" % (" ".join(args), proc.stderr.strip()))
    return json.loads(proc.stdout)


def tokenize(text, tmp):
    path = os.path.join(tmp, "text.txt")
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return run_tool(["tokenize", "-m", MODEL, "--text-file", path] + (["--add-special"] if ADD_SPECIAL else []))


def write_tokens(tokens, tmp, name):
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        json.dump(tokens, f)
    return path


def provenance(out):
    """Fields that say which llama.cpp produced a golden, and how."""
    with open(os.path.join(ROOT, "third_party", "llama.cpp", "llama.cpp.info.json")) as f:
        info = json.load(f)
    keep = ["llama_cpp_version", "llama_cpp_commit", "devices", "system_info", "model", "n_ctx",
            "n_batch", "threads", "kv_type", "flash_attn"]
    p = {"generator": "scripts/ref/make_goldens.sh", "llama_cpp_tag": info.get("tag")}
    p.update({k: out[k] for k in keep if k in out})
    return p


def agreement(ref, other):
    """How far `other` (another llama.cpp configuration) is from the golden run."""
    d = [abs(a - b) for a, b in zip(ref["target_logprob"], other["target_logprob"])]
    t1 = [abs(a[0] - b[0]) for a, b in zip(ref["top5_logits"], other["top5_logits"])]
    same = sum(a == b for a, b in zip(ref["argmax"], other["argmax"]))
    n = min(len(ref["argmax"]), len(other["argmax"]))  # other may cover a prefix only
    return {
        "n_batch": other["n_batch"], "kv_type": other["kv_type"], "flash_attn": other["flash_attn"],
        "perplexity": other["perplexity"],
        "mean_abs_dlogprob": round(sum(d) / len(d), 5),
        "max_abs_dlogprob": round(max(d), 5),
        "mean_abs_dtop1_logit": round(sum(t1) / len(t1), 5),
        "max_abs_dtop1_logit": round(max(t1), 5),
        "argmax_agreement": round(same / n, 5),
    }


def dump(obj, path):
    """One top-level key per line: compact, yet diffs stay readable."""
    lines = ["{"]
    items = list(obj.items())
    for i, (k, v) in enumerate(items):
        sep = "," if i + 1 < len(items) else ""
        lines.append(" %s: %s%s" % (json.dumps(k), json.dumps(v, ensure_ascii=False,
                                                              separators=(",", ":")), sep))
    lines.append("}")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote %s (%d bytes)" % (os.path.relpath(path, ROOT), os.path.getsize(path)),
          file=sys.stderr)


def teacher_forced(tmp, threads, out_dir, quick=False):
    with open(TEXT, encoding="utf-8") as f:
        text = f.read()
    tok = tokenize(text, tmp)
    if tok["n_tokens"] < N_TEACHER:
        sys.exit("%s has only %d tokens, need %d" % (TEXT, tok["n_tokens"], N_TEACHER))
    path = write_tokens(tok["tokens"][:N_TEACHER], tmp, "teacher.json")
    base = ["score", "-m", MODEL, "--tokens-file", path, "-c", str(N_CTX), "-t", str(threads)]
    print("scoring %d tokens (golden configuration) ..." % N_TEACHER, file=sys.stderr)
    ref = run_tool(base + ["-b", "512"] + TIGHT)
    if quick:
        # The decode path over the first QUICK_SELF tokens only, and no defaults run: for a slow
        # (loaded) machine. Agreement is then measured on those positions.
        print("scoring the first %d tokens one token per batch ..." % QUICK_SELF, file=sys.stderr)
        head = write_tokens(tok["tokens"][:QUICK_SELF], tmp, "teacher_head.json")
        b1 = run_tool(["score", "-m", MODEL, "--tokens-file", head, "-c", str(N_CTX), "-t", str(threads),
                       "-b", "1"] + TIGHT)
        dflt = None
    else:
        print("scoring again one token per batch (llama.cpp's decode path) ...", file=sys.stderr)
        b1 = run_tool(base + ["-b", "1"] + TIGHT)
        print("scoring again with llama.cpp's defaults (F16 cache, flash attention auto) ...",
              file=sys.stderr)
        dflt = run_tool(base + ["-b", "512"])

    golden = {
        "description": ref["description"],
        "text_file": os.path.relpath(TEXT, ROOT),
        "text_tokens_total": tok["n_tokens"],
        "note": "tokens = llama.cpp's tokenization of the whole text (%s), first %d kept"
                % ("with BOS" if ADD_SPECIAL else "no BOS", N_TEACHER),
        "provenance": provenance(ref),
        "digits": ref["digits"],
        "n_tokens": ref["n_tokens"],
        "perplexity": ref["perplexity"],
        "mean_nll": ref["mean_nll"],
        "llama_cpp_self_agreement": {
            "note": "the same tokens through other llama.cpp configurations, compared with this "
                    "golden; llama.cpp quantizes activations to 8 bits for its quantized matmuls, "
                    "so this is the noise to expect from any faithful engine",
            "decode_path_batch1": agreement(ref, b1),
            **({"defaults_f16_cache": agreement(ref, dflt)} if dflt else {}),
            **({"decode_path_positions": QUICK_SELF} if quick else {}),
        },
        "tokens": ref["tokens"],
        "argmax": ref["argmax"],
        "target_logprob": ref["target_logprob"],
        "logsumexp": ref["logsumexp"],
        "top5_ids": ref["top5_ids"],
        "top5_logits": ref["top5_logits"],
    }
    dump(golden, os.path.join(out_dir, SET + "_teacher_forced.json"))
    return golden


N_LONG = 20000
QUICK_SELF = 128


def long_context(tmp, threads, out_dir):
    """Teacher-forced over 20,000 tokens (State of the Union addresses from 2001 on, joined),
    scored over the second half only: long past any sliding window, global rotary phases large."""
    names = sorted(f for f in os.listdir(os.path.dirname(TEXT)) if f[:4].isdigit() and int(f[:4]) >= 2001)
    parts = []
    for name in names:
        with open(os.path.join(os.path.dirname(TEXT), name), encoding="utf-8") as f:
            parts.append(f.read().strip())
    tok = tokenize("\n\n".join(parts), tmp)
    if tok["n_tokens"] < N_LONG:
        sys.exit("the addresses from 2001 on have only %d tokens, need %d" % (tok["n_tokens"], N_LONG))
    path = write_tokens(tok["tokens"][:N_LONG], tmp, "long.json")
    print("scoring %d tokens, logits of the second half ..." % N_LONG, file=sys.stderr)
    ref = run_tool(["score", "-m", MODEL, "--tokens-file", path, "-c", str(N_LONG), "-b", "512",
                    "-t", str(threads), "--score-from", str(N_LONG // 2)] + TIGHT)
    golden = {
        "description": ref["description"],
        "text_files": names,
        "note": "tokens = llama.cpp's tokenization of the addresses joined by blank lines (%s), first %d"
                % ("with BOS" if ADD_SPECIAL else "no BOS", N_LONG),
        "provenance": provenance(ref),
        "n_tokens": ref["n_tokens"],
        "score_from": ref["score_from"],
        "perplexity": ref["perplexity"],
        "mean_nll": ref["mean_nll"],
        "tokens": ref["tokens"],
        "argmax": ref["argmax"],
        "target_logprob": ref["target_logprob"],
        "top2_logits": [t[:2] for t in ref["top5_logits"]],
    }
    dump(golden, os.path.join(out_dir, SET + "_long.json"))
    return golden


def generate(tmp, threads, out_dir, n_predict):
    cases = []
    out = None
    for name, text in SETS[SET]["prompts"]:
        tok = tokenize(text, tmp)
        path = write_tokens(tok["tokens"], tmp, name + ".json")
        print("generating %d tokens for prompt '%s' ..." % (n_predict, name), file=sys.stderr)
        out = run_tool(["generate", "-m", MODEL, "--prompt-tokens", path, "-n", str(n_predict),
                        "-c", str(N_CTX), "-t", str(threads)] + TIGHT)
        stable = 0
        while stable < len(out["margins"]) and out["margins"][stable] >= STABLE_MARGIN:
            stable += 1
        cases.append({
            "name": name,
            "prompt": text,
            "parse_special": tok["parse_special"],
            "prompt_tokens": out["prompt_tokens"],
            "tokens": out["tokens"],
            "text": out["text"],
            "stop": out["stop"],
            "margins": out["margins"],
            "stable_prefix": stable,
        })
    golden = {
        "description": out["description"] + " stable_prefix = number of leading steps whose "
                       "margin is >= stable_margin (steps after a near tie may legitimately "
                       "differ in another engine).",
        "provenance": provenance(out),
        "n_predict": n_predict,
        "stable_margin": STABLE_MARGIN,
        "cases": cases,
    }
    dump(golden, os.path.join(out_dir, SET + "_generate.json"))
    return golden


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "tests", "golden"))
    ap.add_argument("--only", choices=["teacher", "generate", "long"],
                    help="write just one golden (long: 20,000 tokens, not in the default set)")
    ap.add_argument("-n", type=int, help="greedy tokens per prompt (default: 64 for smollm2, 32 for gemma3)")
    ap.add_argument("--set", choices=sorted(SETS), default="smollm2", help="which model's goldens")
    ap.add_argument("--model", help="model file (default: the set's)")
    ap.add_argument("--quick", action="store_true",
                    help="teacher golden: llama.cpp's self-agreement from the first %d tokens only" % QUICK_SELF)
    args = ap.parse_args()
    global SET, MODEL, ADD_SPECIAL
    SET = args.set
    MODEL = args.model or SETS[SET]["model"]
    ADD_SPECIAL = SETS[SET]["add_special"]
    for p in (MODEL, TOOL, TEXT):
        if not os.path.exists(p):
            sys.exit("missing %s (run scripts/ref/make_goldens.sh, which fetches and builds)" % p)
    os.makedirs(args.out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "teacher"):
            g = teacher_forced(tmp, args.threads, args.out_dir, args.quick)
            print("teacher-forced perplexity %.4f over %d tokens; self-agreement %s"
                  % (g["perplexity"], g["n_tokens"],
                     json.dumps(g["llama_cpp_self_agreement"])), file=sys.stderr)
        if args.only == "long":
            g = long_context(tmp, args.threads, args.out_dir)
            print("second-half perplexity %.4f over positions %d..%d" % (g["perplexity"], g["score_from"],
                  g["n_tokens"] - 1), file=sys.stderr)
        if args.only in (None, "generate"):
            g = generate(tmp, args.threads, args.out_dir, args.n or SETS[SET]["n_predict"])
            for c in g["cases"]:
                print("%-6s stop=%s stable_prefix=%d/%d %r" % (c["name"], c["stop"],
                      c["stable_prefix"], len(c["tokens"]), c["text"]), file=sys.stderr)


if __name__ == "__main__":
    main()
