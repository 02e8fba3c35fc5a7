"""Handing one GPU from a finishing run to the next (tools/ablate.py's ``--prestart``).

A run spends ~12 s starting (torchrun, imports) and ~12 s ending (teardown, exit) with its GPU idle
(one H100, 2026-12-06: of a 74 s ablation run, 37 s trained). The scheduler therefore starts the next run
early with ``NEOLLM_START_GATE=PATH:PID``: the trainer imports everything, then waits for PATH to
exist before it touches the GPU (``wait_for_gate``), and gives up if process PID (the scheduler) is
gone. A run started with ``NEOLLM_RELEASE_FILE=PATH`` writes PATH once it has trained, validated and
saved its last checkpoint (``release``): the scheduler may then open the next run's gate while this
one tears down. Neither variable set: nothing waits, nothing is written.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

START_GATE = "NEOLLM_START_GATE"
ABORT = "abort"
RELEASE_FILE = "NEOLLM_RELEASE_FILE"


class GateAbandoned(RuntimeError):
    """The process that was to open this run's gate ended first."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def wait_for_gate(environ=os.environ, poll_s: float = 0.2) -> float:
    """Block until the gate named by ``NEOLLM_START_GATE`` opens; the seconds waited (0 without one)."""
    spec = environ.get(START_GATE)
    if not spec:
        return 0.0
    path, _, pid = spec.rpartition(":")
    if not path or not pid.isdigit():
        raise ValueError(f"{START_GATE}={spec!r}: expected PATH:PID")
    gate, owner = Path(path), int(pid)
    start = time.monotonic()
    while not gate.exists():
        if not _alive(owner):
            raise GateAbandoned(f"{START_GATE}: process {owner}, which was to open {gate}, has ended")
        time.sleep(poll_s)
    if gate.read_text().strip() == ABORT:
        raise GateAbandoned(f"{START_GATE}: {gate} was closed for good (the grid stopped: a failed run or "
                            "its time budget); rerun the grid to train this variant")
    waited = time.monotonic() - start
    if environ.get("RANK", "0") == "0":
        print(f"[handover] waited {waited:.1f} s for the GPU", file=sys.stderr, flush=True)
    return waited


def release(environ=os.environ) -> None:
    """Write ``NEOLLM_RELEASE_FILE`` (rank 0): this run no longer needs its GPU time."""
    path = environ.get(RELEASE_FILE)
    if path and environ.get("RANK", "0") == "0":
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).touch()
        except OSError as error:  # the run itself has finished: only the hand-over waits for its exit
            print(f"[handover] could not write {path}: {error}", file=sys.stderr, flush=True)


def open_gate(path: Path, abort: bool = False) -> None:
    """Let the run waiting at ``path`` go on: to train, or (``abort``) to exit without touching the GPU."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(ABORT if abort else "open")
    tmp.replace(path)  # whole, so the waiting run never reads half of it
