"""NeoLLM: a TorchTitan model spec for pretraining small research language models.

Importing the package registers the ``neollm`` TrainSpec and NeoLLM's datasets with torchtitan,
and, on a machine without CUDA, points torchtitan at the CPU. Every TOML names it in
``[experimental] custom_import`` so ``python -m torchtitan.train`` finds it too.
"""

from neollm import titan_cpu

if titan_cpu.cpu_wanted():
    titan_cpu.patch_torchtitan_for_cpu()

import neollm.data  # noqa: E402,F401  (registers datasets)
from neollm.train_spec import register  # noqa: E402

register()

__all__ = ["register"]
