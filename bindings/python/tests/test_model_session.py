"""Model and Session: logits against the C++ engine's tool and the numpy reference, generation,
every KV policy, bad arguments, memory over a long generation, Ctrl-C."""
import json
import math
import os
import signal
import subprocess
import threading

import numpy as np
import pytest

import qfilters

PROMPT = "<|im_start|>user\nWhat are the three primary colors?<|im_end|>\n<|im_start|>assistant\n"


def test_metadata_and_tokenizer(smollm):
    md = smollm.metadata
    assert (md["architecture"], md["n_layers"], md["n_heads"], md["n_kv_heads"], md["head_dim"]) == ("llama", 30, 9, 3, 64)
    assert md["fingerprint"] == "llama:L30:H9:KV3:D64:E576:V49152"
    ids = smollm.tokenize("Hello world, héllo!", add_special=False)
    assert smollm.detokenize(ids) == "Hello world, héllo!"
    chat = smollm.tokenize(PROMPT)
    assert chat[0] == smollm.tokenize("<|im_start|>", add_special=False)[0]  # special tokens parsed
    assert len(smollm.tokenize(PROMPT, special=False)) > len(chat)
    text = smollm.apply_chat_template([{"role": "user", "content": "Hi!"}])
    assert "<|im_start|>user\nHi!<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


# Exact comparisons use an f32 KV cache (the default is f16, as llama.cpp's and the CLI's).
F32_CACHE = qfilters.KVConfig(policy="none", cache_type_k="f32", cache_type_v="f32")


def test_eval_equals_engine_tool(smollm, build_dir):
    """Session.eval's logits are the C++ engine's, bit for bit (tests/tools/dump_logits, 1 thread,
    f32 KV cache as the tool uses)."""
    tool = build_dir / "dump_logits"
    if not tool.exists():
        pytest.skip("build/dump_logits missing (cmake --build build --target dump_logits)")
    tokens = smollm.tokenize(PROMPT)
    out = subprocess.run([str(tool), smollm.metadata["path"], ",".join(map(str, tokens))], check=True,
                         capture_output=True, text=True).stdout
    want = np.array(json.loads(out), dtype=np.float32)
    s = qfilters.Session(smollm, kv=F32_CACHE, n_ctx=256)
    got = s.eval(tokens, all_logits=True)
    assert got.shape == (len(tokens), smollm.n_vocab) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    s.reset()
    np.testing.assert_array_equal(s.eval(tokens), want[-1])
    # The same sequence fed in pieces gives the same last logits.
    s.reset()
    s.eval(tokens[:5])
    s.eval(tokens[5:11])
    np.testing.assert_allclose(s.eval(tokens[11:]), want[-1], rtol=0, atol=1e-4 * np.abs(want[-1]).max())


def test_eval_against_numpy_reference(fixtures_dir):
    """An independent float64 numpy forward pass (tests/python/reference.py) on a float32 fixture."""
    import reference
    path = fixtures_dir / "llama_f32_gqa_tied.gguf"
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, 300, 40)]
    want = reference.forward(reference.load(str(path)), tokens)
    got = qfilters.Session(qfilters.Model(path, threads=1), kv=F32_CACHE).eval(tokens, all_logits=True)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_generate_reproducible_and_streaming(smollm):
    s = qfilters.Session(smollm, n_ctx=512)
    a = s.generate(PROMPT, max_tokens=24, seed=7)
    tokens_a = s.last_generation["tokens"]
    b = s.generate(PROMPT, max_tokens=24, seed=7)
    assert a == b and s.last_generation["tokens"] == tokens_a and len(a) > 0
    pieces = list(s.generate(PROMPT, max_tokens=24, seed=7, stream=True))
    assert "".join(pieces) == a and len(pieces) > 1
    c = s.generate([{"role": "user", "content": "What are the three primary colors?"}], max_tokens=24, seed=7)
    assert isinstance(c, str)
    others = {s.generate(PROMPT, max_tokens=24, seed=k, temperature=1.5) for k in range(3)}
    assert len(others) > 1  # the seed matters


def test_greedy_generation_is_argmax(smollm):
    s = qfilters.Session(smollm, n_ctx=512)
    text = s.generate(PROMPT, max_tokens=12, temperature=0, ignore_eos=True)
    got = s.last_generation["tokens"]
    ref = qfilters.Session(smollm, n_ctx=512)
    logits = ref.prefill(smollm.tokenize(PROMPT))
    want = []
    for _ in range(12):
        want.append(int(np.argmax(logits)))
        logits = ref.eval([want[-1]])
    assert got == want and text == smollm.detokenize(want)


def test_stop_strings(smollm):
    s = qfilters.Session(smollm, n_ctx=512)
    full = s.generate(PROMPT, max_tokens=32, temperature=0, ignore_eos=True)
    stop = full[10:14]
    cut = s.generate(PROMPT, max_tokens=32, temperature=0, ignore_eos=True, stop=[stop, "zzzz-never"])
    assert cut == full[: full.find(stop)] and s.last_generation["finish_reason"] == "stop"
    streamed = "".join(s.generate(PROMPT, max_tokens=32, temperature=0, ignore_eos=True, stop=stop, stream=True))
    assert streamed == cut


def _filters_for(model):
    return qfilters.calibrate(model, texts=["The quick brown fox jumps over the lazy dog. " * 40], n_docs=1,
                              doc_len=128, samples=64, progress=False)


def test_policies_are_listed_once():
    names = qfilters.policies()
    assert names[0] == "none" and len(names) == len(set(names))
    assert {"qfilters", "tova", "h2o", "expected_attention", "keydiff"} <= set(names)


def test_layer_and_query_statistics_policies_are_accepted(tiny):
    # The engine's other names: "+layer" variants and the policies that need query statistics.
    for name in ("tova+layer", "qfilters_max", "ea_calibrated+layer", "qfilters_adaptive"):
        assert qfilters.KVConfig(policy=name).policy == name
    for name in ("bogus", "none+layer", "tova+layer+layer", "+layer"):
        with pytest.raises(ValueError, match="unknown KV policy"):
            qfilters.KVConfig(policy=name)
    s = qfilters.Session(tiny, kv=qfilters.KVConfig(policy="tova+layer", budget=32, window=8))
    for t in range(3, 63):
        s.eval([t])
    assert s.kv_stats()["policy"] == "tova+layer" and s.kv_stats()["evicted"] > 0
    # Without query statistics in a filter file, the engine's one-line error.
    with pytest.raises(ValueError, match="stats-rank"):
        qfilters.Session(tiny, kv=qfilters.KVConfig(policy="qfilters_max", budget=32, window=8))


def test_query_statistics_settings_reach_the_engine(tiny):
    # expected_attention moves its query statistics future_positions ahead: another horizon keeps
    # other tokens; the defaults are the engine's (--future-positions 512).
    tokens = [int(t) for t in np.random.default_rng(5).integers(3, 300, 120)]

    def kept(**settings):
        s = qfilters.Session(tiny, kv=qfilters.KVConfig(policy="expected_attention", budget=32, window=8, **settings))
        for t in tokens:
            s.eval([t])
        return s.kv_positions()

    assert kept() == kept(future_positions=512)
    assert kept(future_positions=1) != kept()
    for bad in ({"future_positions": 0}, {"filter_horizon": 0}, {"filter_blend": 1.5}, {"filter_blend": "1"},
                {"filter_decay": -1.0}, {"filter_decay": math.nan}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            qfilters.KVConfig(policy="qfilters_max", **bad)
    assert qfilters.KVConfig(policy="qfilters_max", filter_decay=math.inf).filter_decay == math.inf


@pytest.mark.parametrize("policy", qfilters.policies())
def test_every_policy(tiny, policy):
    tokens = [int(t) for t in np.random.default_rng(1).integers(3, 300, 120)]
    if policy == "none":
        kv = qfilters.KVConfig(policy="none")
    else:
        kv = qfilters.KVConfig(policy=policy, filters=_filters_for(tiny) if policy == "qfilters" else None,
                               budget=32, window=8)
    s = qfilters.Session(tiny, kv=kv)
    for t in tokens:
        logits = s.eval([t])
    assert np.isfinite(logits).all()
    st = s.kv_stats()
    assert st["policy"] == policy and st["n_past"] == len(tokens)
    if policy == "none":
        assert st["evicted"] == 0 and st["bytes_used"] == st["full_cache_bytes"]
    else:  # at most 32 of the 120 tokens per head
        assert st["evicted"] > 0 and st["bytes_used"] * len(tokens) <= st["full_cache_bytes"] * 32
    # Prefill compression: a prompt of T tokens keeps int(T * (1 - ratio)) per head.
    if policy != "none":
        kv = qfilters.KVConfig(policy=policy, filters=kv.filters, ratio=0.5)
        s = qfilters.Session(tiny, kv=kv)
        s.prefill(tokens[:100])
        st = s.kv_stats()
        assert st["bytes_used"] * 100 == st["full_cache_bytes"] * 50


def test_bad_arguments(tiny, smollm_path, tmp_path):
    with pytest.raises(ValueError, match="unknown KV policy"):
        qfilters.KVConfig(policy="lru")
    with pytest.raises(ValueError, match="needs filters"):
        qfilters.KVConfig(policy="qfilters")
    with pytest.raises(ValueError, match="budget must be >= 0"):
        qfilters.KVConfig(policy="knorm", budget=-1)
    with pytest.raises(ValueError, match="window"):
        qfilters.KVConfig(policy="knorm", budget=32, window=32)
    with pytest.raises(ValueError, match="ratio"):
        qfilters.KVConfig(policy="knorm", ratio=1.5)
    with pytest.raises(ValueError, match="evict_every"):
        qfilters.KVConfig(policy="knorm", budget=64, evict_every=0)
    with pytest.raises(ValueError, match="needs budget"):
        qfilters.KVConfig(policy="knorm", budget=0)
    with pytest.raises(ValueError, match="full cache"):
        qfilters.KVConfig(policy="none", budget=64)
    with pytest.raises(ValueError, match="does not exist"):
        qfilters.KVConfig(policy="qfilters", filters=tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="integer"):
        qfilters.KVConfig(policy="knorm", budget=32.5)
    # Engine errors: qfilters.Error (a ValueError) with the CLI's one-line message.
    with pytest.raises(qfilters.Error, match="nope.gguf"):
        qfilters.Model(tmp_path / "nope.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(qfilters.Error):
        qfilters.Model(tmp_path / "junk.gguf")
    s = qfilters.Session(tiny)
    with pytest.raises(qfilters.Error, match="outside the vocabulary"):
        s.eval([5, 300])
    with pytest.raises(qfilters.Error, match="at least one token"):
        s.eval([])
    with pytest.raises(ValueError, match="integer token ids"):
        s.eval([1.5])
    with pytest.raises(qfilters.Error, match="exceeds the context"):
        s.eval(list(range(3, 260)))
    with pytest.raises(ValueError, match="max_tokens"):
        s.generate("hi", max_tokens=-1)
    with pytest.raises(qfilters.Error, match="top-p must be > 0"):  # the CLI's message
        s.generate("hi", max_tokens=4, top_p=0.0)
    with pytest.raises(qfilters.Error, match="min-p"):
        s.generate("hi", max_tokens=4, min_p=1.5)
    with pytest.raises(ValueError, match="stop"):
        s.generate("hi", stop=[""])
    with pytest.raises(qfilters.Error, match="filter"):  # filters of another model
        other = qfilters.Model(smollm_path)
        qfilters.Session(tiny, kv=qfilters.KVConfig(filters=_filters_for(other), budget=32, window=8))
    with pytest.raises(ValueError, match="KVConfig"):
        qfilters.Session(tiny, kv={"policy": "knorm"})


def test_cache_types_are_passed_or_refused(tiny):
    kv = qfilters.KVConfig(policy="knorm", budget=32, window=8, cache_type_k="q8_0", cache_type_v="q8_0")
    try:
        s = qfilters.Session(tiny, kv=kv)
    except qfilters.Error as e:
        assert "cache_type" in str(e) or "q8_0" in str(e)
    else:
        s.eval([5, 6, 7])


def _rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_memory_flat_over_long_generation(smollm):
    """A bounded cache driven from Python: resident memory and KV bytes stay flat."""
    kv = qfilters.KVConfig(policy="knorm", budget=64, window=16)
    s = qfilters.Session(smollm, kv=kv, n_ctx=4096)
    rss, kv_bytes = [], []
    for i, _ in enumerate(s.generate("Once upon a time", max_tokens=640, seed=3, ignore_eos=True, stream=True)):
        if i % 128 == 127:
            rss.append(_rss_mib())
            kv_bytes.append(s.kv_stats()["bytes_used"])
    assert s.last_generation["finish_reason"] == "length" and len(s.last_generation["tokens"]) == 640
    assert len(set(kv_bytes)) == 1, kv_bytes  # 64 tokens per head from the 128th token on
    assert rss[-1] - rss[0] < 4.0, rss  # MiB, 128 vs 640 tokens; a full f32 cache would touch ~24 MiB more


@pytest.fixture
def ctrl_c():
    """SIGINT raises KeyboardInterrupt in this test even when the runner inherited SIGINT ignored
    (a background job of a non-interactive shell starts with SIG_IGN, which Python then keeps)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_ctrl_c_interrupts_generation(smollm, ctrl_c):
    s = qfilters.Session(smollm, n_ctx=4096)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            s.generate("Once upon a time", max_tokens=4000, ignore_eos=True, seed=1)
    finally:
        timer.cancel()
    assert 0 < s.n_past < 4000
    assert len(s.generate("Hello", max_tokens=4, seed=1)) >= 0  # still usable


def test_ctrl_c_interrupts_calibration(smollm, ctrl_c):
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            qfilters.calibrate(smollm, n_docs=1, doc_len=2048, progress=False)
    finally:
        timer.cancel()


def test_gil_released_during_compute(smollm):
    """Another Python thread runs while a session computes."""
    s = qfilters.Session(smollm, n_ctx=2048)
    ticks = []
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(1)
            stop.wait(0.001)

    t = threading.Thread(target=tick)
    t.start()
    s.eval(smollm.tokenize("word " * 600))
    stop.set()
    t.join()
    assert len(ticks) > 5
