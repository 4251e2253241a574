"""Shared fixtures: the repository's build directory (qf, tests/tools), the tiny GGUF fixtures of
tests/python/make_fixtures.py, and SmolLM2 from models/ (tests needing it are skipped without it)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests" / "python"))


@pytest.fixture(scope="session")
def build_dir() -> Path:
    d = Path(os.environ.get("QF_BUILD_DIR", ROOT / "build"))
    if not (d / "qf").exists():
        pytest.skip(f"no qf binary in {d} (build the repository first, or set QF_BUILD_DIR)")
    return d


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    d = ROOT / "tests" / "fixtures"
    if not (d / "llama_f32_gqa_tied.gguf").exists():
        subprocess.run([sys.executable, str(ROOT / "tests" / "python" / "make_fixtures.py"), "--out", str(d)], check=True)
    return d


@pytest.fixture(scope="session")
def tiny(fixtures_dir):
    """A float32 GQA model (3 layers, 4 heads, 2 KV heads, context 256)."""
    import qfilters
    return qfilters.Model(fixtures_dir / "llama_f32_gqa_tied.gguf", threads=1)


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    p = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not p.exists():
        pytest.skip("models/SmolLM2-135M-Instruct.Q4_1.gguf missing (scripts/fetch_model.sh)")
    return p


@pytest.fixture(scope="session")
def smollm(smollm_path):
    import qfilters
    return qfilters.Model(smollm_path, threads=1, n_ctx=4096)


@pytest.fixture(scope="session")
def sotu_texts():
    d = ROOT / "data" / "sotu"
    if not d.is_dir():
        pytest.skip("data/sotu missing (scripts/fetch_text.sh)")
    files = sorted(f for f in d.iterdir() if f.suffix == ".txt")
    return [f.read_text(encoding="utf-8") for f in files[:4]]
