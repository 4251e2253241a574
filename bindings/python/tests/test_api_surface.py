"""The package's public surface: the extension's type stubs (_qfilters.pyi) name exactly what the
extension exports, every public object of `qfilters` is documented and annotated, and the README's
Python example runs as written (made short: fewer calibration tokens, fewer generated tokens)."""
import ast
import inspect
import re
from pathlib import Path

import pytest

import qfilters
from qfilters import _qfilters

ROOT = Path(__file__).resolve().parents[3]
STUB = Path(qfilters.__file__).with_name("_qfilters.pyi")


def _public(names):
    return {n for n in names if not n.startswith("_")}


def _stub_tree():
    return ast.parse(STUB.read_text(encoding="utf-8"))


def test_stubs_name_every_extension_object():
    tree = _stub_tree()
    stub_top = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    runtime_top = _public(n for n in dir(_qfilters) if callable(getattr(_qfilters, n)))
    assert stub_top == runtime_top, (f"missing from the stubs: {sorted(runtime_top - stub_top)}, "
                                     f"not in the module: {sorted(stub_top - runtime_top)}")
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name != "Error"):
        stub_members = _public(m.name for m in cls.body if isinstance(m, ast.FunctionDef))
        runtime_members = _public(vars(getattr(_qfilters, cls.name)))
        assert stub_members == runtime_members, (cls.name, sorted(runtime_members ^ stub_members))


def test_stub_signatures_match_the_extension():
    """Parameter names of every stubbed function and method are the extension's (nanobind signatures)."""
    def params(sig_text):  # "def f(a: int, b: str = 'x') -> ..." -> ["a", "b"]
        inner = sig_text[sig_text.index("(") + 1: sig_text.rindex(")")]
        return re.findall(r"(?:^|,\s*)\*{0,2}([A-Za-z_]\w*)\s*(?=[:,=]|$)", _strip_brackets(inner))

    def stub_params(fn):
        a = fn.args
        return [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]

    checked = 0
    for node in _stub_tree().body:
        targets = [(node, getattr(_qfilters, node.name))] if isinstance(node, ast.FunctionDef) else []
        if isinstance(node, ast.ClassDef) and node.name != "Error":
            cls = getattr(_qfilters, node.name)
            targets += [(m, getattr(cls, m.name)) for m in node.body
                        if isinstance(m, ast.FunctionDef) and not any(_is_property(d) for d in m.decorator_list)]
        for fn, obj in targets:
            sigs = getattr(obj, "__nb_signature__", None)
            if not sigs:
                continue
            runtime = [params(s[0]) for s in sigs]
            assert stub_params(fn) in runtime, (fn.name, stub_params(fn), runtime)
            checked += 1
    assert checked >= 20


def _strip_brackets(text):
    """Removes [...] and nested (...) so commas inside types and defaults do not split parameters."""
    out, depth = [], 0
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def _is_property(decorator):
    return isinstance(decorator, ast.Name) and decorator.id == "property"


def test_public_api_is_documented_and_annotated():
    for name in qfilters.__all__:
        obj = getattr(qfilters, name)
        assert inspect.getdoc(obj), f"qfilters.{name} has no docstring"
    fns = [qfilters.calibrate, qfilters.policies, qfilters.simd_target,
           qfilters.evaluate.perplexity, qfilters.evaluate.needle, qfilters.evaluate.fidelity]
    for cls in (qfilters.Model, qfilters.Session, qfilters.Filters, qfilters.KVConfig):
        fns += [m for n, m in vars(cls).items() if not n.startswith("_") and inspect.isfunction(m)]
        fns += [m.__func__ for n, m in vars(cls).items() if isinstance(m, classmethod)]
    for fn in fns:
        sig = inspect.signature(fn)
        assert sig.return_annotation is not inspect.Signature.empty, f"{fn.__qualname__}: no return annotation"
        for p in sig.parameters.values():
            if p.name not in ("self", "cls"):
                assert p.annotation is not inspect.Parameter.empty, f"{fn.__qualname__}({p.name}): no annotation"
    assert Path(qfilters.__file__).with_name("py.typed").exists()


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(smollm_path, monkeypatch, capsys):
    """The README's example, with calibration and generation cut short (the full run takes minutes)."""
    code = _readme_example()
    assert "qf.calibrate(model)" in code and "generate(" in code and "kv_stats()" in code
    calibrate, generate = qfilters.calibrate, qfilters.Session.generate
    monkeypatch.setattr(qfilters, "calibrate", lambda model: calibrate(model, n_docs=1, doc_len=128, samples=64,
                                                                       progress=False))
    monkeypatch.setattr(qfilters.Session, "generate",
                        lambda self, prompt, max_tokens, **kw: generate(self, prompt, max_tokens=min(max_tokens, 8), **kw))
    code = code.replace('"models/SmolLM2-135M-Instruct.Q4_1.gguf"', repr(str(smollm_path)))
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    used, _, full = lines[-1].partition(" bytes of KV in use vs ")
    assert int(used) > 0 and int(full.split()[0]) >= int(used), lines
