#!/usr/bin/env python3
"""Readable numpy forward pass of a llama-architecture GGUF model, the independent reference
that the C++ forward pass is tested against.

Everything is float64 on the DEQUANTIZED weights (dequantized by the `gguf` package, so the
block layouts are ggml's). Layout facts worth knowing:

* A GGUF 2-D tensor has ne = [cols, rows]; the gguf package hands it to numpy as [rows, cols],
  so y = W @ x with W of shape [n_out, n_in] -- exactly the nn.Linear convention.
* RoPE is ggml's "normal" mode 0: inside each head the rotary pairs are ADJACENT elements
  (2i, 2i+1), theta_i = pos * base**(-2i / n_rot). llama.cpp's converter permuted the Hugging
  Face q/k rows so that this equals HF's rotate_half convention on the original checkpoint.
* GQA: query head h reads kv head h // (n_head // n_head_kv).

Optional emulation of llama.cpp's 8-bit activation quantization (act_q8=True): before every
matmul whose weight is Q4_0, Q4_1 or Q8_0, each input row is cut into 32-element blocks and
replaced by x' = q * fp16(d), where d = max|x| / 127 over the block, q = x / d rounded half
away from zero (|q| <= 127 by construction), and q = 0 when d == 0. This is ggml's Q8_0/Q8_1
activation format (the scale is STORED as fp16, which is why fp16(d) and not d multiplies q).
Q5_0, Q5_1 and IQ4_NL weights get the same blocks; K-quant weights (Q2_K..Q6_K) get ggml's
Q8_K super-blocks of 256 instead (see _act_q8k).

CLI (spot checks):  python3 tests/python/reference.py MODEL.gguf --tokens 1,2,3 [--act-q8]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.quants import dequantize

Q8_ACT_TYPES = (QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.Q5_0, QT.Q5_1, QT.IQ4_NL)   # blocks of 32 (ggml's Q8_0/Q8_1)
Q8K_ACT_TYPES = (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K)          # super-blocks of 256 (ggml's Q8_K)


@dataclass
class Config:
    n_vocab: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_layer: int
    n_rot: int
    rope_base: float
    rms_eps: float
    n_ctx: int = 0


@dataclass
class Linear:
    """A weight matrix [n_out, n_in] (float64, dequantized) and the ggml type it was stored as."""
    w: np.ndarray
    qtype: QT = QT.F32
    mins: np.ndarray | None = None   # Q4_1/Q5_1 only: per-block minimum m [n_out, n_in/32], for llamacpp mode


@dataclass
class Layer:
    attn_norm: np.ndarray
    wq: Linear
    wk: Linear
    wv: Linear
    wo: Linear
    ffn_norm: np.ndarray
    w_gate: Linear
    w_up: Linear
    w_down: Linear


@dataclass
class Model:
    cfg: Config
    tok_embd: np.ndarray          # [n_vocab, n_embd], used for the lookup
    output: Linear                # [n_vocab, n_embd]; token_embd itself when tied
    output_norm: np.ndarray
    layers: list[Layer] = field(default_factory=list)
    tied: bool = True


# ---------------------------------------------------------------------------------------------
# loading

def _field(reader: GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise KeyError(f"missing metadata key {key}")
        return default
    return f.contents()


def load(path: str) -> Model:
    r = GGUFReader(path)
    arch = _field(r, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r}, only llama is supported")
    n_embd = int(_field(r, "llama.embedding_length"))
    n_head = int(_field(r, "llama.attention.head_count"))
    tensors = {t.name: t for t in r.tensors}

    def mat(name: str) -> np.ndarray:
        t = tensors[name]
        qt = QT(int(t.tensor_type))
        a = dequantize(t.data, qt).astype(np.float64)
        cols = int(t.shape[0])
        return a.reshape(-1, cols) if len(t.shape) > 1 else a.reshape(cols)

    def lin(name: str) -> Linear:
        t = tensors[name]
        qt = QT(int(t.tensor_type))
        mins = None
        if qt in (QT.Q4_1, QT.Q5_1):  # block: fp16 d, fp16 m, then the quants
            raw = np.ascontiguousarray(t.data).reshape(t.data.shape[0], -1, 20 if qt == QT.Q4_1 else 24)
            mins = np.ascontiguousarray(raw[:, :, 2:4]).view(np.float16)[..., 0].astype(np.float64)
        return Linear(mat(name), qt, mins)

    n_vocab = int(tensors["token_embd.weight"].shape[1])
    head_dim = n_embd // n_head
    cfg = Config(
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=int(_field(r, "llama.attention.head_count_kv", n_head)),
        head_dim=head_dim,
        n_ff=int(_field(r, "llama.feed_forward_length")),
        n_layer=int(_field(r, "llama.block_count")),
        n_rot=int(_field(r, "llama.rope.dimension_count", head_dim)),
        rope_base=float(_field(r, "llama.rope.freq_base", 10000.0)),
        rms_eps=float(_field(r, "llama.attention.layer_norm_rms_epsilon")),
        n_ctx=int(_field(r, "llama.context_length", 0)),
    )
    tok = lin("token_embd.weight")
    tied = "output.weight" not in tensors
    m = Model(cfg, tok.w, tok if tied else lin("output.weight"), mat("output_norm.weight"), tied=tied)
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        m.layers.append(Layer(
            attn_norm=mat(p + "attn_norm.weight"),
            wq=lin(p + "attn_q.weight"), wk=lin(p + "attn_k.weight"), wv=lin(p + "attn_v.weight"),
            wo=lin(p + "attn_output.weight"),
            ffn_norm=mat(p + "ffn_norm.weight"),
            w_gate=lin(p + "ffn_gate.weight"), w_up=lin(p + "ffn_up.weight"), w_down=lin(p + "ffn_down.weight"),
        ))
    return m


# ---------------------------------------------------------------------------------------------
# the forward pass

def round_half_away(x: np.ndarray) -> np.ndarray:
    a = np.abs(x)
    f = np.floor(a)
    return np.sign(x) * (f + (a - f >= 0.5))


def _act_q8_blocks(x: np.ndarray, margins: np.ndarray | None = None):
    """x [T, n] (n a multiple of 32) -> q [T, n/32, 32] (integers as float64) and d [T, n/32]."""
    T, n = x.shape
    b = x.reshape(T, n // 32, 32)
    d = np.abs(b).max(axis=2) / 127.0
    v = np.abs(b) / np.where(d > 0, d, 1.0)[..., None]
    q = np.clip(np.sign(b) * round_half_away(v), -127, 127)   # all zero where d == 0
    if margins is not None:
        gap = np.where(d[..., None] > 0, np.abs(v - np.floor(v) - 0.5), np.inf)
        np.minimum(margins, gap.reshape(T, -1).min(axis=1), out=margins)
    return q, d


def _act_q8k(x: np.ndarray, margins: np.ndarray | None = None) -> np.ndarray:
    """Emulates ggml's Q8_K activation super-blocks on x [T, n] (n a multiple of 256), in float32
    as ggml computes them: m = the element of largest |x| (first on ties), iscale = -127 / m,
    q = min(127, round_half_even(iscale * x)), d = 1 / iscale. Returns q * d. margins: as
    quantize_act_q8, with distances to ties of iscale * x."""
    T, n = x.shape
    b = x.astype(np.float32).reshape(T, n // 256, 256)
    idx = np.abs(b).argmax(axis=2)[..., None]
    m = np.take_along_axis(b, idx, axis=2)[..., 0]
    nz = m != 0
    iscale = np.where(nz, np.float32(-127.0) / np.where(nz, m, np.float32(1)), np.float32(0)).astype(np.float32)
    v = (iscale[..., None] * b).astype(np.float32)
    q = np.minimum(np.rint(v), 127).astype(np.float64)
    d = np.where(nz, np.float32(1) / np.where(nz, iscale, np.float32(1)), np.float32(0)).astype(np.float64)
    if margins is not None:
        gap = np.where(nz[..., None], np.abs(v - np.floor(v) - 0.5), np.inf)
        np.minimum(margins, gap.reshape(T, -1).min(axis=1), out=margins)
    return (q * d[..., None]).reshape(x.shape)


def quantize_act_q8(x: np.ndarray, margins: np.ndarray | None = None) -> np.ndarray:
    """Emulates ggml's Q8_0 activation blocks on x [T, n]: returns q * fp16(d) per block.

    If `margins` [T] is given, it is lowered to the smallest distance, in units of q, between
    |x|/d and a rounding boundary k + 1/2 seen in each row: where that is tiny, an engine
    computing in float32 may round the other way (see README)."""
    q, d = _act_q8_blocks(x, margins)
    return (q * _fp16(d)[..., None]).reshape(x.shape)


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32).astype(np.float16).astype(np.float64)


def _bf16(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 with round-to-nearest-even, as ggml_compute_fp32_to_bf16 (finite inputs)."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


def matmul(x: np.ndarray, lin: Linear, act_q8: bool, margins: np.ndarray | None = None,
           llamacpp: bool = False) -> np.ndarray:
    """x [T, n_in] -> [T, n_out].

    llamacpp=True additionally mimics what llama.cpp's CPU backend does, for cross-checks only:
    activations are rounded to fp16 / bf16 before F16 / BF16 matmuls, and for Q4_1 the block sum
    term m * sum(x') uses ggml's Q8_1 field s = fp16(d * sum(q)) instead of the exact sum."""
    if llamacpp and lin.qtype == QT.F16:
        return _fp16(x) @ lin.w.T
    if llamacpp and lin.qtype == QT.BF16:
        return _bf16(x) @ lin.w.T
    if (act_q8 or llamacpp) and lin.qtype in Q8K_ACT_TYPES:
        return _act_q8k(x, margins) @ lin.w.T
    if not (act_q8 or llamacpp) or lin.qtype not in Q8_ACT_TYPES:
        return x @ lin.w.T
    q, d = _act_q8_blocks(x, margins)
    y = (q * _fp16(d)[..., None]).reshape(x.shape) @ lin.w.T
    if llamacpp and lin.qtype in (QT.Q4_1, QT.Q5_1):
        # exact sum(x') is fp16(d) * sum(q); ggml uses its stored s = fp16(d * sum(q)) instead
        sum_q = q.sum(axis=2)
        y = y + (_fp16(d * sum_q) - _fp16(d) * sum_q) @ lin.mins.T
    return y


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, positions: np.ndarray, n_rot: int, base: float) -> np.ndarray:
    """x [T, n_heads, head_dim]; rotates adjacent pairs (2i, 2i+1) of the first n_rot dims."""
    i = np.arange(n_rot // 2, dtype=np.float64)
    theta = positions[:, None].astype(np.float64) * base ** (-2.0 * i / n_rot)   # [T, n_rot/2]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    out = x.copy()
    x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
    out[..., 0:n_rot:2] = x0 * cos - x1 * sin
    out[..., 1:n_rot:2] = x0 * sin + x1 * cos
    return out


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def forward(m: Model, tokens, act_q8: bool = False, collect_qk: list | None = None,
            margins: np.ndarray | None = None, llamacpp: bool = False) -> np.ndarray:
    """Logits [T, n_vocab] for every position of `tokens` (positions 0..T-1, causal).

    If collect_qk is a list, (q, k) per layer are appended: post-RoPE queries [T, n_head, head_dim]
    and keys [T, n_head_kv, head_dim]. margins: see quantize_act_q8 (only used with act_q8).
    llamacpp: see matmul; implies act_q8."""
    c = m.cfg
    tokens = np.asarray(tokens, dtype=np.int64)
    T = len(tokens)
    pos = np.arange(T)
    x = m.tok_embd[tokens].copy()
    group = c.n_head // c.n_head_kv
    causal = np.triu(np.full((T, T), -np.inf), k=1)
    for L in m.layers:
        h = rmsnorm(x, L.attn_norm, c.rms_eps)
        q = matmul(h, L.wq, act_q8, margins, llamacpp).reshape(T, c.n_head, c.head_dim)
        k = matmul(h, L.wk, act_q8, margins, llamacpp).reshape(T, c.n_head_kv, c.head_dim)
        v = matmul(h, L.wv, act_q8, margins, llamacpp).reshape(T, c.n_head_kv, c.head_dim)
        q = rope(q, pos, c.n_rot, c.rope_base)
        k = rope(k, pos, c.n_rot, c.rope_base)
        if collect_qk is not None:
            collect_qk.append((q.copy(), k.copy()))
        att = np.empty((T, c.n_head, c.head_dim))
        for hh in range(c.n_head):
            kv = hh // group
            s = q[:, hh, :] @ k[:, kv, :].T / np.sqrt(c.head_dim) + causal   # [T, T]
            s = np.exp(s - s.max(axis=1, keepdims=True))
            s /= s.sum(axis=1, keepdims=True)
            att[:, hh, :] = s @ v[:, kv, :]
        x = x + matmul(att.reshape(T, -1), L.wo, act_q8, margins, llamacpp)
        h = rmsnorm(x, L.ffn_norm, c.rms_eps)
        gate = matmul(h, L.w_gate, act_q8, margins, llamacpp)
        up = matmul(h, L.w_up, act_q8, margins, llamacpp)
        x = x + matmul(silu(gate) * up, L.w_down, act_q8, margins, llamacpp)
    h = rmsnorm(x, m.output_norm, c.rms_eps)
    return matmul(h, m.output, act_q8, margins, llamacpp)


def queries_keys(m: Model, tokens, act_q8: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer: (q [T, n_head, head_dim], k [T, n_head_kv, head_dim]), both post-RoPE."""
    qk: list = []
    forward(m, tokens, act_q8=act_q8, collect_qk=qk)
    return qk


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--tokens", required=True, help="comma-separated token ids")
    ap.add_argument("--act-q8", action="store_true", help="8-bit activations before quantized matmuls (Q8 blocks of 32, Q8_K for K-quants)")
    ap.add_argument("--llamacpp", action="store_true",
                    help="also mimic llama.cpp's fp16/bf16 activations and Q4_1 fp16 block sums (cross-checks)")
    ap.add_argument("--top", type=int, default=5, help="top logits to print per position")
    ap.add_argument("--greedy", type=int, default=0, help="then greedily generate this many tokens")
    ap.add_argument("--npy", help="save the [T, n_vocab] logits here")
    a = ap.parse_args(argv)
    m = load(a.model)
    toks = [int(t) for t in a.tokens.split(",") if t.strip()]
    if any(t < 0 or t >= m.cfg.n_vocab for t in toks):
        print(f"token ids must be in [0, {m.cfg.n_vocab})", file=sys.stderr)
        return 2
    logits = forward(m, toks, act_q8=a.act_q8, llamacpp=a.llamacpp)
    if a.npy:
        np.save(a.npy, logits)
    names = None
    try:
        names = GGUFReader(a.model).fields["tokenizer.ggml.tokens"].contents()
    except Exception:
        pass
    print(f"{m.cfg}\ntied output: {m.tied}")
    for t, row in enumerate(logits):
        top = np.argsort(-row)[: a.top]
        desc = ", ".join(f"{i}{'=' + repr(names[i]) if names else ''}:{row[i]:.4f}" for i in top)
        print(f"pos {t:3d} tok {toks[t]:6d}  max|l| {np.abs(row).max():8.4f}  mean {row.mean():8.4f}  top: {desc}")
    if a.greedy:
        seq = list(toks)
        for _ in range(a.greedy):
            seq.append(int(np.argmax(forward(m, seq, act_q8=a.act_q8, llamacpp=a.llamacpp)[-1])))
        gen = seq[len(toks):]
        print("greedy:", gen)
        if names:
            print("greedy text:", repr("".join(names[i] for i in gen)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
