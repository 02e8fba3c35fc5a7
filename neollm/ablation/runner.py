"""Run each variant through ./run_train.sh (the real trainer), one dump folder per variant.

Layout under ``--out``::

    <variant>/variant.json   what the variant changes and its exact run_train.sh arguments
    <variant>/train.log      the trainer's output (appended across resumes)
    <variant>/metrics.jsonl  written by the trainer (neollm/monitor.py)
    <variant>/checkpoint/    torchtitan checkpoints (a partly run variant resumes from the last)
    <variant>/model_args.json  the variant's NeoLLMModelArgs (for convert_to_hf/evaluate --flavor)
    <variant>/result.json    the marker of a finished variant, with its parsed results (written
                             atomically when the run ends: a job killed mid-grid loses only the
                             runs in flight)

Resume rules: a variant with result.json is skipped (if it was run with other arguments, that is
an error, not a silent reuse); without it, the same command is run again, and torchtitan resumes
from the variant's last checkpoint; with no checkpoint, leftovers of the interrupted attempt
(metrics.jsonl) are removed first, so the variant restarts cleanly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from neollm.ablation.grid import Variant
from neollm.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
MARKER = "result.json"


class RunFailed(RuntimeError):
    """A variant's trainer exited with an error (the message names the variant and its log)."""


def variant_group(run: dict) -> str:
    """The variant a stored run belongs to (seed repeats share it)."""
    return run["variant"].get("group") or run["variant"]["name"]


def has_checkpoint(dump: Path, folder: str = "checkpoint") -> bool:
    return any((d / ".metadata").is_file() for d in (dump / folder).glob("step-*"))


def finished(dump: Path, argv: list[str]) -> dict | None:
    """The stored result of a finished variant run with ``argv``; None if not finished."""
    marker = dump / MARKER
    if not marker.is_file():
        return None
    result = json.loads(marker.read_text())
    if result.get("argv") != argv:
        raise ConfigError(
            f"{dump} holds a finished run with other arguments ({' '.join(result.get('argv', []))}); "
            f"now: {' '.join(argv)}. Use another --out, or delete {dump} to run it again")
    return result


def _error_lines(log: Path, limit: int = 5) -> str:
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    errors = [line for line in lines if "error: " in line or "Error" in line]
    return "\n".join((errors or lines)[-limit:])


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half a file)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def run_variant(variant: Variant, dump: Path, argv: list[str], ngpu: int, checkpoint_folder: str,
                summarize, extra: dict | None = None, env: dict | None = None,
                keep_checkpoints: bool = True) -> tuple[dict, bool]:
    """Run (or skip, or resume) one variant; returns (result, ran_now). ``extra`` is read when the
    run ends (the scheduler may update it while the run is in flight)."""
    done = finished(dump, argv)
    if done is not None:
        return done, False
    dump.mkdir(parents=True, exist_ok=True)
    resuming = has_checkpoint(dump, checkpoint_folder)
    if not resuming:
        for stale in ("metrics.jsonl",):
            (dump / stale).unlink(missing_ok=True)
    (dump / "variant.json").write_text(json.dumps({**asdict(variant), "argv": argv}, indent=2, default=str))
    env = dict(os.environ, NGPU=str(ngpu), NEOLLM_SKIP_PREFLIGHT="1",
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", **(env or {}))
    log = dump / "train.log"
    start = time.time()
    with open(log, "a") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {'resume' if resuming else 'start'}: "
                  f"./run_train.sh {' '.join(argv)}\n")
        out.flush()
        rc = subprocess.run(["./run_train.sh", *argv], cwd=REPO, env=env, stdout=out,
                            stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RunFailed(f"variant {variant.name} failed (exit {rc}); see {log}:\n{_error_lines(log)}")
    extra = dict(extra or {})
    waited = float(extra.get("waited_s", 0.0))  # ready early, behind its gate (neollm/handover.py)
    result = {**summarize(dump), **extra, "argv": argv, "variant": asdict(variant),
              "processes": ngpu, "wall_s": time.time() - start - waited, "resumed": resuming,
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_atomic(dump / MARKER, json.dumps(result, indent=2, default=str))
    if not keep_checkpoints:  # the result is the curve; checkpoints would fill the disk over a grid
        shutil.rmtree(dump / checkpoint_folder, ignore_errors=True)
    return result, True

