"""Every technique kernel at once in a whole (shrunk) neollm_135m, forward and backward, under the CPU
interpreter (tests/model_kernels_interpreted.py, in a subprocess): the kernels compose."""

from __future__ import annotations

import importlib

from conftest import run_interpreted


def test_neollm_135m_with_every_kernel_matches_the_references():
    """LUCID, PolyNorm GLU, q/k path and attention epilogue kernels all on: the loss and every
    parameter gradient within 3x the fp32 references' own error against fp64 (each kernel ran)."""
    importlib.import_module("triton")  # required: a broken install fails here, not skips
    run_interpreted("model_kernels_interpreted.py", timeout=600)
