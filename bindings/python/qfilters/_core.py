"""Model, KVConfig, Session, Filters and calibrate over the engine (qfilters._qfilters)."""
from __future__ import annotations

import atexit
import math
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _qfilters as _ext

Error = _ext.Error
PathLike = Union[str, "os.PathLike[str]"]
Message = Mapping[str, str]
Prompt = Union[str, Sequence[Message], Sequence[int]]


def policies() -> List[str]:
    """KV cache policies: ``"none"`` (full cache) and every eviction policy of this build."""
    return list(_ext.policy_names())  # the engine's list starts with "none"


def simd_target() -> str:
    """The SIMD instruction set the kernels run with on this CPU (e.g. ``"AVX3_DL"``)."""
    return _ext.simd_target()


class Model:
    """A GGUF model loaded once (memory-mapped) with its tokenizer and chat template.

    Args:
        path: GGUF file.
        threads: compute threads shared by every session of this model (None = all cores).
        n_ctx: context of new sessions (0 = the model's training context).
        n_batch: prompt tokens per forward chunk.
    """

    def __init__(self, path: PathLike, threads: Optional[int] = None, n_ctx: int = 0, n_batch: int = 256):
        self._m = _ext.Model(os.fspath(path), 0 if threads is None else int(threads), int(n_ctx), int(n_batch))

    @property
    def metadata(self) -> Dict[str, Any]:
        """Architecture and shape: n_layers, n_heads, n_kv_heads, head_dim, n_vocab, fingerprint, ..."""
        return self._m.metadata

    @property
    def n_vocab(self) -> int:
        return self._m.n_vocab

    @property
    def n_ctx(self) -> int:
        """Context of new sessions (tokens)."""
        return self._m.n_ctx

    @property
    def threads(self) -> int:
        return self._m.threads

    def tokenize(self, text: str, special: bool = True, add_special: bool = True) -> List[int]:
        """Token ids of `text`. special: parse special tokens written in the text (``<|im_start|>``);
        add_special: add the model's BOS (and EOS) tokens as its tokenizer says."""
        return self._m.tokenize(text, add_special, special)

    def detokenize(self, ids: Sequence[int], render_special: bool = True) -> str:
        """Text of token ids (control tokens rendered unless render_special is False)."""
        return self._m.detokenize([int(i) for i in ids], render_special)

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation ``[{"role": ..., "content": ...}, ...]``."""
        return self._m.apply_chat_template(list(messages), add_generation_prompt)

    def is_eog(self, token: int) -> bool:
        """Whether the token ends a generation (EOS, <|im_end|>, ...)."""
        return self._m.is_eog(int(token))

    def __repr__(self) -> str:
        md = self.metadata
        return f"Model({md['path']!r}, {md['architecture']}, {md['n_layers']} layers, {self.threads} threads)"


class Filters:
    """Q-Filters of a model: one unit direction per (layer, KV head), shape [n_layers, n_kv_heads, head_dim].

    Held in qf's canonical form (GGUF row order, a larger ``<k, f>`` means keep the key); files of
    other tools are converted when loaded (``layout``/``sign``) and when exported (:meth:`export_hf`).
    """

    def __init__(self, _impl: Any):
        self._f = _impl

    @classmethod
    def load(cls, path: PathLike, layout: Optional[str] = None, sign: Optional[str] = None) -> "Filters":
        """Reads a filter file (safetensors). Files not made by qf need ``layout`` ("gguf" | "hf") and
        ``sign`` ("keep_largest_dot" | "keep_smallest_dot"); published ones are hf / keep_smallest_dot."""
        return cls(_ext.Filters.load(os.fspath(path), layout, sign))

    @classmethod
    def from_numpy(cls, array: np.ndarray, metadata: Optional[Mapping[str, str]] = None) -> "Filters":
        """Filters from a [n_layers, n_kv_heads, head_dim] array in canonical form."""
        a = np.ascontiguousarray(array, dtype=np.float32)
        if a.ndim != 3:
            raise ValueError(f"filters must be a 3-d array [n_layers, n_kv_heads, head_dim], got shape {a.shape}")
        return cls(_ext.Filters.from_numpy(a, dict(metadata or {})))

    def save(self, path: PathLike) -> None:
        """Writes a qf filter file (safetensors, F32), readable by ``qf --filters``."""
        self._f.save(os.fspath(path))

    def export_hf(self, directory: PathLike) -> None:
        """Writes DIRECTORY/model.safetensors and config.json in the layout and sign of the published
        nthngdy/q-filters checkpoints, for kvpress: ``QFilters.from_pretrained(directory)``."""
        self._f.export_hf(os.fspath(directory))

    def compare(self, other: "Filters") -> Dict[str, Any]:
        """Cosine similarity per KV head: {"mean", "min", "per_layer": [...], "per_head": [...]}."""
        return self._f.compare(other._f)

    def to_numpy(self) -> np.ndarray:
        """A copy of the filters, float32 [n_layers, n_kv_heads, head_dim]."""
        return self._f.to_numpy()

    @property
    def shape(self) -> Tuple[int, int, int]:
        return self._f.shape

    @property
    def metadata(self) -> Dict[str, str]:
        """The file's metadata: model fingerprint, corpus, seed, calibration report (JSON), ..."""
        return self._f.metadata

    @property
    def path(self) -> Optional[str]:
        """The qf filter file these filters were last read from or saved to, if any."""
        return self._f.path

    def _file(self) -> str:
        """A qf filter file holding these filters (sessions load filters by path)."""
        if self.path is None:  # a new name each time: the engine caches filters by file name
            self.save(os.path.join(_scratch_dir(), f"filters-{uuid.uuid4().hex}.safetensors"))
        return self.path

    def __repr__(self) -> str:
        return f"Filters(shape={self.shape}, model={self.metadata.get('model', '?')!r})"


_scratch: Optional[str] = None


def _scratch_dir() -> str:
    global _scratch
    if _scratch is None:
        _scratch = tempfile.mkdtemp(prefix="qfilters-")
        atexit.register(shutil.rmtree, _scratch, True)
    return _scratch


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class KVConfig:
    """The KV cache of a session, validated at construction (ValueError on inconsistent settings).

    Args:
        policy: "none" (full cache) or an eviction policy: qfilters, knorm, streaming, random,
            snapkv, tova, h2o, expected_attention, keydiff, with query statistics in the filter
            file also qfilters_rope, ea_calibrated, qfilters_adaptive, qfilters_max; any with
            "+layer" (see :func:`qfilters.policies` and docs/method.md section 4).
        filters: Q-Filters for policy "qfilters": a :class:`Filters` or a filter file path.
        budget: during generation each KV head keeps at most `budget` tokens (0 = no bound;
            default 512 for an eviction policy without `ratio`, else 0).
        window: the newest `window` tokens are always kept (< budget; default 64 with a budget).
        evict_every: evict this many tokens at a time (amortises scoring).
        ratio: prefill compression: a prompt of T tokens keeps int(T * (1 - ratio)) per head.
        skip_layers: leave the first layers uncompressed.
        layer_weights: per-layer budgets at the same total memory: "spread" (from the query
            statistics of `filters`, a file made with ``qf calibrate --stats-rank N``: layers whose
            queries vary more keep more; more needles found, docs/results.md section 5) or one
            positive weight per layer; compressed layer l keeps w_l / mean(w) x budget tokens
            (None = the same budget everywhere). Saved states pin them.
        seed: seed of the random policy.
        filter_layout, filter_sign: how to read a filter file not made by qf (published: "hf",
            "keep_smallest_dot").
        cache_type_k, cache_type_v: KV storage types, when this build supports them.
        future_positions: expected_attention and the policies with query statistics: positions
            after the newest key the query statistics are moved to (``--future-positions``).
        filter_blend, filter_horizon: qfilters_adaptive and qfilters_max: weight in [0, 1] of the
            recent queries in the filter, and how many recent queries they average
            (``--filter-blend``, ``--filter-horizon``).
        filter_decay: qfilters_max: standard deviations per position by which a kept token's
            remembered score fades; ``math.inf`` = no memory (``--filter-decay``).
    """

    policy: str = "qfilters"
    filters: Union[Filters, PathLike, None] = None
    budget: Optional[int] = None
    window: Optional[int] = None
    evict_every: int = 1
    ratio: Optional[float] = None
    skip_layers: int = 0
    seed: int = 0
    layer_weights: Union[str, Sequence[float], None] = None
    filter_layout: Optional[str] = None
    filter_sign: Optional[str] = None
    cache_type_k: Optional[str] = None
    cache_type_v: Optional[str] = None
    future_positions: int = 512
    filter_blend: float = 1.0
    filter_horizon: int = 1
    filter_decay: float = 0.03

    def __post_init__(self) -> None:
        if not isinstance(self.policy, str) or not _ext.is_policy_name(self.policy):
            names = policies() + list(_ext.query_stats_policy_names())
            raise ValueError(f"unknown KV policy {self.policy!r}; one of: {', '.join(names)} "
                             "(any but none also with \"+layer\")")
        if self.budget is None:
            object.__setattr__(self, "budget", 0 if self.policy == "none" or self.ratio is not None else 512)
        if self.window is None:
            object.__setattr__(self, "window", 64 if isinstance(self.budget, int) and self.budget > 0 else 0)
        for name, minimum in (("budget", 0), ("window", 0), ("evict_every", 1), ("skip_layers", 0), ("seed", 0),
                              ("future_positions", 1), ("filter_horizon", 1)):
            _check_int(name, getattr(self, name), minimum)
        for name, low, high in (("filter_blend", 0.0, 1.0), ("filter_decay", 0.0, math.inf)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or math.isnan(value) or not low <= value <= high:
                raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not math.isfinite(self.ratio):
                raise ValueError(f"ratio must be a number in [0, 1), got {self.ratio!r}")
            if not 0.0 <= self.ratio < 1.0:
                raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.filters is not None and not isinstance(self.filters, (Filters, str, os.PathLike)):
            raise ValueError(f"filters must be a qfilters.Filters or a file path, got {type(self.filters).__name__}")
        if isinstance(self.filters, (str, os.PathLike)) and not os.path.isfile(self.filters):
            raise ValueError(f"filter file {os.fspath(self.filters)!r} does not exist")
        if self.filter_layout not in (None, "gguf", "hf"):
            raise ValueError(f"filter_layout must be 'gguf' or 'hf', got {self.filter_layout!r}")
        if self.filter_sign not in (None, "keep_largest_dot", "keep_smallest_dot"):
            raise ValueError(f"filter_sign must be 'keep_largest_dot' or 'keep_smallest_dot', got {self.filter_sign!r}")
        self._check_layer_weights()
        compress = self.budget > 0 or bool(self.ratio)
        if self.policy == "none":
            if compress or self.filters is not None or self.layer_weights is not None:
                raise ValueError("policy 'none' is a full cache: budget, ratio, filters and layer_weights need an "
                                 "eviction policy")
        else:
            if not compress:
                raise ValueError(f"policy {self.policy!r} needs budget > 0 and/or ratio > 0")
            if self.policy == "qfilters" and self.filters is None:
                raise ValueError("policy 'qfilters' needs filters (qfilters.calibrate(model) or a filter file)")
            if self.budget > 0 and self.window >= self.budget:
                raise ValueError(f"window ({self.window}) must be smaller than budget ({self.budget})")

    def _check_layer_weights(self) -> None:
        w = self.layer_weights
        if w is None or w == "spread":
            if w == "spread" and self.filters is None:
                raise ValueError("layer_weights='spread' needs filters with query statistics (qf calibrate --stats-rank N)")
            return
        if isinstance(w, (str, bytes)) or not isinstance(w, (Sequence, np.ndarray)) or len(w) == 0:
            raise ValueError(f"layer_weights must be 'spread' or a sequence of per-layer weights, got {w!r}")
        for x in w:
            if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(x) or x <= 0:
                raise ValueError(f"layer_weights must be positive and finite, got {x!r}")
        object.__setattr__(self, "layer_weights", tuple(float(x) for x in w))  # frozen: hashable

    def _layer_weights_spec(self) -> str:
        """The engine's spelling: "", "spread" or comma-separated weights (repr: exact)."""
        w = self.layer_weights
        if w is None:
            return ""
        return w if isinstance(w, str) else ",".join(repr(float(x)) for x in w)

    @classmethod
    def full(cls) -> "KVConfig":
        """A full (uncompressed) cache."""
        return cls(policy="none")

    def _options(self) -> Dict[str, Any]:
        """The engine's KvOptions."""
        full = self.policy == "none"
        filters = self.filters
        path = filters._file() if isinstance(filters, Filters) else (os.fspath(filters) if filters is not None else "")
        return {
            "policy": self.policy,
            "filters": path,
            "filter_layout": self.filter_layout or "",
            "filter_sign": self.filter_sign or "",
            "budget": 0 if full else self.budget,
            "window": 0 if full else self.window,
            "evict_every": self.evict_every,
            "ratio": 0.0 if full or self.ratio is None else float(self.ratio),
            "skip_layers": self.skip_layers,
            "layer_weights": "" if full else self._layer_weights_spec(),
            "seed": self.seed,
            "cache_type_k": self.cache_type_k or "",
            "cache_type_v": self.cache_type_v or "",
            "future_positions": self.future_positions,
            "filter_blend": float(self.filter_blend),
            "filter_horizon": self.filter_horizon,
            "filter_decay": float(self.filter_decay),
        }


class Session:
    """One sequence on a model with its own KV cache.

    Args:
        model: the :class:`Model`.
        kv: the cache (None = full cache).
        n_ctx: longest sequence in tokens (0 = the model's n_ctx).
    """

    def __init__(self, model: Model, kv: Optional[KVConfig] = None, n_ctx: int = 0):
        if not isinstance(model, Model):
            raise ValueError(f"model must be a qfilters.Model, got {type(model).__name__}")
        if kv is not None and not isinstance(kv, KVConfig):
            raise ValueError(f"kv must be a qfilters.KVConfig, got {type(kv).__name__}")
        _check_int("n_ctx", n_ctx, 0)
        self.model = model
        self.kv = kv if kv is not None else KVConfig.full()
        self._s = _ext.Session(model._m, self.kv._options(), int(n_ctx))
        self.last_generation: Dict[str, Any] = {}

    @property
    def n_past(self) -> int:
        """Tokens in the sequence so far."""
        return self._s.n_past

    @property
    def n_ctx(self) -> int:
        return self._s.n_ctx

    def eval(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Appends tokens to the sequence (streaming compression runs after each chunk) and returns
        the logits of the last one, float32 [n_vocab], or of every one, [len(tokens), n_vocab]."""
        return self._s.eval(_token_list(tokens), all_logits)

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """Processes a prompt and applies prefill compression (``KVConfig.ratio``) at its end; returns
        the last token's logits."""
        return self._s.prefill(_token_list(tokens))

    def reset(self) -> None:
        """Forgets the sequence (memory stays allocated)."""
        self._s.reset()

    def kv_stats(self) -> Dict[str, Any]:
        """The cache now: bytes_used, bytes_reserved, full_cache_bytes (what a full cache of n_past
        tokens would hold), n_past, policy, evicted (slots), evictions (rounds), score_seconds,
        evict_seconds, and a one-line summary as ``qf run`` prints it."""
        return self._s.kv_stats()

    def kv_positions(self) -> List[List[List[int]]]:
        """The token positions each KV head holds now: ``[layer][kv_head] -> [positions]``."""
        return self._s.kv_positions()

    @property
    def tokens(self) -> List[int]:
        """The tokens the sequence has read (prompt and generated), as saved by :meth:`save_state`."""
        return self._s.tokens

    def save_state(self, path: Union[str, os.PathLike]) -> None:
        """Saves the sequence's compressed state to a file ("compress once, ask many"): every KV
        head's kept keys and values (in their storage type), positions and policy statistics, the
        position and the tokens read. The file is the one ``qf run --save-state`` and the server's
        ``/slots/{id}?action=save`` write; it pins the model, KV types and policy settings."""
        self._s.save_state(os.fspath(path))

    def load_state(self, path: Union[str, os.PathLike]) -> None:
        """Continues from a state saved by :meth:`save_state` (or ``qf run --save-state``): what this
        session reads next gives the same logits as in the session that saved it. The session must
        run the same model file with the same :class:`KVConfig`; a foreign, truncated or corrupt
        file raises :class:`qfilters.Error` (a ValueError) with a one-line reason and leaves the session
        unchanged."""
        self._s.load_state(os.fspath(path))

    def generate(self, prompt: Prompt, max_tokens: int = 128, temperature: float = 0.8, top_p: float = 0.95,
                 top_k: int = 40, min_p: float = 0.05, repeat_penalty: float = 1.0, repeat_last_n: int = 64,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0, seed: Optional[int] = None,
                 stop: Union[str, Sequence[str], None] = None, stream: bool = False,
                 ignore_eos: bool = False) -> Union[str, Iterator[str]]:
        """Generates from a new sequence (the session is reset first), sampling as llama.cpp's default
        chain (penalties, top-k, top-p, min-p, temperature; temperature 0 = greedy).

        Args:
            prompt: text (special tokens parsed), a conversation ``[{"role", "content"}, ...]`` (the
                model's chat template is applied), or token ids.
            seed: None or -1 = random; the same seed gives the same text.
            stop: strings that end the generation (not included in the text).
            stream: return an iterator of text pieces instead of the whole text.

        ``last_generation`` then holds the tokens, the finish reason ("stop" | "length") and the
        prompt's token count.
        """
        ids = self._prompt_ids(prompt)
        _check_int("max_tokens", max_tokens, 0)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of them")
        if seed is not None and seed != -1:
            _check_int("seed", seed, 0)
        gen = _ext.Generation(self._s, ids, max_tokens, float(temperature), int(top_k), float(top_p), float(min_p),
                              float(repeat_penalty), int(repeat_last_n), float(presence_penalty),
                              float(frequency_penalty), None if seed in (None, -1) else int(seed), bool(ignore_eos))
        pieces = self._pieces(gen, stops)
        return pieces if stream else "".join(pieces)

    def _prompt_ids(self, prompt: Prompt) -> List[int]:
        if isinstance(prompt, str):
            return self.model.tokenize(prompt)
        items = list(prompt)
        if items and all(isinstance(m, Mapping) for m in items):
            return self.model.tokenize(self.model.apply_chat_template(items))
        return _token_list(items)

    def _pieces(self, gen: Any, stops: List[str]) -> Iterator[str]:
        held = ""  # text that may be the beginning of a stop string
        reason = None
        while (piece := gen.next()) is not None:
            held += piece.decode("utf-8", errors="replace")
            cut = min((i for i in (held.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                if held[:cut]:
                    yield held[:cut]
                held, reason = "", "stop"
                break
            keep = max((_overlap(held, s) for s in stops), default=0)
            if len(held) > keep:
                yield held[: len(held) - keep]
                held = held[len(held) - keep:]
        if held:
            yield held
        self.last_generation = {"tokens": list(gen.tokens), "finish_reason": reason or gen.finish_reason,
                                "prompt_tokens": gen.prompt_tokens}


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that begins `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


def _token_list(tokens: Sequence[int]) -> List[int]:
    arr = np.asarray(tokens)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError("tokens must be a 1-d sequence of integer token ids")
    return [int(t) for t in arr]


def calibrate(model: Model, texts: Optional[Sequence[str]] = None, n_docs: Optional[int] = None,
              doc_len: Optional[int] = None, samples: int = 3000, seed: int = 0, progress: bool = True,
              orientation: str = "mean") -> Filters:
    """Computes the model's Q-Filters (as ``qf calibrate``): post-RoPE queries at `samples` random
    positions per layer, their dominant direction per head, averaged over each GQA group.

    Args:
        texts: calibration documents (each cut to doc_len tokens; defaults 20 x 2048). None: text
            sampled from the model itself (default 1 x 2048 tokens, a new seed prompt every 256).
        progress: a progress line on stderr.
        orientation: "mean" (mean projection > 0) or "majority" (the reference code's vote).
    """
    if not isinstance(model, Model):
        raise ValueError(f"model must be a qfilters.Model, got {type(model).__name__}")
    if isinstance(texts, str):
        raise ValueError("texts must be a list of documents (strings), not one string")
    if texts is not None:
        texts = [str(t) for t in texts]
        if not texts:
            raise ValueError("texts is empty (None samples text from the model)")
    for name, value in (("n_docs", n_docs), ("doc_len", doc_len)):
        if value is not None:
            _check_int(name, value, 1)
    _check_int("samples", samples, 1)
    _check_int("seed", seed, 0)
    if orientation not in ("mean", "majority"):
        raise ValueError(f"orientation must be 'mean' or 'majority', got {orientation!r}")
    return Filters(_ext.calibrate(model._m, texts, n_docs or 0, doc_len or 0, samples, seed, bool(progress), orientation))
