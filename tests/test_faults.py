"""Fault tolerance through ./run_train.sh (torchrun, CPU): kill -9, SIGTERM, broken checkpoints,
keep-last-N, and the NaN/spike loss guard. Lean on purpose: 5 short trainer launches."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LOSS_LINE, REPO, require_prepared_assets, run_trainer

STEPS = 6
SMALL = ("--training.steps", str(STEPS), "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "2",
         "--training.seq_len", "32", "--training.global_batch_size", "2", "--training.local_batch_size", "2")


def jsonl_losses(dump: Path) -> dict[int, float]:
    """Training loss per step from metrics.jsonl (full precision; a later line for a step wins)."""
    out = {}
    for line in (dump / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss_metrics/global_avg_loss" in record:
            out[record["step"]] = record["loss_metrics/global_avg_loss"]
    return out


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def send(pid: int, sig: int) -> None:
    """SIGKILL: every process of the run at once (a crashed node). Others: torchrun's group,
    as a scheduler signals the job (torchrun forwards it to its workers)."""
    if sig == signal.SIGKILL:
        for member in reversed(process_tree(pid)):
            try:
                os.kill(member, sig)
            except ProcessLookupError:
                pass
    else:
        os.killpg(pid, sig)


def launch_and_signal(dump: Path, sig: int, at_step: int, *extra: str) -> tuple[int, str]:
    """Start ./run_train.sh in its own process group; send ``sig`` to the whole group once the
    trainer has logged ``at_step``. Returns (exit status, output)."""
    env = dict(os.environ, NGPU="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.Popen(
        ["./run_train.sh", "--job.dump_folder", str(dump), *SMALL, *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    lines, sent = [], False
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        match = re.search(r"(?<!validate )step:\s*(\d+)\s+loss", line)
        if not sent and match and int(match.group(1)) >= at_step:
            send(proc.pid, sig)
            sent = True
    proc.wait(timeout=120)
    assert sent, "".join(lines)[-3000:]
    return proc.returncode, "".join(lines)


def checkpoint_steps(dump: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (dump / "checkpoint").glob("step-*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, with torchtitan's tensorboard and wandb loggers on (wandb offline:
    no API key here), so that one launch also checks the metrics paths (tests/test_monitor.py)."""
    require_prepared_assets()
    dump = tmp_path_factory.mktemp("faults") / "reference"
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        result = run_trainer("--job.dump_folder", str(dump), *SMALL, "--metrics.enable_tensorboard",
                             "--metrics.enable_wandb", timeout=300)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert result.returncode == 0, result.stdout[-4000:]
    return dump, result.stdout


@pytest.mark.slow
def test_keep_latest_k_keeps_the_last_two(reference):
    dump, _ = reference
    assert checkpoint_steps(dump) == [4, 6]
    assert sorted(jsonl_losses(dump)) == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_metrics_tensorboard_wandb_offline_jsonl_progress_and_plots(reference):
    dump, out = reference
    assert "logging offline (WANDB_MODE=offline)" in out
    assert "wandb ran offline: upload with `wandb sync " in out
    assert f"progress: step {STEPS}/{STEPS} (100.0%)" in out and "ETA" in out
    assert list(dump.glob("tb/*/events.out.tfevents.*"))
    records = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss_metrics/global_avg_loss", "lr", "grad_norm", "throughput(tps)", "mfu(%)",
                "memory/max_reserved(GiB)"):
        assert key in records[0], key
    plots = subprocess.run([sys.executable, "tools/plot_run.py", str(dump / "tb")], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert plots.returncode == 0, plots.stderr
    for name in ("loss", "lr", "throughput"):
        assert (dump / "tb" / "plots" / f"{name}.png").is_file()


@pytest.mark.slow
def test_resuming_with_another_model_names_the_parameters(reference, tmp_path):
    """A dump folder resumed with other [model] overrides stops before loading, naming what differs."""
    dump = tmp_path / "other_model"
    shutil.copytree(reference[0], dump)
    result = run_trainer("--job.dump_folder", str(dump), *SMALL[:1], str(STEPS + 2), *SMALL[2:],
                         "--model.overrides", "mea=true", timeout=300)
    assert result.returncode != 0
    assert "holds another model than this run builds (missing from the checkpoint: ['layers.1.mixer.mea_k_bias'" \
        in result.stdout, result.stdout[-3000:]
    assert "Resume with the flavor and [model] overrides it was written with" in result.stdout


def model_only_copy(full: Path) -> None:
    """Rewrite the full checkpoint ``full`` in place as the model-only final save of
    ``[checkpoint] last_save_model_only = true`` (torchtitan's flat model keys alone)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = full.parent / "flat.pt"
    dcp_to_torch_save(str(full), str(flat))
    state = torch.load(flat, weights_only=False)
    model = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and k.split(".")[0] not in
             ("optimizer", "lr_scheduler", "dataloader", "train_state", "rng", "loss_guard")}
    assert "tok_embeddings.weight" in model and len(model) < len(state)
    shutil.rmtree(full)
    flat.unlink()
    dcp.save(model, checkpoint_id=str(full), no_dist=True)


@pytest.mark.slow
def test_a_model_only_final_checkpoint_ends_a_rerun_or_says_how_to_train_on(reference, tmp_path):
    """A run stopped after its final model-only save (before it exited) is finished: the same
    command again trains nothing and exits 0 (it crashed in DCP's load, "Missing key ... dataloader",
    when an ablation grid was rerun). More steps from it stop with what to do instead."""
    dump = tmp_path / "finished"
    shutil.copytree(reference[0], dump)
    model_only_copy(dump / "checkpoint" / f"step-{STEPS}")
    from neollm.checkpoint import holds_training_state

    assert not holds_training_state(str(dump / "checkpoint" / f"step-{STEPS}"))
    assert holds_training_state(str(dump / "checkpoint" / "step-4"))
    again = run_trainer("--job.dump_folder", str(dump), *SMALL, timeout=300)
    assert again.returncode == 0, again.stdout[-4000:]
    assert f"training finished at step {STEPS} of {STEPS}; nothing to train" in again.stdout
    assert not [s for s, _ in re.findall(r"(?<!validate )step:\s*(\d+)\s+loss", again.stdout)]

    more = run_trainer("--job.dump_folder", str(dump), *SMALL[:1], str(STEPS + 2), *SMALL[2:], timeout=300)
    assert more.returncode != 0
    assert (f"holds only the model (the final save of a {STEPS}-step run with [checkpoint] last_save_model_only "
            f"= true), so training cannot resume from it to step {STEPS + 2}") in more.stdout, more.stdout[-3000:]
    assert "--checkpoint.initial_load_path" in more.stdout and "--checkpoint.load_step 4" in more.stdout

    # a --checkpoint.load_step in a new dump folder (no checkpoint folder yet) trains from scratch, as in
    # torchtitan; it once took the missing step for a finished run's final save and trained nothing
    fresh = run_trainer("--job.dump_folder", str(tmp_path / "fresh"), *SMALL[:1], "1", *SMALL[2:],
                        "--checkpoint.load_step", str(STEPS), timeout=300)
    assert fresh.returncode == 0, fresh.stdout[-4000:]
    assert "nothing to train" not in fresh.stdout and LOSS_LINE.search(fresh.stdout), fresh.stdout[-3000:]


@pytest.mark.slow
def test_kill9_broken_checkpoints_sigterm_then_resume_bit_identical(reference, tmp_path):
    expected = jsonl_losses(reference[0])
    dump = tmp_path / "run"

    # 1. kill -9 (the whole process group) at a random step after the step-2 checkpoint
    kill_at = random.choice([3, 4])
    status, output = launch_and_signal(dump, signal.SIGKILL, kill_at)
    assert status != 0
    good = [s for s in checkpoint_steps(dump) if (dump / "checkpoint" / f"step-{s}" / ".metadata").is_file()]
    assert good and max(good) <= kill_at

    # 2. newer broken checkpoints: a truncated shard (metadata intact) and one with no .metadata
    newest = dump / "checkpoint" / f"step-{max(good)}"
    truncated = dump / "checkpoint" / "step-5"
    shutil.rmtree(truncated, ignore_errors=True)
    shutil.copytree(newest, truncated)
    shard = max(truncated.glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    unfinished = dump / "checkpoint" / "step-6"
    shutil.copytree(newest, unfinished)
    (unfinished / ".metadata").unlink()

    # 3. rerun the same command, preempt it (SIGTERM) one step after it resumes
    status, output = launch_and_signal(dump, signal.SIGTERM, max(good) + 1)
    assert f"Training starts at step {max(good) + 1}" in output, output[-3000:]
    assert "Skipping broken checkpoint" in output and "step-5: " in output and "truncated" in output
    match = re.search(r"preempted \(SIGTERM\) after step (\d+): checkpoint saved to (\S+);", output)
    assert match, output[-3000:]
    preempted = int(match.group(1))
    assert preempted < STEPS
    from neollm.checkpoint import validate_checkpoint

    assert validate_checkpoint(str(dump / "checkpoint" / f"step-{preempted}")) is None
    assert "[rank0]:Traceback" not in output  # (torchrun itself reports the signal it got)

    # 4. rerun again: resumes from the preemption checkpoint and finishes
    result = run_trainer("--job.dump_folder", str(dump), *SMALL, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]
    assert f"Training starts at step {preempted + 1}" in result.stdout

    resumed = jsonl_losses(dump)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == expected[step], f"step {step}: {resumed[step]!r} != {expected[step]!r}"


@pytest.mark.slow
def test_nan_loss_is_skipped_then_stops_naming_the_step(tmp_path, monkeypatch):
    """[guard] on_bad_loss = "skip": a NaN at step 2 drops that batch; a second bad step in a
    row is over max_consecutive_skips 1 and stops the run with one line naming step 3."""
    require_prepared_assets()
    monkeypatch.setenv("NEOLLM_INJECT_BAD_LOSS", "2:nan,3:inf")
    dump = tmp_path / "nan"
    result = run_trainer("--job.dump_folder", str(dump), *SMALL, "--guard.on_bad_loss", "skip",
                         "--guard.max_consecutive_skips", "1", timeout=300)
    assert result.returncode != 0
    assert "[guard] skipped step 2: loss is nan" in result.stdout
    errors = [line for line in result.stdout.splitlines() if "error: training stopped at step 3" in line]
    assert len(errors) == 1, result.stdout[-4000:]
    assert "loss is inf" in errors[0]
    assert checkpoint_steps(dump) == [2]  # nothing saved from the bad step on


@pytest.mark.slow
def test_nan_loss_stops_the_run_naming_the_step_without_a_later_checkpoint(tmp_path, monkeypatch):
    """[guard] on_bad_loss = "stop" (default): the verdict is read without waiting for the device,
    but the run still stops naming the bad step, and no checkpoint holds it or a later step."""
    require_prepared_assets()
    monkeypatch.setenv("NEOLLM_INJECT_BAD_LOSS", "3:nan")
    dump = tmp_path / "stop"
    result = run_trainer("--job.dump_folder", str(dump), *SMALL, timeout=300)
    assert result.returncode != 0, result.stdout[-4000:]
    errors = [line for line in result.stdout.splitlines() if "error: training stopped at step 3: loss is nan" in line]
    assert len(errors) == 1, result.stdout[-4000:]
    assert checkpoint_steps(dump) == [2]


def test_pending_checks_hand_back_verdicts_in_step_order():
    import torch

    from neollm.faults import LossGuard, PendingChecks

    guard, pending = LossGuard("stop", max_loss_ratio=2.0, window=4, warmup_steps=1), PendingChecks()
    for step, loss in enumerate([4.0, 5.0, 11.0, float("inf")], start=1):
        pending.add(step, guard.check_tensor(step, torch.tensor(loss)))
    verdicts = pending.ready()
    assert [step for step, _ in verdicts] == [1, 2, 3, 4] and pending.drain() == []
    reasons = [guard.reason(record) for _, record in verdicts]
    assert reasons[:2] == [None, None]
    assert "loss 11.0000 is over [guard] max_loss_ratio 2 x the running mean 4.5000" == reasons[2]
    assert reasons[3] == "loss is inf"
    assert guard.running_mean() == pytest.approx(4.5)  # bad losses never enter the window


def test_loss_guard_spike_over_running_mean_and_nan():
    from neollm.faults import LossGuard

    guard = LossGuard("stop", max_loss_ratio=2.0, window=4, warmup_steps=3)
    for step, loss in enumerate([10.0, 9.0, 8.0, 7.0], start=1):
        assert guard.check(step, loss) is None
    assert guard.running_mean() == pytest.approx(8.5)
    assert "max_loss_ratio 2 x the running mean 8.5000" in guard.check(5, 17.5)
    assert guard.check(6, 16.0) is None  # under 2 x mean: good, enters the window
    assert guard.check(7, float("nan")) == "loss is nan"
    state = guard.state_dict()
    other = LossGuard("stop", max_loss_ratio=2.0, window=4, warmup_steps=3)
    other.load_state_dict(state)
    assert other.running_mean() == guard.running_mean()


def test_loss_guard_injection_from_environment(monkeypatch):
    from neollm.faults import LossGuard

    monkeypatch.setenv("NEOLLM_INJECT_BAD_LOSS", "2:nan,4:x100")
    guard = LossGuard("skip", max_loss_ratio=3.0, window=8, warmup_steps=1)
    assert guard.check(1, 5.0) is None
    assert guard.check(2, 5.0) == "loss is nan"
    assert guard.check(3, 5.0) is None
    assert "over [guard] max_loss_ratio 3" in guard.check(4, 5.0)


def test_validate_checkpoint_names_what_is_wrong(tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    from neollm.checkpoint import validate_checkpoint

    good = tmp_path / "step-1"
    dcp.save({"w": torch.arange(1000.0)}, checkpoint_id=str(good))
    assert validate_checkpoint(str(good)) is None
    truncated = tmp_path / "step-2"
    shutil.copytree(good, truncated)
    shard = next(truncated.glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(10)
    assert "truncated" in validate_checkpoint(str(truncated))
    garbled = tmp_path / "step-3"
    shutil.copytree(good, garbled)
    (garbled / ".metadata").write_bytes(b"\x80garbage")
    assert "unreadable" in validate_checkpoint(str(garbled))
    (garbled / ".metadata").unlink()
    assert "no .metadata" in validate_checkpoint(str(garbled))


@pytest.mark.slow
def test_two_nodes_c10d_rendezvous_on_localhost(tmp_path):
    """run_train.sh's multi-node path: two "nodes" of one rank each meet at MASTER_ADDR:MASTER_PORT
    (c10d) and train with HSDP replicate 2 x shard 1; both see the same global loss."""
    import socket

    require_prepared_assets()
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, NGPU="1", NNODES="2", MASTER_ADDR="localhost", MASTER_PORT=str(port),
               RDZV_ID=f"test{port}", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("OMP_NUM_THREADS", None)
    dump = tmp_path / "two_nodes"
    cmd = ["./run_train.sh", "--job.dump_folder", str(dump), "--training.steps", "2",
           "--checkpoint.interval", "2", "--training.seq_len", "32", "--training.global_batch_size", "2",
           "--training.local_batch_size", "1", "--parallelism.data_parallel_replicate_degree", "2",
           "--parallelism.data_parallel_shard_degree", "1"]
    nodes = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, out in zip(nodes, outputs):
        assert node.returncode == 0, out[-3000:]
        assert "dp_replicate=2, dp_shard=1" in out
    losses = [re.findall(r"(?<!validate )step:\s*2\s+loss:\s*(\S+)", out) for out in outputs]
    assert losses[0] and losses[0] == losses[1]
    assert len(list((dump / "checkpoint" / "step-2").glob("*.distcp"))) == 2


def test_rng_state_round_trip():
    import torch

    from neollm.faults import RNGState

    state = RNGState()
    saved = {k: {n: t.clone() for n, t in v.items()} for k, v in state.state_dict().items()}
    first = torch.rand(4)
    torch.rand(100)
    state.load_state_dict(saved)
    assert torch.equal(torch.rand(4), first)
    assert state.checkpoint_prefixes == ["rank0."]


def test_a_bad_verdict_still_on_its_way_is_settled_before_a_checkpoint_is_written(monkeypatch):
    """On a GPU the guard's verdict may not have reached the host when a checkpoint is due (on
    the CPU it always has, so the trainer runs above cannot show this): polling must not see it,
    and the checkpointer's before_save hook (the trainer's settle) must raise before torchtitan
    writes anything."""
    import functools
    from types import SimpleNamespace

    import torch
    from torchtitan.components.checkpoint import CheckpointManager

    from neollm.faults import BadLossError, LossGuard, NeoLLMCheckpointManager, PendingChecks
    from neollm.train import NeoLLMTrainer

    class NotArrived:  # a CUDA event whose copy has not finished: query() False until waited for
        def query(self):
            return False

        def synchronize(self):
            pass

    guard, pending = LossGuard("stop"), PendingChecks()
    pending.queue.append((5, guard.check_tensor(5, torch.tensor(float("nan"))), NotArrived()))
    trainer = SimpleNamespace(pending_checks=pending, loss_guard=guard, step=6)
    trainer._raise_on_bad = functools.partial(NeoLLMTrainer._raise_on_bad, trainer)
    NeoLLMTrainer._poll_loss_checks(trainer)  # not arrived: polling neither waits nor raises
    assert len(pending.queue) == 1

    written = []
    monkeypatch.setattr(CheckpointManager, "save", lambda self, step, last_step=False: written.append(step))
    checkpointer = object.__new__(NeoLLMCheckpointManager)
    checkpointer._should_save = lambda step, last_step=False: True
    checkpointer.before_save = functools.partial(NeoLLMTrainer._settle_loss_checks, trainer)
    with pytest.raises(BadLossError, match=r"training stopped at step 5: loss is nan \(seen at step 6\)"):
        checkpointer.save(6)
    assert written == [] and pending.queue == []
