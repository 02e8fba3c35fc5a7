"""Run monitoring: JSONL metrics, technique scalars, progress/ETA, wandb offline, plot_run."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest

from conftest import REPO


def test_technique_scalars_read_gpas_polynorm_and_gates():
    import torch

    from neollm.model.args import FLAVORS
    from neollm.model.model import NeoLLM
    from neollm.monitor import technique_scalars

    args = dataclasses.replace(FLAVORS["debug"], vocab_size=256, n_layers=2, gpas=True,
                               mlp_type="polynorm", gated_residual=True)
    model = NeoLLM(args)
    model.init_weights()
    with torch.no_grad():
        model.layers["0"].gpas.gate.fill_(1.0)
    scalars = technique_scalars(model)
    kinds = {key.split("/")[1] for key in scalars}
    assert {"gpas_silu_gate", "polynorm_w1", "polynorm_w3", "residual_gate_sigmoid_mean"} <= kinds
    gpas = [v for k, v in scalars.items() if k.startswith("techniques/gpas_silu_gate/")]
    assert len(gpas) == 2 and all(math.isfinite(v) for v in gpas)
    gates = [v for k, v in scalars.items() if "residual_gate" in k]
    assert all(v == pytest.approx(0.5) for v in gates)  # gates start at 0: sigmoid 0.5
    # every value sits under its own key (they are read back from one tensor)
    from neollm.model.norms import GPAS, PolyNorm

    polys = [(n, m) for n, m in model.named_modules() if isinstance(m, PolyNorm)]
    assert polys
    for name, poly in polys:
        with torch.no_grad():
            poly.weight.copy_(torch.arange(1.0, poly.weight.numel() + 1) / 7)
    scalars = technique_scalars(model)
    for name, poly in polys:
        for i, w in enumerate(poly.weight.tolist()):
            assert scalars[f"techniques/polynorm_w{i + 1}/{name}"] == pytest.approx(w)
    for name, gpas in model.named_modules():
        if isinstance(gpas, GPAS):
            expected = torch.nn.functional.silu(gpas.gate.detach().float()).mean().item()
            assert scalars[f"techniques/gpas_silu_gate/{name}"] == pytest.approx(expected)


def test_output_gate_probe_hooks_one_step_only():
    import torch

    from neollm.model.args import FLAVORS
    from neollm.model.model import NeoLLM
    from neollm.monitor import OutputGateProbe

    args = dataclasses.replace(FLAVORS["debug"], vocab_size=256, n_layers=2, layer_pattern="A",
                               attention_output_gate="headwise")
    model = NeoLLM(args)
    model.init_weights()
    probe = OutputGateProbe(model)
    model(torch.randint(0, 256, (2, 16)))
    gates = probe.close()
    assert len(gates) == 2 and all(0 < v < 1 for v in gates.values())
    assert all(k.startswith("techniques/attn_output_gate_mean/layers.") for k in gates)
    model(torch.randint(0, 256, (2, 16)))  # hooks removed: nothing more recorded
    assert all(len(v) == 1 for v in probe.sums.values())


def test_run_logger_writes_full_precision_jsonl(tmp_path):
    from torchtitan.components.metrics import BaseLogger

    from neollm.monitor import RunLogger

    seen = []

    class Inner(BaseLogger):
        def log(self, metrics, step):
            seen.append((step, dict(metrics)))

    run_logger = RunLogger(Inner(), str(tmp_path / "metrics.jsonl"))
    run_logger.log({"loss_metrics/global_avg_loss": 1 / 3, "grad_norm": float("nan")}, 7)
    run_logger.close()
    assert seen[0][0] == 7
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["step"] == 7 and record["loss_metrics/global_avg_loss"] == 1 / 3
    assert record["grad_norm"] == "nan"


def test_progress_line_has_eta(monkeypatch):
    from neollm import monitor

    clock = iter([100.0, 130.0])
    monkeypatch.setattr(monitor.time, "perf_counter", lambda: next(clock))
    progress = monitor.Progress(total_steps=100)
    progress.start(10)  # resumed at step 10
    line = progress.line(40)  # 30 steps in 30 s: 60 left -> 60 s
    assert line == "progress: step 40/100 (40.0%)  elapsed 0:00:30  ETA 0:01:00  1.00 s/step"


def test_wandb_goes_offline_without_a_key(monkeypatch, tmp_path):
    from neollm import monitor

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert monitor.prepare_wandb(True) == "offline"
    import os

    assert os.environ["WANDB_MODE"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert monitor.prepare_wandb(True) == "disabled"  # the user's choice stays
    assert monitor.prepare_wandb(False) is None


def test_plot_run_from_tensorboard_events_and_jsonl(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    tb = tmp_path / "run" / "tb" / "x"
    writer = SummaryWriter(str(tb))
    for step in range(1, 6):
        writer.add_scalar("loss_metrics/global_avg_loss", 10 - step, step)
        writer.add_scalar("lr", 1e-3 * step, step)
        writer.add_scalar("throughput(tps)", 1000 + step, step)
    writer.close()
    result = subprocess.run([sys.executable, "tools/plot_run.py", str(tmp_path / "run")], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in ("loss", "lr", "throughput"):
        assert (tmp_path / "run" / "plots" / f"{name}.png").stat().st_size > 1000

    from neollm.plot import load  # what tools/plot_run.py reads a run with

    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text('{"step": 1, "loss_metrics/global_avg_loss": 5.0}\n{"step": 1, "loss_metrics/global_avg_loss": 4.0}\n'
                     '{"step": 2, "loss_metrics/global_avg_loss": "nan", "lr": 0.1}\n{"step": 3, "loss')
    series = load(jsonl)
    assert series["loss_metrics/global_avg_loss"][1] == 4.0  # a resumed run's later line wins
    assert math.isnan(series["loss_metrics/global_avg_loss"][2])

# The trainer's tensorboard / wandb-offline / JSONL / progress / plot path is checked on the
# reference run of tests/test_faults.py (one launch for both).


def test_trainer_warns_when_steps_wait_on_data(monkeypatch):
    """[monitor] data_wait_warn: host time in the dataloader over that share of the wall time
    since the last log step gives one warning naming num_workers (then none for 5 minutes)."""
    import time
    from types import SimpleNamespace

    import neollm.train as train

    said = []
    monkeypatch.setattr(train.logger, "warning", lambda text: said.append(text))
    now = time.perf_counter()
    fake = SimpleNamespace(
        step=20, gradient_accumulation_steps=1,
        job_config=SimpleNamespace(monitor=SimpleNamespace(data_wait_warn=0.05),
                                   training=SimpleNamespace(dataloader=SimpleNamespace(num_workers=0))),
        metrics_processor=SimpleNamespace(time_last_log=now - 1.0, data_loading_times=[0.001] * 10))
    train.NeoLLMTrainer._warn_if_waiting_on_data(fake)
    assert said == []  # 10 ms of the last second: 1%
    fake.metrics_processor.data_loading_times = [0.02] * 10  # 200 ms: 20%
    train.NeoLLMTrainer._warn_if_waiting_on_data(fake)
    assert len(said) == 1
    assert "steps 11-20 waited for data 20% of the time (20.0 ms per batch)" in said[0]
    assert "num_workers (now 0" in said[0] and "tools/bench_data.py" in said[0]
    train.NeoLLMTrainer._warn_if_waiting_on_data(fake)
    assert len(said) == 1  # not again within 5 minutes
    fake.job_config.monitor.data_wait_warn = 0.0
    fake._data_warned_at = -1e9
    train.NeoLLMTrainer._warn_if_waiting_on_data(fake)
    assert len(said) == 1  # 0 = off
