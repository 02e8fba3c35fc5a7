"""Let torchtitan 0.2.2's trainer run on a machine without a GPU.

torchtitan picks its device at import time (``device_type = ... or "cuda"``) and several of its
modules copy that value, so on a GPU-less machine the trainer dies in ``set_device``. There is no
config key for the device, and ``Trainer.__init__`` imports ``experimental.custom_import`` before
it reads the device, so importing ``neollm`` rebinds torchtitan to the CPU here. Gloo (the CPU
backend) also lacks ``PREMUL_SUM``, which FSDP2 uses once the gradient divide factor is 1.0 (as
torchtitan sets it); :func:`force_sum_reduction` makes FSDP2 reduce with plain sums instead, which
gives the same result because the trainer already divides the loss by the global token count.

Set ``NEOLLM_FORCE_CPU=1`` to train on the CPU even where CUDA is available.
"""

from __future__ import annotations

import os
import resource
import types

import torch
import torch.nn as nn

FORCE_CPU_ENV = "NEOLLM_FORCE_CPU"


def cpu_wanted() -> bool:
    """True when training should run on the CPU (no CUDA, or forced by the environment)."""
    return os.environ.get(FORCE_CPU_ENV, "0") == "1" or not torch.cuda.is_available()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_device_module() -> types.ModuleType:
    """A stand-in for ``torch.cuda`` with the calls torchtitan makes, answered for the CPU.

    Memory figures are the process's peak resident set size: the closest CPU analogue of the
    CUDA allocator's peak that torchtitan logs.
    """
    module = types.ModuleType("neollm_cpu_device")
    for name in dir(torch.cpu):
        if not name.startswith("__"):
            setattr(module, name, getattr(torch.cpu, name))
    total_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    module.set_device = lambda *args, **kwargs: None
    module.current_device = lambda: 0
    module.device_count = lambda: 1
    module.is_available = lambda: True
    module.get_device_name = lambda *args, **kwargs: "cpu"
    module.get_device_properties = lambda *args, **kwargs: types.SimpleNamespace(
        name="cpu", total_memory=total_memory
    )
    module.reset_peak_memory_stats = lambda *args, **kwargs: None
    module.empty_cache = lambda *args, **kwargs: None
    module.memory_stats = lambda *args, **kwargs: {
        "active_bytes.all.peak": _peak_rss_bytes(),
        "reserved_bytes.all.peak": _peak_rss_bytes(),
        "num_alloc_retries": 0,
        "num_ooms": 0,
    }
    return module


_patched = False


def patch_torchtitan_for_cpu() -> None:
    """Rebind every torchtitan module-level copy of the device to the CPU (idempotent)."""
    global _patched
    if _patched:
        return
    import torchtitan.components.metrics as tt_metrics
    import torchtitan.distributed.parallel_dims as tt_parallel_dims
    import torchtitan.distributed.utils as tt_dist_utils
    import torchtitan.tools.profiling as tt_profiling
    import torchtitan.tools.utils as tt_utils

    device_module = _cpu_device_module()
    for module in (tt_utils, tt_metrics, tt_dist_utils, tt_parallel_dims, tt_profiling):
        if hasattr(module, "device_type"):
            module.device_type = "cpu"
        if hasattr(module, "device_module"):
            module.device_module = device_module
    # DeviceMemoryMonitor's default argument was bound to "cuda:0" at import.
    tt_metrics.DeviceMemoryMonitor.__init__.__defaults__ = ("cpu",)
    tt_profiling.torch = _torch_with_cpu_profiler()
    _patched = True


class _Delegate(types.ModuleType):
    """A module that answers every attribute it lacks from ``target``."""

    def __init__(self, target: types.ModuleType) -> None:
        super().__init__(target.__name__)
        self._target = target

    def __getattr__(self, name: str):
        return getattr(self._target, name)


def _torch_with_cpu_profiler() -> types.ModuleType:
    """``torch`` as torchtitan's [profiling] sees it on the CPU: it asks for [CPU, the GPU's activity],
    the second None without a GPU, which torch.profiler refuses; this profiler drops the None."""
    profiler = _Delegate(torch.profiler)

    def profile(*args, activities=None, **kwargs):
        return torch.profiler.profile(*args, activities=[a for a in activities or () if a is not None], **kwargs)

    profiler.profile = profile
    shim = _Delegate(torch)
    shim.profiler = profiler
    return shim


def force_sum_reduction(model: nn.Module) -> None:
    """Make every FSDP2 unit reduce gradients with SUM (gloo has no PREMUL_SUM)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
