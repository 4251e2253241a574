"""Evaluations of KV cache policies, as ``qf eval`` runs them, returning plain dicts and lists
(``pandas.DataFrame(result["results"])`` makes a table).

Texts are given as a list of strings, a {name: text} mapping, or `data`: a directory (or list of
files and directories) of .txt files read in name order, e.g. ``data="data/sotu"``.

Ctrl-C stops an evaluation with KeyboardInterrupt at its next step (a decoding step, a prompt chunk,
a layer; at worst one needle prefill), its temporary files removed.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from . import _qfilters as _ext
from ._core import Filters, Model, PathLike, policies as _all_policies

Texts = Union[Sequence[str], Mapping[str, str], None]
Data = Union[PathLike, Sequence[PathLike], None]


def perplexity(model: Model, texts: Texts = None, data: Data = None, policies: Optional[Sequence[str]] = None,
               filters: Optional[Filters] = None, budgets: Sequence[int] = (128, 256, 512, 1024), window: int = 64,
               evict_every: int = 1, n_tokens: int = 2048, n_docs: int = 2, skip_layers: int = 0, seed: int = 0,
               progress: bool = True) -> Dict[str, Any]:
    """Streaming perplexity: each document is teacher-forced token by token through a cache of each
    budget under each policy. Returns {"results": [{budget, policy, ppl_all, ppl_after_budget,
    gap_ratio_after_budget, ...}], "curve": [...], ...}; the full cache ("none") is the reference."""
    docs = _documents(texts, data)
    pols = _policies(policies, filters)
    with tempfile.TemporaryDirectory(prefix="qfilters-eval-") as tmp:
        out = _ext.eval_perplexity(model._m, docs, pols, _filter_data(filters), [int(b) for b in budgets], window,
                                   evict_every, n_tokens, n_docs, skip_layers, seed, os.path.join(tmp, "ppl.jsonl"),
                                   progress)
    return json.loads(out)


def _ints(v: Union[int, Sequence[int]]) -> List[int]:
    return [int(v)] if isinstance(v, (int, np.integer)) else [int(x) for x in v]


def needle(model: Model, texts: Texts = None, data: Data = None, policies: Optional[Sequence[str]] = None,
           filters: Optional[Filters] = None, lengths: Sequence[int] = (1024, 2048), n_depths: int = 11,
           compressions: Sequence[int] = (4, 8, 16, 32), skip_layers: Union[int, Sequence[int]] = 2,
           digits: Union[int, Sequence[int]] = 7, needle_seed: Union[int, Sequence[int]] = 42,
           chat: Optional[bool] = None, seed: int = 0, progress: bool = True) -> Dict[str, Any]:
    """Needle in a haystack with prefill compression (kvpress protocol): the texts, joined, are the
    haystack. `skip_layers`, `digits` and `needle_seed` take one value or a list (every
    combination runs, as `qf eval niah`'s lists). Returns {"results": [{policy, compression,
    accuracy, partial, accuracy_ci, ...}], ...}."""
    docs = _documents(texts, data)
    pols = _policies(policies, filters)
    with tempfile.TemporaryDirectory(prefix="qfilters-eval-") as tmp:
        out = _ext.eval_needle(model._m, docs, pols, _filter_data(filters), [int(x) for x in lengths], n_depths,
                               [int(c) for c in compressions], _ints(skip_layers), _ints(digits), _ints(needle_seed), chat, seed,
                               os.path.join(tmp, "niah.jsonl"), progress)
    return json.loads(out)


def fidelity(model: Model, texts: Texts = None, data: Data = None, policies: Optional[Sequence[str]] = None,
             filters: Optional[Filters] = None, n_tokens: int = 2048, n_docs: int = 2, seed: int = 0,
             progress: bool = True) -> Dict[str, Any]:
    """Attention fidelity: per (layer, KV head), the Spearman correlation between each policy's key
    scores and the attention the keys receive. Returns {"results": [{policy, mean_spearman,
    median_spearman, circular, ...}], ...}."""
    docs = _documents(texts, data)
    pols = [p for p in _policies(policies, filters) if p != "none"]
    with tempfile.TemporaryDirectory(prefix="qfilters-eval-") as tmp:
        out = _ext.eval_fidelity(model._m, docs, pols, _filter_data(filters), n_tokens, n_docs, seed,
                                 os.path.join(tmp, "fidelity.jsonl"), progress)
    return json.loads(out)


def _policies(policies: Optional[Sequence[str]], filters: Optional[Filters]) -> list:
    """Every policy by default (qfilters only with filters)."""
    if isinstance(policies, str):
        policies = [policies]
    if policies is None:
        return [p for p in _all_policies() if p != "qfilters" or filters is not None]
    names = _all_policies()
    for p in policies:
        if p not in names:
            raise ValueError(f"unknown KV policy {p!r}; one of: {', '.join(names)}")
    if "qfilters" in policies and filters is None:
        raise ValueError("policy 'qfilters' needs filters")
    return list(policies)


def _filter_data(filters: Optional[Filters]) -> list:
    if filters is None:
        return []
    if not isinstance(filters, Filters):
        raise ValueError(f"filters must be a qfilters.Filters, got {type(filters).__name__}")
    return filters.to_numpy().ravel().tolist()


def _documents(texts: Texts, data: Data) -> list:
    """[(name, text)] from texts or from the .txt files under data."""
    if (texts is None) == (data is None):
        raise ValueError("give exactly one of texts= or data=")
    if texts is not None:
        if isinstance(texts, str):
            raise ValueError("texts must be a list of documents or a {name: text} mapping, not one string")
        items = list(texts.items()) if isinstance(texts, Mapping) else [(f"text{i}", t) for i, t in enumerate(texts)]
    else:
        paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        items = []
        for p in map(os.fspath, paths):
            if os.path.isdir(p):
                files = sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".txt"))
            elif os.path.isfile(p):
                files = [p]
            else:
                raise ValueError(f"{p}: no such file or directory")
            for f in files:
                with open(f, encoding="utf-8") as fh:
                    items.append((os.path.basename(f), fh.read()))
    if not items:
        raise ValueError("no documents")
    return [(str(n), str(t)) for n, t in items]
