"""tests/gpu/gpu_checks.py leaves each fla kernel one launch configuration (runs on CPU too: it only
inspects the decorated kernels)."""

from __future__ import annotations

import pytest

import gpu_checks  # its import fixes the configurations


def test_fla_kernels_keep_one_config():
    if gpu_checks.FULL_AUTOTUNE:
        pytest.skip("NEOLLM_GPU_AUTOTUNE=1: full autotuning asked for")
    from triton.runtime.autotuner import Autotuner

    import fla.ops.gated_delta_rule.chunk  # noqa: F401  (the kernels the GPU tests call)
    import fla.ops.rwkv6.chunk  # noqa: F401
    import sys

    tuned = [obj for name, module in list(sys.modules.items()) if name.startswith("fla.ops")
             for obj in vars(module).values() if isinstance(obj, Autotuner)]
    assert len(tuned) > 10
    assert all(len(kernel.configs) == 1 for kernel in tuned), [
        (kernel.base_fn.__name__, len(kernel.configs)) for kernel in tuned if len(kernel.configs) != 1]
