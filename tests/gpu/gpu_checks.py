"""What every GPU test file shares: its markers and the error metric.

``GPU_ONLY`` marks a module's tests ``gpu`` and skips them without a CUDA device (the CPU CI);
``rel_err`` is the relative RMS error over the whole tensor, ||a - b|| / ||b|| in float64, so a
broken kernel's O(1) error cannot pass while TF32 / bf16 rounding can.

Importing this module also fixes fla's Triton kernels to one launch configuration each. fla
decorates its kernels with Triton autotuners over up to dozens of configurations and benchmarks
every one per new key (shape, dtype) on first use: tests/gpu, which calls many kernels in three
dtypes, spent its time autotuning (test_mixers_rnn_gpu.py did not finish in a GPU job). These
tests check values, not speed, so every Triton ``Autotuner`` keeps only its first configuration
(fla lists the smallest tiles, fewest warps and stages first): autotuners made from now on
(``Autotuner.__init__`` wrapped; fla's ``fla_cache_autotune`` builds a subclass) and those of fla
modules already imported. Inductor's kernels use their own tuner and are untouched.
``NEOLLM_GPU_AUTOTUNE=1`` keeps full autotuning. (Not a conftest.py: a second module named
conftest would shadow tests/conftest.py for the test files that import it.)
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

GPU_ONLY = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FULL_AUTOTUNE = os.environ.get("NEOLLM_GPU_AUTOTUNE", "0") == "1"


def _first_config(configs) -> list:
    return list(configs)[:1]


def keep_first_configs() -> None:
    from triton.runtime.autotuner import Autotuner

    if not getattr(Autotuner.__init__, "_neollm_first_config", False):
        real_init = Autotuner.__init__

        def init(self, fn, arg_names, configs, *args, **kwargs):
            # no pruning: it could drop the one configuration left (6th positional: prune_configs_by)
            if len(args) > 5:
                args = (*args[:5], None, *args[6:])
            else:
                kwargs["prune_configs_by"] = None
            real_init(self, fn, arg_names, _first_config(configs), *args, **kwargs)

        init._neollm_first_config = True
        Autotuner.__init__ = init
    for name, module in list(sys.modules.items()):
        if name == "fla" or name.startswith("fla."):
            for obj in list(vars(module).values()):
                if isinstance(obj, Autotuner) and len(obj.configs) > 1:
                    obj.configs = _first_config(obj.configs)
                    obj.early_config_prune = None


if not FULL_AUTOTUNE:
    keep_first_configs()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
