"""Persistent compile and autotune caches, so only a machine's first run pays for compiling and autotuning.

Why: a compiled flavor's first step is torch.compile (dynamo, AOTAutograd, inductor's C++/Triton codegen) plus
fla's Triton autotuning, minutes for the hybrid. Inductor and Triton can keep all of it on disk; this points
them at one folder that survives the run (and can be copied to another machine of the same kind):

* ``TORCHINDUCTOR_CACHE_DIR``  = <root>/inductor: inductor's FX-graph cache and AOTAutograd's cache (both on by
  default in torch >= 2.6), and the Triton kernels inductor generates;
* ``TRITON_CACHE_DIR``         = <root>/triton: compiled Triton binaries, fla's included;
* ``TRITON_CACHE_AUTOTUNING``  = 1: every ``triton.autotune`` (fla's kernels) stores its timings there and
  reuses them, not only the kernels fla declares with ``cache_results`` (fla's ``FLA_CACHE_RESULTS``, on by
  default). Read when a kernel is decorated, i.e. when fla's modules are imported: set before that.

The root is ``$NEOLLM_COMPILE_CACHE``, else ``$XDG_CACHE_HOME/neollm/compile`` (``~/.cache/neollm/compile``);
``./run_train.sh`` and ``tools/bench.py`` default it to the repository's ``.cache/compile``. ``off`` disables
all of this. A variable the user already set wins. Entries are keyed by torch/Triton version, device,
shapes and code, so a stale entry is never used, only a missing one recompiled.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["compile_cache_env", "configure_compile_cache", "default_cache_root", "describe_compile_cache"]

_OFF = ("", "0", "off", "none")


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "neollm" / "compile"


def compile_cache_env(root: Path) -> dict[str, str]:
    """The variables that put inductor's and Triton's caches (and Triton's autotune results) under root."""
    return {
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
        "TRITON_CACHE_DIR": str(root / "triton"),
        "TRITON_CACHE_AUTOTUNING": "1",
    }


def configure_compile_cache() -> Path | None:
    """Set the cache variables (where unset) from ``$NEOLLM_COMPILE_CACHE``; return the root, None when off."""
    setting = os.environ.get("NEOLLM_COMPILE_CACHE")
    if setting is not None and setting.strip().lower() in _OFF:
        return None
    root = Path(setting).expanduser().resolve() if setting else default_cache_root()
    for key, value in compile_cache_env(root).items():
        os.environ.setdefault(key, value)
    return root


def describe_compile_cache() -> str:
    """One line for logs: where inductor's and Triton's caches are and how many files they hold (0: a cold
    start, whose first step compiles and autotunes everything)."""
    dirs = [os.environ.get(key) for key in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")]
    if not all(dirs):
        return "torch's and Triton's default locations (NEOLLM_COMPILE_CACHE=off or unset variables)"
    counts = [sum(len(files) for _, _, files in os.walk(d)) if os.path.isdir(d) else 0 for d in dirs]
    return f"inductor {dirs[0]} ({counts[0]} files), triton {dirs[1]} ({counts[1]} files)"
