"""calibrate, Filters (save/load/compare/to_numpy) and the export for GPU engines (kvpress layout),
checked against qf calibrate and against an independent numpy reading of the exported file."""
import json
import subprocess

import numpy as np
import pytest

import qfilters

TEXTS = ["Four score and seven years ago our fathers brought forth on this continent a new nation. " * 8,
         "It was the best of times, it was the worst of times, it was the age of wisdom. " * 8]


def test_calibrate_matches_cli(tiny, build_dir, tmp_path):
    """qf calibrate on the same documents writes the same filters."""
    for name, text in zip(("a.txt", "b.txt"), TEXTS):
        (tmp_path / name).write_text(text)
    out = tmp_path / "cli.safetensors"
    subprocess.run([str(build_dir / "qf"), "calibrate", "-m", tiny.metadata["path"], "--text", str(tmp_path),
                    "--max-year", "0", "--docs", "2", "--doc-len", "96", "--samples", "80", "-s", "5", "-o", str(out),
                    "--no-progress"], check=True, capture_output=True)
    f = qfilters.calibrate(tiny, texts=TEXTS, n_docs=2, doc_len=96, samples=80, seed=5, progress=False)
    cli = qfilters.Filters.load(out)
    md = tiny.metadata
    assert f.shape == cli.shape == (md["n_layers"], md["n_kv_heads"], md["head_dim"])
    np.testing.assert_array_equal(f.to_numpy(), cli.to_numpy())
    assert f.compare(cli)["mean"] == pytest.approx(1.0)
    assert f.metadata["fingerprint"] == md["fingerprint"] and f.metadata["n_samples"] == "80"


def test_save_load_compare(tiny, tmp_path):
    f = qfilters.calibrate(tiny, texts=TEXTS, n_docs=2, doc_len=96, samples=80, progress=False)
    g = qfilters.calibrate(tiny, texts=TEXTS, n_docs=2, doc_len=96, samples=80, seed=1, progress=False)
    assert f.path is None
    f.save(tmp_path / "f.safetensors")
    assert f.path == str(tmp_path / "f.safetensors")
    back = qfilters.Filters.load(tmp_path / "f.safetensors")
    np.testing.assert_array_equal(back.to_numpy(), f.to_numpy())
    c = f.compare(g)
    a, b = f.to_numpy(), g.to_numpy()
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    np.testing.assert_allclose(c["per_head"], cos.ravel(), atol=1e-5)
    assert c["mean"] == pytest.approx(cos.mean(), abs=1e-5) and c["min"] == pytest.approx(cos.min(), abs=1e-5)
    h = qfilters.Filters.from_numpy(a * 2, {"note": "scaled"})
    assert h.compare(f)["mean"] == pytest.approx(1.0) and h.metadata["note"] == "scaled"
    with pytest.raises(ValueError):
        qfilters.Filters.from_numpy(np.zeros((2, 3)))
    with pytest.raises(qfilters.Error, match="nope"):
        qfilters.Filters.load(tmp_path / "nope.safetensors")


def test_sampled_calibration_is_seeded(tiny):
    a = qfilters.calibrate(tiny, n_docs=1, doc_len=64, samples=32, seed=3, progress=False)
    b = qfilters.calibrate(tiny, n_docs=1, doc_len=64, samples=32, seed=3, progress=False)
    np.testing.assert_array_equal(a.to_numpy(), b.to_numpy())
    assert a.metadata["text_source"] == "model"


def _read_safetensors(path):
    """An independent reader: header JSON and the raw little-endian F32 tensor."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    spec = header["q_filters"]
    begin, end = spec["data_offsets"]
    data = np.frombuffer(raw[8 + n + begin:8 + n + end], dtype="<f4").reshape(spec["shape"])
    return header, spec, data


def test_export_hf_layout_and_round_trip(tiny, build_dir, tmp_path):
    f = qfilters.calibrate(tiny, texts=TEXTS, n_docs=2, doc_len=96, samples=80, progress=False)
    f.export_hf(tmp_path / "hf")
    header, spec, data = _read_safetensors(tmp_path / "hf" / "model.safetensors")
    assert spec["dtype"] == "F32" and header["__metadata__"] == {"format": "pt"}
    # Published layout: rotary pairs (i, i + d/2) instead of GGUF's (2i, 2i + 1), and the reference's
    # sign (keys with the SMALLEST dot product are kept).
    g = f.to_numpy()
    want = -np.concatenate([g[..., 0::2], g[..., 1::2]], axis=-1)
    np.testing.assert_array_equal(data, want)
    md = tiny.metadata
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == {
        "num_layers": md["n_layers"], "num_kv_heads": md["n_kv_heads"], "kv_head_dim": md["head_dim"]}
    # Export then import gives the same filters (Python and qf filters import).
    back = qfilters.Filters.load(tmp_path / "hf" / "model.safetensors", layout="hf", sign="keep_smallest_dot")
    np.testing.assert_array_equal(back.to_numpy(), g)
    qf = str(build_dir / "qf")
    subprocess.run([qf, "filters", "import", str(tmp_path / "hf" / "model.safetensors"), "-o", str(tmp_path / "i.st"),
                    "-m", md["path"], "--layout", "hf", "--sign", "keep_smallest_dot"], check=True, capture_output=True)
    np.testing.assert_array_equal(qfilters.Filters.load(tmp_path / "i.st").to_numpy(), g)
    # qf filters export writes the same files.
    f.save(tmp_path / "f.safetensors")
    subprocess.run([qf, "filters", "export", str(tmp_path / "f.safetensors"), str(tmp_path / "cli"), "--layout", "hf"],
                   check=True, capture_output=True)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()
    # A foreign file is refused without its layout and sign, and qf filters export takes only ours.
    with pytest.raises(qfilters.Error):
        qfilters.Filters.load(tmp_path / "hf" / "model.safetensors")
    r = subprocess.run([qf, "filters", "export", str(tmp_path / "hf" / "model.safetensors"), str(tmp_path / "x"),
                        "--layout", "hf"], capture_output=True, text=True)
    assert r.returncode != 0 and "not a qfilters file" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_filters_object_drives_a_session(tiny):
    f = qfilters.calibrate(tiny, texts=TEXTS, n_docs=2, doc_len=96, samples=80, progress=False)
    s = qfilters.Session(tiny, kv=qfilters.KVConfig(filters=f, budget=32, window=8))
    s.eval(list(range(3, 103)))
    st = s.kv_stats()
    assert st["policy"] == "qfilters" and st["evicted"] > 0


def test_evaluate(tiny, sotu_texts):
    f = qfilters.calibrate(tiny, texts=TEXTS, n_docs=2, doc_len=96, samples=80, progress=False)
    ppl = qfilters.evaluate.perplexity(tiny, texts=sotu_texts, policies=["qfilters", "knorm", "streaming"],
                                       filters=f, budgets=[32], window=8, n_tokens=128, n_docs=1, progress=False)
    rows = {(r["budget"], r["policy"]): r for r in ppl["results"]}
    assert set(rows) == {(32, "none"), (32, "qfilters"), (32, "knorm"), (32, "streaming")}
    assert all(r["ppl_all"] > 1 for r in rows.values())
    fid = qfilters.evaluate.fidelity(tiny, texts=sotu_texts, policies=["qfilters", "knorm"], filters=f,
                                     n_tokens=128, n_docs=1, progress=False)
    assert {r["policy"] for r in fid["results"]} == {"qfilters", "knorm"}

    with pytest.raises(ValueError, match="exactly one"):
        qfilters.evaluate.perplexity(tiny, progress=False)
    with pytest.raises(ValueError, match="needs filters"):
        qfilters.evaluate.perplexity(tiny, texts=sotu_texts, policies=["qfilters"], progress=False)


def test_needle(smollm, sotu_texts):
    """The fixtures' context is too short for a haystack: SmolLM2, one short cell per policy."""
    r = qfilters.evaluate.needle(smollm, texts=sotu_texts, policies=["knorm", "streaming"], lengths=[400],
                                 n_depths=2, compressions=[2], skip_layers=[0], digits=7, progress=False)
    cells = {(x["policy"], x["compression"]) for x in r["results"]}
    assert {("knorm", 2), ("streaming", 2)} <= cells
    assert all(0 <= x["accuracy"] <= x["partial"] <= 1 for x in r["results"])
    assert all(x["digits"] == 7 and x["skip_layers"] == 0 for x in r["results"] if x["policy"] != "none")


def test_qfilters_prefill_keeps_the_numpy_and_kvpress_token_sets(fixtures_dir, tiny, tmp_path):
    """With --kv-ratio semantics, each head keeps the keys a float64 numpy forward pass ranks highest
    by <k, f>; kvpress's QFilterPress score on the exported file (-<k_hf, f_hf> over keys in Hugging
    Face row order) is the same number, so kvpress keeps the same sets."""
    import reference
    path = fixtures_dir / "llama_f32_gqa_tied.gguf"
    tokens = [int(t) for t in np.random.default_rng(2).integers(3, 300, 100)]
    qk = reference.queries_keys(reference.load(str(path)), tokens)
    f = qfilters.calibrate(tiny, texts=TEXTS, n_docs=2, doc_len=96, samples=80, progress=False)
    f.export_hf(tmp_path / "hf")
    _, _, published = _read_safetensors(tmp_path / "hf" / "model.safetensors")
    s = qfilters.Session(tiny, kv=qfilters.KVConfig(filters=f, ratio=0.5))
    s.prefill(tokens)
    held = s.kv_positions()
    g = f.to_numpy()
    agree = []
    for layer, (_, k) in enumerate(qk):
        for h in range(k.shape[1]):
            k_gguf = k[:, h, :]
            k_hf = np.concatenate([k_gguf[:, 0::2], k_gguf[:, 1::2]], axis=-1)
            ours, kvpress = k_gguf @ g[layer, h], -(k_hf @ published[layer, h])
            np.testing.assert_allclose(kvpress, ours, rtol=1e-5, atol=1e-5 * np.abs(ours).max())
            want = set(np.argsort(-kvpress, kind="stable")[:50].tolist())
            assert len(held[layer][h]) == 50
            agree.append(len(want & set(held[layer][h])) / 50)
    print(f"qfilters vs numpy/kvpress kept sets: mean {np.mean(agree):.4f}, min {np.min(agree):.4f}")
    assert np.mean(agree) >= 0.99, agree
