"""qfilters: CPU LLM inference with a per-head, Q-Filters-compressed KV cache.

    import qfilters as qf
    model = qf.Model("models/SmolLM2-135M-Instruct.Q4_1.gguf")
    filters = qf.calibrate(model)                         # about a minute on a laptop CPU
    s = qf.Session(model, kv=qf.KVConfig(filters=filters, budget=256, window=32))
    print(s.generate("The capital of France is", max_tokens=32, seed=1))
    print(s.kv_stats()["bytes_used"])

Engine errors are raised as :class:`qfilters.Error` (a ``ValueError``) with the one-line message
the ``qf`` command line prints. Compute runs with the GIL released; Ctrl-C (KeyboardInterrupt)
stops a generation between tokens, a calibration between chunks and an evaluation at its next step.
"""
from ._core import Error, Filters, KVConfig, Model, Session, calibrate, policies, simd_target
from . import evaluate

__version__ = "0.1.0"
__all__ = ["Error", "Filters", "KVConfig", "Model", "Session", "calibrate", "evaluate", "policies", "simd_target"]
