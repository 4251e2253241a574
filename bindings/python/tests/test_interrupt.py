"""Ctrl-C stops every long computation started from Python: each runs in a child process that
gets SIGINT about a second in, and must leave with KeyboardInterrupt within a few seconds, its model
still usable (the engine's lock released) and its temporary files gone."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

CHILD = textwrap.dedent("""
    import glob, os, signal, sys
    # Ctrl-C as in a terminal, even if this process inherited SIGINT ignored (background jobs of
    # a non-interactive shell do, and Python keeps an inherited SIG_IGN).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import numpy as np
    import qfilters
    from qfilters import evaluate

    model = qfilters.Model(sys.argv[1], threads=1, n_ctx=4096)
    texts = [open(f, encoding="utf-8").read() for f in sorted(glob.glob(os.path.join(sys.argv[2], "*.txt")))[:4]]
    md = model.metadata
    filters = qfilters.Filters.from_numpy(np.ones((md["n_layers"], md["n_kv_heads"], md["head_dim"]), np.float32))
    runs = {
        # a full-cache pass over 2048 tokens, then ~2000 decoding steps per policy
        "perplexity": lambda: evaluate.perplexity(model, texts=texts, policies=["knorm", "qfilters"],
                                                  filters=filters, budgets=[128], n_tokens=2048, n_docs=1,
                                                  progress=False),
        "needle": lambda: evaluate.needle(model, texts=texts, policies=["knorm"], lengths=[512], n_depths=11,
                                          progress=False),
        "fidelity": lambda: evaluate.fidelity(model, texts=texts, policies=["knorm"], n_tokens=2048, n_docs=2,
                                              progress=False),
        "calibrate": lambda: qfilters.calibrate(model, texts=texts, n_docs=2, doc_len=2048, progress=False),
    }
    run = runs[sys.argv[3]]
    print("started", flush=True)
    try:
        run()
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        qfilters.Session(model).eval(model.tokenize("Still usable"))
        print("leftovers", sorted(os.listdir(os.environ["TMPDIR"])), flush=True)
        raise
    print("finished", flush=True)
""")


@pytest.mark.parametrize("what", ["perplexity", "needle", "fidelity", "calibrate"])
def test_ctrl_c_stops_a_long_computation(what, smollm_path, sotu_texts, tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch), PYTHONUNBUFFERED="1")
    data = smollm_path.parents[1] / "data" / "sotu"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(smollm_path), str(data), what], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "started", child.stderr.read()
        time.sleep(1.0)
        child.send_signal(signal.SIGINT)
        sent = time.monotonic()
        line = child.stdout.readline().strip()
        latency = time.monotonic() - sent
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert line == "interrupted", f"{line!r} {out!r} {err[-2000:]!r}"
    # The longest step between two checks: one 512-token needle prefill (about 0.5 s alone on 1 thread).
    assert latency < 10.0, f"KeyboardInterrupt came {latency:.1f} s after SIGINT"
    assert "leftovers []" in out, out
    assert err.rstrip().endswith("KeyboardInterrupt"), err[-2000:]
    assert child.returncode == -signal.SIGINT  # Python re-raises an uncaught Ctrl-C as the signal
