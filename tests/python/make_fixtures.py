#!/usr/bin/env python3
"""Writes small random-weight GGUF files (llama, and the other architectures of ARCH_SPECS) and, beside each, a JSON file with reference
logits from reference.py. Deterministic (fixed seeds), idempotent (files whose bytes would not
change are left untouched), a few seconds.

    python3 tests/python/make_fixtures.py [--out tests/fixtures]

Each <name>.gguf has llama.cpp's tensor names and metadata keys, all 2-D matrices in one weight
type (norms F32), and a small but valid byte-level BPE vocabulary ("gpt2" model, "smollm"
pre-tokenizer): 3 control tokens, the 256 GPT-2 byte symbols and BPE merges learned from a
fixed text, so that tokenize -> forward -> sample runs end to end. See README.md for the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter, TokenType
from gguf.quants import quantize

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference  # noqa: E402

SEED = 20250302
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
BOS_ID, EOS_ID = 1, 2
N_MERGES = 41  # vocab = 3 + 256 + 41 = 300

# Merges are learned from this text; the prompt below reuses its words so that merged tokens
# actually occur. No digits: pre-tokenizers differ on digits and this vocab is not about them.
TRAIN_TEXT = (
    "the cat sat on the mat. the dog sat on the log. then the cat and the dog ran to the house, "
    "and the man in the house said that the cat and the dog are the best of friends. "
    "there is a hat on the mat, and the cat is in the hat. the end of the story is near. "
)
PROMPT = "<|im_start|>user\nthe cat and the dog sat on the hat, then ran.<|im_end|>"

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------------------------
# byte-level BPE

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


BYTE_SYM = bytes_to_unicode()
# GPT-2's pattern restricted to what the fixed ASCII text needs (python `re` has no \p{L}).
PRETOKENIZE = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""")


def pretokenize(text: str) -> list[str]:
    return ["".join(BYTE_SYM[b] for b in piece.encode("utf-8")) for piece in PRETOKENIZE.findall(text)]


def train_merges(text: str, n: int) -> list[tuple[str, str]]:
    words = Counter(tuple(w) for w in pretokenize(text))
    merges: list[tuple[str, str]] = []
    for _ in range(n):
        pairs: Counter = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], [-ord(ch) for ch in kv[0][0] + kv[0][1]]))[0]
        merges.append(best)
        new_words: Counter = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += c
        words = new_words
    return merges


def bpe_encode(text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int]) -> list[int]:
    """Encodes text, splitting out the special tokens first (llama.cpp's parse_special=true)."""
    ids: list[int] = []
    for part in re.split("(" + "|".join(re.escape(s) for s in SPECIALS) + ")", text):
        if part in SPECIALS:
            ids.append(vocab[part])
            continue
        for word in pretokenize(part):
            syms = list(word)
            while len(syms) > 1:
                cand = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(syms, syms[1:]))]
                r, i = min(cand)
                if r == 1 << 30:
                    break
                syms[i:i + 2] = [syms[i] + syms[i + 1]]
            ids.extend(vocab[s] for s in syms)
    return ids


def build_vocab():
    merges = train_merges(TRAIN_TEXT, N_MERGES)
    tokens = SPECIALS + [BYTE_SYM[b] for b in range(256)] + [a + b for a, b in merges]
    assert len(set(tokens)) == len(tokens), "merged token collides with another token"
    types = [TokenType.CONTROL] * len(SPECIALS) + [TokenType.NORMAL] * (len(tokens) - len(SPECIALS))
    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = {m: i for i, m in enumerate(merges)}
    return tokens, types, [f"{a} {b}" for a, b in merges], vocab, ranks


# ---------------------------------------------------------------------------------------------
# fixtures

@dataclass
class Spec:
    name: str
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_layer: int
    tied: bool
    weight_type: str        # the 7 matrices of every layer
    embd_type: str          # token_embd
    output_type: str | None  # output.weight (None when tied)
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    # architecture (defaults: llama as SmolLM2 has it)
    arch: str = "llama"
    head_dim: int | None = None      # attention.key_length; None = n_embd / n_head
    qkv_bias: bool = False           # qwen2
    qk_norm: bool = False            # qwen3, gemma3
    post_norms: bool = False         # gemma3
    sliding_window: int = 0          # gemma3 (attention.sliding_window)
    llama3_rope_freqs: bool = False  # Llama 3.1's rope_freqs.weight


SPECS = [
    Spec("llama_f32_mha", 64, 4, 4, 96, 2, False, "F32", "F32", "F32"),
    Spec("llama_f32_gqa_tied", 128, 4, 2, 192, 3, True, "F32", "F32", None, rope_base=100000.0, rms_eps=1e-6),
    Spec("llama_f16_gqa", 64, 4, 2, 96, 2, False, "F16", "F16", "F16"),
    Spec("llama_bf16_mqa_tied", 64, 4, 1, 96, 2, True, "BF16", "BF16", None),
    Spec("llama_q8_0_gqa_tied", 128, 4, 2, 192, 2, True, "Q8_0", "Q8_0", None, rope_base=100000.0),
    Spec("llama_q4_0_mha", 64, 4, 4, 96, 3, False, "Q4_0", "Q4_0", "Q4_0"),
    Spec("llama_q4_1_gqa_tied", 128, 4, 2, 192, 2, True, "Q4_1", "Q8_0", None, rope_base=100000.0),  # SmolLM2's mix
    Spec("llama_q4_1_mqa", 64, 4, 1, 96, 2, False, "Q4_1", "Q4_1", "Q8_0"),
    # The other weight types of the type table. K-quants need rows of 256: n_embd 256, n_ff 512.
    Spec("llama_q5_0_gqa", 64, 4, 2, 96, 2, False, "Q5_0", "Q5_0", "Q8_0"),
    Spec("llama_q5_1_mqa_tied", 64, 4, 1, 96, 2, True, "Q5_1", "Q5_1", None),
    Spec("llama_iq4_nl_gqa", 64, 4, 2, 96, 1, False, "IQ4_NL", "Q8_0", "IQ4_NL"),
    Spec("llama_q4_k_gqa", 256, 4, 2, 512, 2, False, "Q4_K", "Q6_K", "Q6_K"),  # a Q4_K_M-like mix
    Spec("llama_q5_k_mqa_tied", 256, 4, 1, 768, 1, True, "Q5_K", "Q5_K", None),
    Spec("llama_q6_k_mha", 256, 2, 2, 512, 1, False, "Q6_K", "Q8_0", "Q6_K"),
    Spec("llama_q3_k_gqa", 256, 4, 2, 512, 1, False, "Q3_K", "Q3_K", "Q6_K"),
    Spec("llama_q2_k_gqa_tied", 256, 4, 2, 512, 1, True, "Q2_K", "Q2_K", None),
]

# gguf-py has no quantizer for these; their fixtures hold random blocks instead, with d (and
# dmin) set so the weights have about the wanted standard deviation and mean ~0:
# type: (byte offset of d, d / std, byte offset of dmin or None, dmin / d)
RANDOM_BLOCK_TYPES = {
    QT.IQ4_NL: (0, 1 / 60, None, 0.0),
    QT.Q2_K: (80, 1 / 10, 82, 1.5),
    QT.Q3_K: (108, 1 / 42, None, 0.0),
    QT.Q4_K: (0, 1 / 143, 2, 7.5),
    QT.Q5_K: (0, 1 / 320, 2, 15.5),
    QT.Q6_K: (208, 1 / 1370, None, 0.0),
}


def random_blocks(qtype: QT, a: np.ndarray) -> np.ndarray:
    """Random blocks of qtype for a float32 [rows, cols] array, scaled like a (not encoding it)."""
    from gguf.constants import GGML_QUANT_SIZES
    block, size = GGML_QUANT_SIZES[qtype]
    rows, cols = a.shape
    rng = np.random.default_rng([SEED, rows, cols, int(qtype)])
    b = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    d_at, d_per_std, m_at, m_per_d = RANDOM_BLOCK_TYPES[qtype]
    # Scales vary per block: with one d (and dmin a fixed multiple of it) every weight would sit
    # on a lattice of d / 2, and activations could hit exact rounding ties.
    d = (float(a.std()) * d_per_std * rng.uniform(0.5, 1.5, len(b))).astype(np.float32)
    b[:, d_at:d_at + 2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    if m_at is not None:
        dmin = d * m_per_d * rng.uniform(0.9, 1.1, len(b)).astype(np.float32)
        b[:, m_at:m_at + 2] = dmin.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return b.reshape(rows, -1)


# One fixture per architecture feature, float weights. Small windows and short original contexts
# so that the ~20-token prompt exercises them.
ARCH_SPECS = [
    Spec("qwen2_f32_gqa", 64, 4, 2, 96, 2, False, "F32", "F32", "F32", rope_base=1000000.0, rms_eps=1e-6,
         arch="qwen2", qkv_bias=True),
    Spec("qwen3_f32_gqa_tied", 64, 4, 2, 96, 2, True, "F32", "F32", None, rope_base=1000000.0, rms_eps=1e-6,
         arch="qwen3", head_dim=32, qk_norm=True),
    Spec("llama31_f32_gqa", 64, 4, 2, 96, 2, False, "F32", "F32", "F32", rope_base=500000.0,
         llama3_rope_freqs=True),
    Spec("mistral_f32_gqa", 64, 8, 2, 96, 2, False, "F32", "F32", "F32", rope_base=1000000.0),
    # 7 layers: with the default pattern 6, layers 0-4 and 6 are local (window 5), layer 5 global
    Spec("gemma3_f32_mqa_tied", 64, 4, 1, 96, 7, True, "F32", "F32", None, rope_base=1000000.0, rms_eps=1e-6,
         arch="gemma3", head_dim=32, qk_norm=True, post_norms=True, sliding_window=5),
]


def llama3_rope_factors(n_rot: int, base: float, factor: float = 8.0, low: float = 1.0, high: float = 4.0,
                        original_ctx: int = 64) -> np.ndarray:
    """Llama 3.1's per-pair frequency divisors (as its converter writes rope_freqs.weight):
    1 for short wavelengths, `factor` for long ones, smooth in between. original_ctx is 8192 in
    the real model; 64 here so that the fixture's short prompt meets every regime."""
    freqs = base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    out = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < original_ctx / high:
            out.append(1.0)
        elif wavelen > original_ctx / low:
            out.append(factor)
        else:
            smooth = (original_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def store(qtype: QT, a: np.ndarray) -> tuple[np.ndarray, QT | None]:
    """Encodes a float32 [rows, cols] array for GGUFWriter.add_tensor: (data, raw_dtype)."""
    if qtype == QT.F32:
        return a.astype(np.float32), None
    if qtype == QT.F16:
        return a.astype(np.float16), None
    if qtype in RANDOM_BLOCK_TYPES:
        return random_blocks(qtype, a), qtype
    return quantize(a.astype(np.float32), qtype), qtype


def make_weights(spec: Spec, n_vocab: int, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, QT]]:
    """Random float32 weights [rows, cols] by tensor name, with their storage type.

    Scales are chosen so activations stay O(1) through the network and logits have a spread of
    a few units: projections ~ N(0, 1/n_in) (attention scores and residual updates O(1)),
    embeddings ~ N(0, 1/n_embd) * 1.5 (after the final rmsnorm, tied logits have std ~1.5),
    norm weights in [0.7, 1.3] so that forgetting to apply them is visible."""
    E, F = spec.n_embd, spec.n_ff
    hd = spec.head_dim or E // spec.n_head
    wt, et = QT[spec.weight_type], QT[spec.embd_type]

    def normal(rows, cols, std):
        return (rng.standard_normal((rows, cols)) * std).astype(np.float32)

    def norm(n):
        return rng.uniform(0.7, 1.3, n).astype(np.float32)

    w: dict[str, tuple[np.ndarray, QT]] = {"token_embd.weight": (normal(n_vocab, E, 1.5 / np.sqrt(E)), et)}
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = (norm(E), QT.F32)
        w[p + "attn_q.weight"] = (normal(spec.n_head * hd, E, 1 / np.sqrt(E)), wt)
        w[p + "attn_k.weight"] = (normal(spec.n_head_kv * hd, E, 1 / np.sqrt(E)), wt)
        w[p + "attn_v.weight"] = (normal(spec.n_head_kv * hd, E, 1 / np.sqrt(E)), wt)
        w[p + "attn_output.weight"] = (normal(E, spec.n_head * hd, 1 / np.sqrt(spec.n_head * hd)), wt)
        w[p + "ffn_norm.weight"] = (norm(E), QT.F32)
        w[p + "ffn_gate.weight"] = (normal(F, E, 1 / np.sqrt(E)), wt)
        w[p + "ffn_up.weight"] = (normal(F, E, 1 / np.sqrt(E)), wt)
        w[p + "ffn_down.weight"] = (normal(E, F, 1 / np.sqrt(F)), wt)
        if spec.qkv_bias:
            w[p + "attn_q.bias"] = (rng.normal(0, 0.5, spec.n_head * hd).astype(np.float32), QT.F32)
            w[p + "attn_k.bias"] = (rng.normal(0, 0.5, spec.n_head_kv * hd).astype(np.float32), QT.F32)
            w[p + "attn_v.bias"] = (rng.normal(0, 0.5, spec.n_head_kv * hd).astype(np.float32), QT.F32)
        if spec.qk_norm:
            w[p + "attn_q_norm.weight"] = (norm(hd), QT.F32)
            w[p + "attn_k_norm.weight"] = (norm(hd), QT.F32)
        if spec.post_norms:
            w[p + "post_attention_norm.weight"] = (norm(E), QT.F32)
            w[p + "post_ffw_norm.weight"] = (norm(E), QT.F32)
    w["output_norm.weight"] = (norm(E), QT.F32)
    if spec.llama3_rope_freqs:
        w["rope_freqs.weight"] = (llama3_rope_factors(hd, spec.rope_base), QT.F32)
    if not spec.tied:
        w["output.weight"] = (normal(n_vocab, E, 1.5 / np.sqrt(E)), QT[spec.output_type])
    return w


def write_gguf(path: Path, spec: Spec, vocab_parts, weights) -> None:
    tokens, types, merges, _, _ = vocab_parts
    E = spec.n_embd
    hd = spec.head_dim or E // spec.n_head
    w = GGUFWriter(str(path), spec.arch)
    w.add_name(spec.name)
    w.add_block_count(spec.n_layer)
    w.add_context_length(256)
    w.add_embedding_length(E)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_rope_freq_base(spec.rope_base)
    w.add_layer_norm_rms_eps(spec.rms_eps)
    w.add_rope_dimension_count(hd)
    if spec.head_dim:
        w.add_key_length(hd)
        w.add_value_length(hd)
    if spec.sliding_window:
        w.add_sliding_window(spec.sliding_window)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_unk_token_id(0)
    w.add_pad_token_id(EOS_ID)
    w.add_add_bos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, (a, qt) in weights.items():
        data, raw = store(qt, a)
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def replace_if_changed(tmp: Path, dest: Path) -> bool:
    if dest.exists() and dest.read_bytes() == tmp.read_bytes():
        tmp.unlink()
        return False
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)
    return True


def make_one(out: Path, idx: int, spec: Spec, vocab_parts, prompt_tokens: list[int]) -> dict:
    rng = np.random.default_rng([SEED, idx])
    n_vocab = len(vocab_parts[0])
    weights = make_weights(spec, n_vocab, rng)
    dest = out / f"{spec.name}.gguf"
    with tempfile.NamedTemporaryFile(dir=out, suffix=".tmp", delete=False) as t:
        tmp = Path(t.name)
    write_gguf(tmp, spec, vocab_parts, weights)
    # The reference reads the file back, so it sees exactly the bits that were written.
    model = reference.load(str(tmp))
    changed = replace_if_changed(tmp, dest)

    logits = reference.forward(model, prompt_tokens)
    margins = np.full(len(prompt_tokens), 0.5)  # 0.5: the largest possible distance to a tie
    logits_q8 = reference.forward(model, prompt_tokens, act_q8=True, margins=margins)
    c = model.cfg
    doc = {
        "prompt": PROMPT,
        "tokens": prompt_tokens,
        "n_vocab": n_vocab,
        "config": {
            **{k: v for k, v in asdict(c).items()},
            "tied": spec.tied,
            "weight_type": spec.weight_type,
            "embd_type": spec.embd_type,
            "output_type": spec.output_type,
        },
        "logits": logits.tolist(),
        "logits_actq8": logits_q8.tolist(),
        "actq8_margin": margins.tolist(),
    }
    text = json.dumps(doc, separators=(",", ":")) + "\n"
    jdest = out / f"{spec.name}.json"
    if not jdest.exists() or jdest.read_text() != text:
        jdest.write_text(text)
        changed = True
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return {"name": spec.name, "changed": changed, "logit_std": float(logits.std(axis=1).mean()),
            "max_abs": float(np.abs(logits).max()), "top_p": float(p.max(axis=1).mean()),
            "q8_rel": float((np.abs(logits_q8 - logits).max(axis=1) / np.abs(logits).max(axis=1)).max())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="write the GGUF + JSON test fixtures")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "fixtures"))
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    vocab_parts = build_vocab()
    _, _, _, vocab, ranks = vocab_parts
    prompt_tokens = bpe_encode(PROMPT, vocab, ranks)
    assert 16 <= len(prompt_tokens) <= 24, len(prompt_tokens)
    # architecture fixtures seed from 100 on, so that adding weight-type specs changes none of them
    numbered = list(enumerate(SPECS)) + [(100 + i, s) for i, s in enumerate(ARCH_SPECS)]
    for idx, spec in numbered:
        r = make_one(out, idx, spec, vocab_parts, prompt_tokens)
        if not a.quiet:
            print(f"{r['name']:24s} {'written' if r['changed'] else 'unchanged':9s} logit std {r['logit_std']:.2f} "
                  f"max|l| {r['max_abs']:.2f} mean top-p {r['top_p']:.2f} actq8 rel diff {r['q8_rel']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
