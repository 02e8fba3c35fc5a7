"""Workaround for fla issue #640: fla 0.6.0's GDN backward refuses to run on Hopper with Triton [3.4, 3.7.1).

What fla 0.6.0 does (read from the installed package):
* ``fla/ops/common/chunk_o.py::chunk_bwd_dqkwg`` (lines 727-732) raises ``RuntimeError`` when
  ``g is not None and IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1``; the three flags are
  module globals of ``chunk_o`` imported from ``fla.utils`` (``IS_NVIDIA_HOPPER``: device 0 named "NVIDIA H*" or
  capability 9.x, ``fla/utils/hardware.py:99``; ``TRITON_ABOVE_*``: ``fla/utils/env.py:105,108``).
* The tiling is chosen right after (lines 741-751): ``CONST_TILING = 128`` if ``check_shared_mem('hopper')``,
  ``128/64`` on Ampere, ``64`` on Ada, else ``32``; then ``BK = min(max(next_pow2(K), 16), CONST_TILING)`` and the
  same for ``BV``. On an H100 with K=64 that gives BK=64, the tiling that Triton miscompiles; BK=32 is correct.
  ``check_shared_mem`` is also a ``chunk_o`` module global (from ``fla/utils/hardware.py:176``).
* ``fla/ops/gated_delta_rule/chunk.py`` imports ``chunk_bwd_dqkwg`` by name (line 15) and calls it once per
  backward from ``chunk_gated_delta_rule_bwd`` (line 217); ``chunk_bwd_dqkwg`` is wrapped by
  ``@dispatch('common')``, whose default path calls the plain function, which reads the ``chunk_o`` globals at
  call time.

* ``fla/ops/simple_gla/chunk.py`` imports it the same way (line 11) and calls it from its backward (line 108)
  with ``g`` set when the decay is per token (our Mamba2 mixer; RetNet passes ``g_gamma`` and ``g=None``).

The fix: replace the name ``chunk_bwd_dqkwg`` in ``fla.ops.gated_delta_rule.chunk`` and ``fla.ops.simple_gla.chunk``
(so only those two, not delta_rule/comba, are affected) with a wrapper that, for the duration of that one call, sets
``chunk_o.IS_NVIDIA_HOPPER = False`` (skips the guard) and ``chunk_o.check_shared_mem`` to a function returning
False (CONST_TILING = 32, so BK = BV = 32 for K, V >= 32), then restores both. Not thread-safe by design (the
trainer runs one backward at a time per process). A GPU test (tests/gpu/test_gdn_gpu.py) compares the patched
kernel's gradients with the fp32 reference.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable

_MARK = "_neollm_hopper_bk32"
_PATCHED_MODULES = ("fla.ops.gated_delta_rule.chunk", "fla.ops.simple_gla.chunk")
_installed = False


def _hopper_present() -> bool:
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        return any(torch.cuda.get_device_capability(i)[0] == 9 for i in range(torch.cuda.device_count()))
    except Exception:  # no driver, broken CUDA init: nothing to work around
        return False


def _triton_in_broken_range() -> bool:
    try:
        import triton
        from packaging import version
    except Exception:
        return False
    v = version.parse(triton.__version__)  # same comparison fla uses (fla/utils/env.py)
    return version.parse("3.4.0") <= v < version.parse("3.7.1")


def _no_large_shared_mem(arch: str = "none", tensor_idx: int = 0) -> bool:
    return False


def _wrap(original: Callable[..., Any], chunk_o: Any) -> Callable[..., Any]:
    @functools.wraps(original)
    def chunk_bwd_dqkwg_bk32(*args: Any, **kwargs: Any) -> Any:
        saved_hopper, saved_check = chunk_o.IS_NVIDIA_HOPPER, chunk_o.check_shared_mem
        chunk_o.IS_NVIDIA_HOPPER = False
        chunk_o.check_shared_mem = _no_large_shared_mem
        try:
            return original(*args, **kwargs)
        finally:
            chunk_o.IS_NVIDIA_HOPPER = saved_hopper
            chunk_o.check_shared_mem = saved_check

    setattr(chunk_bwd_dqkwg_bk32, _MARK, True)
    return chunk_bwd_dqkwg_bk32


def install_fla_hopper_workaround() -> bool:
    """Make fla's GDN and simple-GLA backward use BK=32 and skip the #640 guard, only on Hopper with Triton in [3.4, 3.7.1).

    Returns True when the workaround is (or already was) installed, False when it is not needed (no CUDA
    device of capability 9.x, or a Triton outside the broken range) -- then nothing is imported or changed.
    Idempotent. Safe to call on CPU-only machines.
    """
    global _installed
    if _installed:
        return True
    if not (_hopper_present() and _triton_in_broken_range()):
        return False
    chunk_o = importlib.import_module("fla.ops.common.chunk_o")
    patched = [importlib.import_module(m) for m in _PATCHED_MODULES]

    for name in ("IS_NVIDIA_HOPPER", "check_shared_mem"):
        if not hasattr(chunk_o, name):
            raise RuntimeError(
                f"fla.ops.common.chunk_o has no {name!r}: this fla is not 0.6.0; re-read chunk_bwd_dqkwg and "
                "update neollm/kernels/fla_compat.py"
            )
    for module in patched:
        current = module.chunk_bwd_dqkwg
        if not getattr(current, _MARK, False):
            module.chunk_bwd_dqkwg = _wrap(current, chunk_o)
    _installed = True
    return True
