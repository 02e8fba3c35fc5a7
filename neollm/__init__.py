"""NeoLLM: a TorchTitan model spec for pretraining small research language models.

Importing the package registers the ``neollm`` TrainSpec and NeoLLM's datasets with torchtitan,
and, on a machine without CUDA, points torchtitan at the CPU. Every TOML names it in
``[experimental] custom_import`` so ``python -m torchtitan.train`` finds it too. It also points inductor's
and Triton's caches at a persistent folder (neollm/compile_cache.py) before fla is imported.
"""

from neollm.compile_cache import configure_compile_cache

configure_compile_cache()

from neollm import titan_cpu  # noqa: E402

if titan_cpu.cpu_wanted():
    titan_cpu.patch_torchtitan_for_cpu()

import neollm.data  # noqa: E402,F401  (registers datasets)
from neollm.train_spec import register  # noqa: E402

register()

__all__ = ["register"]
