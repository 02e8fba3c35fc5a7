"""Run tests/gpu and record the run: benchmarks/gpu_tests_<date>.xml (pytest's junit XML) and a
.json beside it with the device, date, commit, versions and the pass/fail/skip counts.

    python tools/run_gpu_tests.py                 # on the GPU machine; exit status is pytest's
    python tools/run_gpu_tests.py -- -k rwkv6     # extra pytest arguments after --

BENCHMARKS.md cites such a record (the .json's commit) beside any new GPU numbers. On a machine
without CUDA the run is refused: every test would skip and the record would prove nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from neollm.provenance import REPO, device_name, git_commit


def counts(junit: Path) -> dict[str, int]:
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for name in ("triton", "fla", "torchao", "torchtitan"):
        try:
            out[name] = getattr(__import__(name), "__version__", "?")
        except ImportError as error:
            out[name] = f"not importable: {error}"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks", help="folder for the .xml and .json")
    p.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments")
    opts = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("no CUDA device: tests/gpu would only skip; run this on the GPU machine")
    started = datetime.datetime.now(datetime.timezone.utc)
    stem = opts.out / f"gpu_tests_{started:%Y-%m-%d_%H%M}"
    opts.out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pytest", "-q", "tests/gpu", f"--junitxml={stem}.xml", *opts.pytest_args]
    commit = git_commit()
    code = subprocess.call(command, cwd=REPO)
    record = {
        "date": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1),
        "device": device_name(),
        "commit": commit,
        "command": " ".join(command[1:]),
        "exit_status": code,
        "versions": versions(),
        **(counts(Path(f"{stem}.xml")) if Path(f"{stem}.xml").is_file() else {}),
    }
    Path(f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"recorded {stem}.xml and {stem}.json: {record.get('tests')} tests, {record.get('failures')} "
          f"failures, {record.get('errors')} errors, {record.get('skipped')} skipped on {record['device']}")
    return code


if __name__ == "__main__":
    sys.exit(main())
