#!/usr/bin/env python3
"""Readable numpy forward pass of a GGUF model (architectures llama, qwen2, qwen3, gemma3), the
independent reference that the C++ forward pass is tested against.

Everything is float64 on the DEQUANTIZED weights (dequantized by the `gguf` package, so the
block layouts are ggml's). Layout facts worth knowing:

* A GGUF 2-D tensor has ne = [cols, rows]; the gguf package hands it to numpy as [rows, cols],
  so y = W @ x with W of shape [n_out, n_in] -- exactly the nn.Linear convention.
* RoPE is ggml's "normal" mode 0: inside each head the rotary pairs are ADJACENT elements
  (2i, 2i+1), theta_i = pos * base**(-2i / n_rot). llama.cpp's converter permuted the Hugging
  Face q/k rows so that this equals HF's rotate_half convention on the original checkpoint.
* GQA: query head h reads kv head h // (n_head // n_head_kv).
* What sets the architectures apart (facts from llama.cpp's src/models/<arch>.cpp):
  - qwen2: biases on the q, k, v projections; NEOX rotary pairs (i, i + n_rot/2).
  - qwen3: RMS norm of every q and k head (weights [head_dim]) before the rotary embedding;
    NEOX pairs; attention.key_length may differ from n_embd / n_head.
  - llama with rope_freqs.weight (Llama 3.1): pair i's frequency is divided by factor i.
  - gemma3: embeddings * sqrt(n_embd); GeGLU with the tanh GELU; QK norm; RMS norms after
    attention and after the FFN too (post_attention_norm, post_ffw_norm); NEOX pairs; scores
    scaled by 1/sqrt(key_length); with attention.sliding_window = W, layer i is local when
    i % P < P - 1 (P = attention.sliding_window_pattern, default 6): a query at p sees keys at
    positions > p - W, rotary base rope.freq_base_swa (default 10000), no position scaling.

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
    arch: str = "llama"
    activation: str = "silu"            # of the gated FFN: silu | gelu_tanh
    rope_neox: bool = False             # rotary pairs (i, i + n_rot/2) instead of (2i, 2i+1)
    qk_norm: bool = False
    post_norms: bool = False
    qkv_bias: bool = False
    embd_scale: float = 1.0
    attn_scale: float = 0.0             # 0: 1/sqrt(head_dim)
    logit_softcap: float = 0.0
    rope_freqs: list | None = None      # per-pair frequency divisors
    layer_window: list = field(default_factory=list)      # per layer; 0 = full attention
    layer_rope_base: list = field(default_factory=list)   # per layer
    layer_rope_scale: list = field(default_factory=list)  # per layer (positions divided by it)


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
    bq: np.ndarray | None = None
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    attn_post_norm: np.ndarray | None = None
    ffn_post_norm: np.ndarray | None = None


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


ARCHS = ("llama", "qwen2", "qwen3", "gemma3")


def _arch_config(r: GGUFReader, arch: str, n_embd: int, n_head: int, head_dim: int, n_layer: int) -> dict:
    """The settings that set architectures apart (see the module docstring)."""
    def key(name, default=None):
        return _field(r, f"{arch}.{name}", default)

    base = float(key("rope.freq_base", 10000.0))
    scale = float(key("rope.scaling.factor", 1.0)) if key("rope.scaling.type", "none") == "linear" else 1.0
    cfg = dict(arch=arch, layer_window=[0] * n_layer, layer_rope_base=[base] * n_layer,
               layer_rope_scale=[scale] * n_layer, attn_scale=1.0 / np.sqrt(head_dim))
    if arch == "qwen2":
        cfg.update(qkv_bias=True, rope_neox=True)
    elif arch == "qwen3":
        cfg.update(qk_norm=True, rope_neox=True)
    elif arch == "gemma3":
        cfg.update(activation="gelu_tanh", rope_neox=True, qk_norm=True, post_norms=True,
                   embd_scale=float(np.sqrt(np.float32(n_embd))),
                   logit_softcap=float(key("final_logit_softcapping", 0.0)))
        if n_layer == 62:  # the 27B model's query_pre_attn_scalar
            cfg["attn_scale"] = 1.0 / np.sqrt(n_embd // n_head)
        window = int(key("attention.sliding_window", 0))
        if window > 0:
            pattern = int(key("attention.sliding_window_pattern", 6))
            local_base = float(key("rope.freq_base_swa", 10000.0))
            for i in range(n_layer):
                if pattern == 0 or i % pattern < pattern - 1:
                    cfg["layer_window"][i] = window
                    cfg["layer_rope_base"][i] = local_base
                    cfg["layer_rope_scale"][i] = 1.0
    return cfg


def load(path: str) -> Model:
    r = GGUFReader(path)
    arch = _field(r, "general.architecture")
    if arch not in ARCHS:
        raise ValueError(f"{path}: architecture {arch!r}, supported: {', '.join(ARCHS)}")
    n_embd = int(_field(r, f"{arch}.embedding_length"))
    n_head = int(_field(r, f"{arch}.attention.head_count"))
    n_layer = int(_field(r, f"{arch}.block_count"))
    tensors = {t.name: t for t in r.tensors}

    def mat(name: str) -> np.ndarray:
        t = tensors[name]
        qt = QT(int(t.tensor_type))
        a = dequantize(t.data, qt).astype(np.float64)
        cols = int(t.shape[0])
        return a.reshape(-1, cols) if len(t.shape) > 1 else a.reshape(cols)

    def opt(name: str) -> np.ndarray | None:
        return mat(name) if name in tensors else None

    def lin(name: str) -> Linear:
        t = tensors[name]
        qt = QT(int(t.tensor_type))
        mins = None
        if qt in (QT.Q4_1, QT.Q5_1):  # block: fp16 d, fp16 m, then the quants
            raw = np.ascontiguousarray(t.data).reshape(t.data.shape[0], -1, 20 if qt == QT.Q4_1 else 24)
            mins = np.ascontiguousarray(raw[:, :, 2:4]).view(np.float16)[..., 0].astype(np.float64)
        return Linear(mat(name), qt, mins)

    n_vocab = int(tensors["token_embd.weight"].shape[1])
    head_dim = int(_field(r, f"{arch}.attention.key_length", n_embd // n_head))
    cfg = Config(
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=int(_field(r, f"{arch}.attention.head_count_kv", n_head)),
        head_dim=head_dim,
        n_ff=int(_field(r, f"{arch}.feed_forward_length")),
        n_layer=n_layer,
        n_rot=int(_field(r, f"{arch}.rope.dimension_count", head_dim)),
        rope_base=float(_field(r, f"{arch}.rope.freq_base", 10000.0)),
        rms_eps=float(_field(r, f"{arch}.attention.layer_norm_rms_epsilon")),
        n_ctx=int(_field(r, f"{arch}.context_length", 0)),
        **_arch_config(r, arch, n_embd, n_head, head_dim, n_layer),
    )
    if "rope_freqs.weight" in tensors:
        cfg.rope_freqs = mat("rope_freqs.weight").tolist()
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
            bq=opt(p + "attn_q.bias"), bk=opt(p + "attn_k.bias"), bv=opt(p + "attn_v.bias"),
            q_norm=opt(p + "attn_q_norm.weight"), k_norm=opt(p + "attn_k_norm.weight"),
            attn_post_norm=opt(p + "post_attention_norm.weight"), ffn_post_norm=opt(p + "post_ffw_norm.weight"),
        ))
        L = m.layers[-1]
        assert (L.bq is not None) == cfg.qkv_bias, f"{p}: q/k/v biases do not match the {arch} architecture"
        assert (L.q_norm is not None) == cfg.qk_norm, f"{p}: q/k norms do not match the {arch} architecture"
        assert (L.attn_post_norm is not None) == cfg.post_norms, f"{p}: post norms do not match the {arch} architecture"
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


def rope(x: np.ndarray, positions: np.ndarray, n_rot: int, base: float, scale: float = 1.0,
         neox: bool = False, factors=None) -> np.ndarray:
    """x [T, n_heads, head_dim]; rotates pairs of the first n_rot dims by
    theta_i = pos / scale * base**(-2i / n_rot) / factors[i]. Pairs are adjacent (2i, 2i+1)
    (ggml's normal mode) or, with neox, (i, i + n_rot/2)."""
    i = np.arange(n_rot // 2, dtype=np.float64)
    freq = base ** (-2.0 * i / n_rot)
    if factors is not None:
        freq = freq / np.asarray(factors, dtype=np.float64)
    theta = (positions[:, None].astype(np.float64) / scale) * freq    # [T, n_rot/2]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    out = x.copy()
    if neox:
        x0, x1 = x[..., : n_rot // 2], x[..., n_rot // 2: n_rot]
        out[..., : n_rot // 2] = x0 * cos - x1 * sin
        out[..., n_rot // 2: n_rot] = x0 * sin + x1 * cos
    else:
        x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out[..., 0:n_rot:2] = x0 * cos - x1 * sin
        out[..., 1:n_rot:2] = x0 * sin + x1 * cos
    return out


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


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
    x = m.tok_embd[tokens] * c.embd_scale
    group = c.n_head // c.n_head_kv
    attn_scale = c.attn_scale or 1.0 / np.sqrt(c.head_dim)
    act = gelu_tanh if c.activation == "gelu_tanh" else silu

    def mm(h, lin):
        return matmul(h, lin, act_q8, margins, llamacpp)

    for li, L in enumerate(m.layers):
        window = c.layer_window[li] if c.layer_window else 0
        base = c.layer_rope_base[li] if c.layer_rope_base else c.rope_base
        scale = c.layer_rope_scale[li] if c.layer_rope_scale else 1.0
        # key j is visible to query i when j <= i and, in a sliding-window layer, j > i - window
        d = pos[:, None] - pos[None, :]
        visible = (d >= 0) & ((d < window) if window > 0 else True)
        mask = np.where(visible, 0.0, -np.inf)

        h = rmsnorm(x, L.attn_norm, c.rms_eps)
        q, k, v = mm(h, L.wq), mm(h, L.wk), mm(h, L.wv)
        if L.bq is not None:
            q, k, v = q + L.bq, k + L.bk, v + L.bv
        q = q.reshape(T, c.n_head, c.head_dim)
        k = k.reshape(T, c.n_head_kv, c.head_dim)
        v = v.reshape(T, c.n_head_kv, c.head_dim)
        if L.q_norm is not None:
            q = rmsnorm(q, L.q_norm, c.rms_eps)
            k = rmsnorm(k, L.k_norm, c.rms_eps)
        q = rope(q, pos, c.n_rot, base, scale, c.rope_neox, c.rope_freqs)
        k = rope(k, pos, c.n_rot, base, scale, c.rope_neox, c.rope_freqs)
        if collect_qk is not None:
            collect_qk.append((q.copy(), k.copy()))
        att = np.empty((T, c.n_head, c.head_dim))
        for hh in range(c.n_head):
            kv = hh // group
            s = q[:, hh, :] @ k[:, kv, :].T * attn_scale + mask   # [T, T]
            s = np.exp(s - s.max(axis=1, keepdims=True))
            s /= s.sum(axis=1, keepdims=True)
            att[:, hh, :] = s @ v[:, kv, :]
        o = mm(att.reshape(T, -1), L.wo)
        if L.attn_post_norm is not None:
            o = rmsnorm(o, L.attn_post_norm, c.rms_eps)
        x = x + o
        h = rmsnorm(x, L.ffn_norm, c.rms_eps)
        f = mm(act(mm(h, L.w_gate)) * mm(h, L.w_up), L.w_down)
        if L.ffn_post_norm is not None:
            f = rmsnorm(f, L.ffn_post_norm, c.rms_eps)
        x = x + f
    h = rmsnorm(x, m.output_norm, c.rms_eps)
    logits = mm(h, m.output)
    if c.logit_softcap > 0:
        logits = c.logit_softcap * np.tanh(logits / c.logit_softcap)
    return logits


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
