"""Where a measurement came from: the git commit of the code, the device it ran on and the
``NEOLLM_*`` switches set in the environment.

Benchmark and ablation reports name their commit and device; tools/bench_trainer.py's also records the
``NEOLLM_*`` switches (the kernels' implementations), which change its numbers.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """HEAD's hash, marked when tracked files have uncommitted changes; "unknown" outside git.

    ``NEOLLM_COMMIT`` overrides it, for a copy of the tree whose ``.git`` is not the code's (a
    remote GPU machine that receives the working tree beside an older ``.git``)."""
    if os.environ.get("NEOLLM_COMMIT"):
        return os.environ["NEOLLM_COMMIT"]
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except OSError:
            return ""

    commit = git("rev-parse", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    return commit


def neollm_environment() -> dict[str, str]:
    """The ``NEOLLM_*`` variables set for this run but the commit (kernel switches such as
    ``NEOLLM_LUCID_IMPL``): a report that names them can be told apart from one with the defaults."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("NEOLLM_") and k != "NEOLLM_COMMIT"}


def device_name() -> str:
    """The first CUDA device's name, else the CPU and its core count."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def tool_command(tool: str, argv: list[str] | None = None) -> str:
    """The command line a report names: ``python tools/<tool> ARGS`` with ``argv`` (default: this process's)."""
    return " ".join([f"python tools/{tool}", *(sys.argv[1:] if argv is None else argv)])


def record() -> dict[str, object]:
    """The fields every benchmark JSON names: device, UTC date, commit and the ``NEOLLM_*`` switches."""
    return {"device": device_name(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "environment": neollm_environment()}
