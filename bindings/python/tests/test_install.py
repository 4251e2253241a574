"""`pip install .` from the repository into a fresh virtual environment gives an importable package
that runs a model. Slow (creates a venv, installs numpy and the build backend from PyPI): runs when
QF_TEST_INSTALL=1 (scripts/test.sh sets it)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.skipif(os.environ.get("QF_TEST_INSTALL") != "1", reason="slow; set QF_TEST_INSTALL=1")
def test_pip_install_in_fresh_venv(tmp_path, fixtures_dir):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing but the venv
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(ROOT)], check=True, timeout=1800, env=env)
    code = ("import qfilters, numpy; m = qfilters.Model(%r, threads=1); s = qfilters.Session(m); "
            "l = s.eval([1, 2, 3]); assert l.shape == (m.n_vocab,) and numpy.isfinite(l).all(); "
            "print(qfilters.__file__)") % str(fixtures_dir / "llama_f32_gqa_tied.gguf")
    out = subprocess.run([str(py), "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env=env).stdout
    assert str(venv) in out  # the installed package, not the source tree
