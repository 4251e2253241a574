"""Session.save_state / load_state: a restored session continues with the logits of the one that
saved (bit for bit), on every policy; foreign or damaged files raise qfilters.Error and change
nothing; the file is the one `qf run --save-state` writes."""
import subprocess

import numpy as np
import pytest

import qfilters

POLICIES = [p for p in qfilters.policies() if p not in ("none", "qfilters")]


def _continue(session, question, steps=6):
    """Reads `question`, then decodes greedily: every step's logits."""
    out = []
    logits = session.eval(question)
    for _ in range(steps):
        out.append(logits.copy())
        logits = session.eval([int(np.argmax(logits))])
    return out


def _doc(n, vocab, seed=1):
    return [(seed * 7919 + i * 104729 + 13) % vocab for i in range(n)]


@pytest.mark.parametrize("policy", ["none"] + POLICIES)
def test_round_trip_is_bit_identical(tiny, tmp_path, policy):
    kv = (qfilters.KVConfig.full() if policy == "none"
          else qfilters.KVConfig(policy=policy, budget=24, window=4, evict_every=3, seed=5, cache_type_k="q8_0"))
    original = qfilters.Session(tiny, kv=kv, n_ctx=192)
    doc = _doc(80, tiny.n_vocab)
    original.prefill(doc)
    path = tmp_path / "doc.qfstate"
    original.save_state(path)

    restored = qfilters.Session(tiny, kv=kv, n_ctx=192)
    restored.load_state(path)
    assert restored.n_past == original.n_past == 80
    assert restored.tokens == doc
    assert restored.kv_stats()["bytes_used"] == original.kv_stats()["bytes_used"]
    question = _doc(9, tiny.n_vocab, seed=2)
    for a, b in zip(_continue(original, question), _continue(restored, question)):
        np.testing.assert_array_equal(a, b)


def test_ask_many_from_one_state(tiny, tmp_path):
    """One saved document, several questions: each equals reading document + question at once."""
    kv = qfilters.KVConfig(policy="knorm", budget=32, window=4)
    doc = _doc(100, tiny.n_vocab)
    s = qfilters.Session(tiny, kv=kv, n_ctx=192)
    s.prefill(doc)
    s.save_state(tmp_path / "doc.qfstate")
    for seed in (3, 4, 5):
        question = _doc(7, tiny.n_vocab, seed=seed)
        fresh = qfilters.Session(tiny, kv=kv, n_ctx=192)
        fresh.prefill(doc)
        want = fresh.eval(question)
        s.load_state(tmp_path / "doc.qfstate")
        np.testing.assert_array_equal(s.eval(question), want)
        assert s.tokens == doc + question


def test_bad_files_raise_and_change_nothing(tiny, tmp_path):
    kv = qfilters.KVConfig(policy="knorm", budget=24, window=4)
    s = qfilters.Session(tiny, kv=kv, n_ctx=192)
    s.prefill(_doc(50, tiny.n_vocab))
    good = tmp_path / "good.qfstate"
    s.save_state(good)
    data = good.read_bytes()

    cases = {
        "truncated": (data[: len(data) // 2], "truncated"),
        "corrupt": (data[:100] + bytes([data[100] ^ 1]) + data[101:], "checksum mismatch"),
        "foreign": (b"GGUF" + bytes(60), "not a qfilters state file"),
    }
    victim = qfilters.Session(tiny, kv=kv, n_ctx=192)
    victim.prefill(_doc(30, tiny.n_vocab, seed=7))
    before = victim.kv_positions()
    for name, (content, message) in cases.items():
        p = tmp_path / f"{name}.qfstate"
        p.write_bytes(content)
        with pytest.raises(qfilters.Error, match=message):
            victim.load_state(p)
        assert victim.n_past == 30 and victim.kv_positions() == before
    other = qfilters.Session(tiny, kv=qfilters.KVConfig(policy="knorm", budget=32, window=4), n_ctx=192)
    with pytest.raises(qfilters.Error, match="budget 24"):
        other.load_state(good)
    with pytest.raises(qfilters.Error, match="no such state file"):
        victim.load_state(tmp_path / "missing.qfstate")
    with pytest.raises(qfilters.Error, match="KV types"):  # saved with the default, f16
        qfilters.Session(tiny, kv=qfilters.KVConfig(policy="knorm", budget=24, window=4, cache_type_k="f32"),
                         n_ctx=192).load_state(good)


def test_layer_weights_are_saved_and_pinned(tiny, tmp_path):
    """Per-layer budgets: the caches follow the weights at the same total, a saved state continues
    bit for bit under the same weights and is refused under uniform budgets."""
    kv = qfilters.KVConfig(policy="tova", budget=24, window=4, layer_weights=[3, 1, 2])
    assert kv.layer_weights == (3.0, 1.0, 2.0)
    original = qfilters.Session(tiny, kv=kv, n_ctx=192)
    uniform = qfilters.Session(tiny, kv=qfilters.KVConfig(policy="tova", budget=24, window=4), n_ctx=192)
    doc = _doc(80, tiny.n_vocab)
    original.prefill(doc)
    uniform.prefill(doc)
    assert original.kv_stats()["bytes_reserved"] == uniform.kv_stats()["bytes_reserved"]
    held = [len(layer[0]) for layer in original.kv_positions()]
    assert held == [36, 12, 24], held  # 24 x 3 / mean(3, 1, 2), 24 x 1 / 2, 24 x 2 / 2
    original.save_state(tmp_path / "w.qfstate")
    restored = qfilters.Session(tiny, kv=kv, n_ctx=192)
    restored.load_state(tmp_path / "w.qfstate")
    question = _doc(9, tiny.n_vocab, seed=2)
    for a, b in zip(_continue(original, question), _continue(restored, question)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(qfilters.Error, match="saved with per-layer budget weights 3,1,2; this session uses uniform"):
        uniform.load_state(tmp_path / "w.qfstate")
    with pytest.raises(qfilters.Error, match="2 weights for a model of 3 layers"):
        qfilters.Session(tiny, kv=qfilters.KVConfig(policy="tova", budget=24, window=4, layer_weights=[1, 2]))
    for bad in ([], [1, 0, 1], [1, float("nan"), 1], "1,2,3", [True, 1, 1]):
        with pytest.raises(ValueError, match="layer_weights"):
            qfilters.KVConfig(policy="tova", budget=24, window=4, layer_weights=bad)
    with pytest.raises(ValueError, match="needs filters"):
        qfilters.KVConfig(policy="tova", budget=24, window=4, layer_weights="spread")
    with pytest.raises(ValueError, match="layer_weights"):
        qfilters.KVConfig(policy="none", layer_weights=[1, 1, 1])


def test_generate_then_save(tiny, tmp_path):
    """generate() records its tokens: the saved history is the prompt and what was fed back."""
    s = qfilters.Session(tiny, kv=qfilters.KVConfig.full(), n_ctx=192)
    prompt = _doc(12, tiny.n_vocab)
    s.generate(prompt, max_tokens=5, temperature=0, ignore_eos=True)
    assert s.tokens[:12] == prompt and len(s.tokens) == s.n_past
    s.save_state(tmp_path / "g.qfstate")
    r = qfilters.Session(tiny, kv=qfilters.KVConfig.full(), n_ctx=192)
    r.load_state(tmp_path / "g.qfstate")
    assert r.tokens == s.tokens


def test_cli_state_file_loads_in_python(smollm, build_dir, tmp_path):
    """qf run --save-state writes the file Session.load_state reads (same model, same KV options)."""
    state = tmp_path / "cli.qfstate"
    prompt = "The capital of France is Paris. The capital of Italy is"
    subprocess.run([str(build_dir / "qf"), "run", "-m", smollm.metadata["path"], "-p", prompt, "-n", "0", "-t", "1",
                    "-c", "256", "--kv-policy", "knorm", "--kv-budget", "16", "--kv-window", "4",
                    "--save-state", str(state), "--no-display-prompt"], check=True, capture_output=True)
    kv = qfilters.KVConfig(policy="knorm", budget=16, window=4, cache_type_k="f16", cache_type_v="f16")
    s = qfilters.Session(smollm, kv=kv, n_ctx=256)
    s.load_state(state)
    assert s.tokens == smollm.tokenize(prompt)
    fresh = qfilters.Session(smollm, kv=kv, n_ctx=256)
    fresh.prefill(s.tokens)
    question = smollm.tokenize(" Rome.", add_special=False)
    np.testing.assert_array_equal(s.eval(question), fresh.eval(question))
