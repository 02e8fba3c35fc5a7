"""tools/bench.py runs end to end (on CPU, tiny): it is the tool GPU numbers come from."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import load_tool


def _bench_module():
    return load_tool("bench")


def test_bench_measures_a_flavor_on_cpu(tmp_path, capsys):
    bench = _bench_module()
    out = tmp_path / "bench.json"
    code = bench.main(["--device", "cpu", "--configs", "debug", "--vocab", "256", "--batch", "2",
                       "--seq", "32", "--steps", "2", "--warmup", "1", "--no-compile",
                       "--json", str(out), "--markdown", str(tmp_path / "bench.md")])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["device"].startswith("CPU") and report["commit"] and report["date"]
    assert report["command"].startswith("python tools/bench.py --device cpu --configs debug")
    rows = report["rows"]
    assert [r["name"] for r in rows] == ["debug V=256"]
    assert rows[0]["tok_per_s"] > 0 and rows[0]["mfu"] > 0
    assert math.isfinite(rows[0]["loss"]) and abs(rows[0]["loss"] - math.log(256)) < 1.0
    assert "| debug V=256 |" in (tmp_path / "bench.md").read_text()
    assert "| config | params | tok/s |" in capsys.readouterr().out


def _scaling_main(scaling, argv: list[str], out: Path) -> int:
    """``bench_scaling.main``, rerun once (with a warning) when a layout failed only by the gloo
    teardown fault that ``conftest.run_trainer`` also retries; finished layouts are not rerun."""
    import warnings

    from conftest import aborted_in_teardown

    code = scaling.main(argv)
    if code != 0 and any(aborted_in_teardown(log.read_text()) for log in out.glob("*/train.log")):
        warnings.warn("a rank aborted in gloo teardown after a finished layout; retrying once", stacklevel=2)
        code = scaling.main(argv)
    return code


def test_bench_scaling_runs_layouts_side_by_side_and_resumes(tmp_path, capsys):
    """tools/bench_scaling.py: the real trainer on 1 and 2 CPU ranks (gloo), same global batch. With
    token shards read in interleaved rank order and one seed checkpoint, both layouts train on the
    same sequences from the same weights: their losses agree to fp32 summation order."""
    from conftest import REPO, require_prepared_assets

    require_prepared_assets()
    shards = tmp_path / "shards"
    assert load_tool("tokenize_data").main([
        "--input", str(REPO / "data/wiki_vital_en/train.jsonl"), "--max-docs", "400", "--out", str(shards),
        "--tokenizer", str(REPO / "assets/tokenizer/qwen3"), "--workers", "1", "--quiet"]) == 0
    scaling = load_tool("bench_scaling")
    out = tmp_path / "scaling"
    argv = ["--config", "train_configs/debug.toml", "--layouts", "1,2", "--steps", "4", "--skip", "1",
            "--compare-steps", "4", "--out", str(out), "--seed-checkpoint",
            "--set", "training.dataset=shards", "--set", f"training.dataset_path={shards}",
            "--set", "training.seq_len=64", "--set", "data.interleave_ranks=true"]
    assert _scaling_main(scaling, argv, out) == 0
    assert (out / "seed" / "checkpoint" / "step-0" / ".metadata").is_file()
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [(r["layout"], r["ngpu"], r["local_batch"]) for r in rows] == [("1", 1, 4), ("2", 2, 4)]
    assert rows[0]["tokens_per_step"] == rows[1]["tokens_per_step"] == 8 * 64  # the global batch, any layout
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] > 0 and rows[1]["tok_per_s"] > 0
    # issue 23's row keys: name (flavor), mode, gpus, layout, tok_per_s, efficiency
    assert [(r["name"], r["mode"], r["gpus"], r["parallelism"]) for r in rows] == [
        ("debug", "strong", 1, "single"), ("debug", "strong", 2, "fsdp")]
    assert all(math.isfinite(v) for r in rows for v in r["losses"].values()) and len(rows[1]["losses"]) == 4
    assert rows[1]["loss_steps_compared"] == 4 and rows[1]["loss_max_abs_diff"] < 1e-4
    assert "| 2 | 2 | 4 | 512 |" in (out / "results.md").read_text()
    first = (out / "2" / "result.json").read_text()
    capsys.readouterr()
    assert scaling.main(argv) == 0  # finished layouts are not run again
    assert (out / "2" / "result.json").read_text() == first

    # weak scaling: 2 sequences per GPU, so the 2-rank layout trains twice the tokens per step
    weak = tmp_path / "weak"
    weak_argv = ["--config", "train_configs/debug.toml", "--layouts", "1,2", "--steps", "3", "--skip", "1",
                 "--batch-per-gpu", "2", "--out", str(weak), "--set", "training.dataset=shards",
                 "--set", f"training.dataset_path={shards}", "--set", "training.seq_len=64"]
    assert _scaling_main(scaling, weak_argv, weak) == 0
    rows = json.loads((weak / "results.json").read_text())["results"]
    assert [(r["layout"], r["global_batch"], r["local_batch"], r["tokens_per_step"]) for r in rows] == [
        ("1", 2, 2, 2 * 64), ("2", 4, 2, 4 * 64)]
    assert rows[1]["loss_max_abs_diff"] is None  # different batches: no loss comparison
    assert rows[1]["efficiency"] == rows[1]["speedup"] / 2 and {r["mode"] for r in rows} == {"weak"}
    capsys.readouterr()
    assert scaling.main([*weak_argv, "--set", "training.global_batch_size=8"]) == 2
    assert "--batch-per-gpu sets each layout's global batch" in capsys.readouterr().err


def test_bench_scaling_refuses_bad_layouts_before_training(tmp_path, capsys):
    scaling = load_tool("bench_scaling")
    base = ["--config", "train_configs/debug.toml", "--steps", "4", "--skip", "1", "--out", str(tmp_path)]
    assert scaling.main([*base, "--layouts", "1,2y2"]) == 2
    assert "layout '2y2': write N" in capsys.readouterr().err
    assert scaling.main([*base, "--layouts", "3"]) == 2  # global batch 8 over 3 ranks
    assert "does not divide over 3 ranks" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_bench_scaling_batch_sizes_follow_set_overrides():
    """A ``--set training.local_batch_size`` is the micro-batch the trainer uses (it comes last on
    the command line), so the table must report it, not the TOML's value."""
    from neollm.bench import scaling

    config = Path("train_configs/ablation_135m.toml")
    assert scaling.read_batch(config) == (64, 64)
    assert scaling.read_batch(config, ["training.local_batch_size=8", "compile.enable=true"]) == (64, 8)
    assert scaling.read_batch(config, ["training.global_batch_size=128"]) == (128, 64)
    assert scaling.read_batch(config, ["training.local-batch-size=16"]) == (64, 16)  # torchtitan's other spelling


def test_bench_scaling_names_the_layouts_parallelism_and_flavor():
    from neollm.bench import scaling

    assert [scaling.parallelism(*scaling.parse_layout(t)) for t in ("1", "4", "4x1", "2x4", "1x1")] == [
        "single", "fsdp", "ddp", "hsdp", "single"]
    config = Path("train_configs/ablation_135m.toml")
    assert scaling.read_flavor(config) == "neollm_135m"
    assert scaling.read_flavor(config, ["model.flavor=plain", "compile.enable=true"]) == "plain"


def test_bench_scaling_refuses_two_micro_batches(tmp_path, capsys):
    scaling = load_tool("bench_scaling")
    assert scaling.main(["--config", "train_configs/debug.toml", "--layouts", "1", "--out", str(tmp_path),
                         "--local-batch", "4", "--set", "training.local_batch_size=8"]) == 2
    assert "--local-batch or --set training.local_batch_size" in capsys.readouterr().err


def test_bench_memory_counts_activations_not_weights(capsys):
    """tools/bench_memory.py: what autograd keeps grows with the batch (the weights, which a matmul
    also saves, are left out: counted, they would dominate at this size), and the table has a row per
    technique of the flavor."""
    import dataclasses

    from neollm.model.args import FLAVORS

    memory = load_tool("bench_memory")
    args = dataclasses.replace(FLAVORS["neollm_135m"], n_layers=1)
    one, two = (memory.saved_bytes(args, batch, 16, compiled=False) for batch in (1, 2))
    assert one > 0 and abs(two / one - 2.0) < 0.05
    assert memory.main(["--flavor", "neollm_135m", "--layers", "1", "--batch", "1", "--seq", "16",
                        "--no-compile", "--ablate"]) == 0
    table = capsys.readouterr().out
    assert "| neollm_135m |" in table and "| - lucid |" in table and "| - simplegpt |" in table
    assert memory.main(["--flavor", "neollm_135m", "--layers", "13"]) == 2


def test_bench_activation_checkpointing_keeps_the_losses(tmp_path, monkeypatch):
    """--ac wraps the blocks as the trainer's [activation_checkpoint] would; the same seed trains
    to the same losses with and without it, and a bad value is refused."""
    import pytest

    bench = _bench_module()
    wrapped = []

    def checkpoint_and_record(model, ac_config, compile_model, base_folder=""):
        real_checkpoint_blocks(model, ac_config, compile_model, base_folder)
        wrapped.append((ac_config.mode, ac_config.selective_ac_option,
                        all(hasattr(b, "_checkpoint_wrapped_module") for b in model.layers.children())))

    from neollm.bench import throughput

    real_checkpoint_blocks = throughput.checkpoint_blocks
    monkeypatch.setattr(throughput, "checkpoint_blocks", checkpoint_and_record)
    losses = {}
    for ac in ("none", "op", "full"):
        out = tmp_path / f"{ac}.json"
        assert bench.main(["--device", "cpu", "--configs", "debug", "--vocab", "256", "--batch", "2",
                           "--seq", "32", "--steps", "2", "--warmup", "1", "--no-compile", "--ac", ac,
                           "--peak-tflops", "1", "--json", str(out)]) == 0
        (row,) = json.loads(out.read_text())["rows"]
        assert row["name"] == "debug V=256" + ("" if ac == "none" else f" ac={ac}")
        losses[ac] = row["loss"]
    assert [(mode, option if mode == "selective" else None, ok) for mode, option, ok in wrapped] == [
        ("selective", "op", True), ("full", None, True)]
    assert losses["op"] == pytest.approx(losses["none"], abs=1e-4)
    assert losses["full"] == pytest.approx(losses["none"], abs=1e-4)
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--configs", "debug", "--ac", "sometimes"])


def test_bench_compiles_neollm_as_the_trainers_compile_section_says(tmp_path, monkeypatch):
    """--compile-mode / --compile-scope reach the trainer's own compile function (so a bench row with CUDA
    graphs is the trainer's step), the row's name says so, and the whole-model scope compiles the model, not
    its blocks; the loss is the per-block compile's."""
    import torch

    from neollm.bench import throughput

    bench = _bench_module()
    seen = []
    real_compile = throughput.compile_model_for_training

    def compile_and_record(model, compile_config, fsdp=False):
        real_compile(model, compile_config, fsdp)
        seen.append((compile_config.mode, compile_config.scope, compile_config.backend,
                     any(isinstance(b, torch._dynamo.eval_frame.OptimizedModule) for b in model.layers.children())))

    monkeypatch.setattr(throughput, "compile_model_for_training", compile_and_record)
    losses = {}
    # aot_eager ignores the mode (no CUDA graphs on a CPU), so the mode's run is as cheap as the others
    for mode, scope, label in (("default", "blocks", ""), ("default", "model", " compile=default,model"),
                               ("reduce-overhead", "model", " compile=reduce-overhead,model")):
        out = tmp_path / f"{mode}_{scope}.json"
        assert bench.main(["--device", "cpu", "--configs", "debug", "--vocab", "256", "--batch", "2", "--seq", "32",
                           "--steps", "1", "--warmup", "1", "--compile-backend", "aot_eager", "--compile-mode", mode,
                           "--compile-scope", scope, "--peak-tflops", "1", "--json", str(out)]) == 0
        (row,) = json.loads(out.read_text())["rows"]
        assert row["name"] == "debug V=256" + label
        losses[mode, scope] = row["loss"]
    assert seen == [("default", "blocks", "aot_eager", True), ("default", "model", "aot_eager", False),
                    ("reduce-overhead", "model", "aot_eager", False)]
    assert losses["default", "model"] == pytest.approx(losses["default", "blocks"], abs=1e-4)
    # without compiling, the compile settings name nothing
    out = tmp_path / "eager.json"
    assert bench.main(["--device", "cpu", "--configs", "debug", "--vocab", "256", "--batch", "2", "--seq", "32",
                       "--steps", "1", "--warmup", "1", "--no-compile", "--compile-mode", "reduce-overhead",
                       "--peak-tflops", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["rows"][0]["name"] == "debug V=256" and len(seen) == 3
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--configs", "debug", "--compile-mode", "fast"])


def test_bench_llama3_rows_padded_and_unpadded_on_the_same_tokens(tmp_path, monkeypatch):
    """``llama3`` gives two rows, the vocabulary as given and rounded up to 64; speedups are against
    the padded one; every row trains on one token batch; the MFU's peak is measured in the run."""
    import torch

    from neollm.bench import throughput

    bench = _bench_module()
    seen = []
    real_run = throughput.run

    def run_and_record(name, build, *, tokens, **kwargs):
        seen.append((name, tokens.clone()))
        return real_run(name, build, tokens=tokens, **kwargs)

    monkeypatch.setattr(throughput, "run", run_and_record)  # what throughput.run_rows calls
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--configs", "llama3,plain", "--vocab", "200", "--layers", "1",
                       "--batch", "2", "--seq", "16", "--steps", "1", "--warmup", "1", "--no-compile",
                       "--peak-tflops", "measure", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["name"], r["vocab"]) for r in rows] == [
        ("llama3 (torchtitan) V=200", 200), ("llama3 (torchtitan) V=256 padded", 256), ("plain V=200", 200)]
    padded = rows[1]
    assert padded["speedup"] == 1.0
    for r in rows:
        assert r["speedup"] == pytest.approx(r["tok_per_s"] / padded["tok_per_s"])
        assert r["peak_source"].startswith("measured (bf16 GEMM") and r["peak_tflops"] > 0
        assert math.isfinite(r["loss"]) and r["tok_per_s"] > 0
    assert rows[0]["params"] < rows[1]["params"]  # the padded head really is larger: 56 x 512 more
    assert rows[1]["params"] - rows[0]["params"] == 56 * 512 * 2  # untied embedding and output
    assert len(seen) == 3 and all(torch.equal(seen[0][1], t) for _, t in seen)
    # the batch does not depend on what the global generator drew before (model construction)
    torch.manual_seed(1)
    first = throughput.synthetic_batch(200, 2, 16, torch.device("cpu"))
    torch.rand(1000)
    assert torch.equal(first, throughput.synthetic_batch(200, 2, 16, torch.device("cpu")))
    assert torch.equal(first, seen[0][1])


def test_bench_compiles_every_ablation_variant(tmp_path, monkeypatch):
    """Variants of one block class share its code object: without a dynamo reset between configs
    their compiles pile up until dynamo's recompile limit (8), and the blocks being compiled
    fullgraph, the ninth config of ``--ablate`` (its eighth variant) failed with
    FailOnRecompileLimitHit. Nine configs here, at the default limit (checked: they fail without
    the reset); the control run without the reset, at a limit lowered to 1 to keep it short, must
    fail."""
    import torch
    import torch._dynamo

    from neollm.bench import throughput

    bench = _bench_module()
    real_switches = throughput.technique_switches
    monkeypatch.setattr(throughput, "technique_switches", lambda args: dict(list(real_switches(args).items())[:8]))
    argv = ["--device", "cpu", "--configs", "neollm_135m", "--ablate", "--vocab", "256", "--layers", "1",
            "--batch", "1", "--seq", "16", "--steps", "1", "--warmup", "0", "--compile-backend", "eager",
            "--peak-tflops", "1"]
    compiled = []
    real_compile = torch.compile

    def counting_compile(*args, **kwargs):
        compiled.append(kwargs.get("backend"))
        return real_compile(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", counting_compile)
    assert torch._dynamo.config.recompile_limit == 8
    out = tmp_path / "ablate.json"
    assert bench.main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 9 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[8]["name"].startswith("neollm_135m -") and compiled == ["eager"] * 9

    # config.patch, not monkeypatch: monkeypatch's undo deletes the key from dynamo's config module,
    # which hides recompile_limit from every later compile in the session
    real_reset = torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: None)
    try:
        with torch._dynamo.config.patch(recompile_limit=1), pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
            bench.main(argv)
    finally:
        real_reset()
    assert torch._dynamo.config.recompile_limit == 8


def test_run_gpu_tests_reads_junit_counts_and_refuses_without_cuda(tmp_path, capsys):
    """tools/run_gpu_tests.py: the counts come from pytest's junit XML; without CUDA it refuses."""
    import torch

    tool = load_tool("run_gpu_tests")
    junit = tmp_path / "run.xml"
    junit.write_text('<testsuites><testsuite name="pytest" tests="5" failures="1" errors="0" skipped="2">'
                     "</testsuite></testsuites>")
    assert tool.counts(junit) == {"tests": 5, "failures": 1, "errors": 0, "skipped": 2}
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            tool.main(["--out", str(tmp_path / "out")])
        assert "no CUDA device" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_provenance_names_the_commit_given_for_a_copied_tree(monkeypatch):
    """NEOLLM_COMMIT names the code's commit where the tree's .git is not the code's (the GPU copy)."""
    from neollm.provenance import git_commit

    monkeypatch.delenv("NEOLLM_COMMIT", raising=False)
    here = git_commit()
    assert here == "unknown" or here.split()[0].isalnum() and len(here.split()[0]) == 40
    monkeypatch.setenv("NEOLLM_COMMIT", "f2263d9")
    assert git_commit() == "f2263d9"


def test_bench_profile_writes_the_trace_and_where_the_host_time_goes(tmp_path):
    """--profile DIR on the CPU: per config a chrome trace and a table headed by the host breakdown
    (eager here: all of it outside compiled graphs), read back from that trace."""
    from neollm.bench import trace

    assert _bench_module().main(["--device", "cpu", "--configs", "debug", "--vocab", "256", "--batch", "2",
                                 "--seq", "32", "--steps", "1", "--warmup", "1", "--no-compile",
                                 "--peak-tflops", "1", "--profile", str(tmp_path)]) == 0
    (table,) = tmp_path.glob("*.txt")
    (saved,) = tmp_path.glob("*.trace.json")
    host = trace.host_breakdown(trace.load_events(saved), 3)
    assert host["parts_ms"]["outside compiled graphs"] > 0 and not host["custom_ops"]
    assert trace.host_text(host) in table.read_text()


def test_profile_host_summary_counts_launches_waits_and_copies_per_step():
    """The host side of a GPU profile: launches, waits and copies per step, the costliest ops first."""
    from types import SimpleNamespace as Event

    from neollm.bench.throughput import host_summary

    events = [Event(key="cudaLaunchKernel", count=600, self_cpu_time_total=3000.0),
              Event(key="cuLaunchKernelEx", count=300, self_cpu_time_total=1500.0),
              Event(key="cudaStreamSynchronize", count=6, self_cpu_time_total=9000.0),
              Event(key="cudaMemcpyAsync", count=3, self_cpu_time_total=30.0),
              Event(key="neollm::lucid_solve", count=36, self_cpu_time_total=1800.0)]
    text = host_summary(events, steps=3, row_limit=2)
    assert text.splitlines()[0] == ("host per step: 300 kernel launches (1.5 ms), 2 waits on the device "
                                    "(3.0 ms), 1 memcpy calls (0.0 ms)")
    top = text.splitlines()[2:]
    assert len(top) == 2 and "cudaStreamSynchronize" in top[0] and "cudaLaunchKernel" in top[1]
    assert top[0].split()[:4] == ["3.00", "ms", "2", "calls"]


def test_bench_attention_narrows_lucid_sweep_and_refuses_bad_choices(capsys):
    from neollm.bench import attention

    assert attention.parse_lucid_configs("32,64,4,1; 64,64,8,2") == [(32, 64, 4, 1), (64, 64, 8, 2)]
    assert attention.parse_lucid_variants("tf32x3:inverse,ieee:substitute,tf32x3:inverse:lookback") == [
        ("tf32x3", "inverse", "walk"), ("ieee", "substitute", "walk"), ("tf32x3", "inverse", "lookback")]
    assert len(attention.LUCID_VARIANTS) == 6
    for bad in ("32,64,4", "32,64,0,1", "a,b,c,d", ";", ""):
        with pytest.raises(ValueError, match="ROWS,COLS,WARPS,SPLIT"):
            attention.parse_lucid_configs(bad)
    for bad in ("tf32x3", "fp16:inverse", "tf32:solve", ",", "", "tf32x3:substitute:lookback",
                "tf32x3:inverse:scan", "tf32x3:inverse:walk:x"):
        with pytest.raises(ValueError, match="PRODUCTS:DIAGONAL"):
            attention.parse_lucid_variants(bad)
    tool = load_tool("bench_attention")
    with pytest.raises(SystemExit):
        tool.main(["--lucid-variants", "tf32x3:bogus"])
    assert "PRODUCTS:DIAGONAL" in capsys.readouterr().err


def test_bench_attention_narrows_the_key_gradient_sweep_and_tables_it(capsys):
    """Part 4 (LUCID's key-gradient launches): its parser, the tool's refusal of bad text, its table."""
    from neollm.bench import attention

    assert attention.parse_lucid_key_grad_configs("32,64,4,3; 64,64,8,2;") == [(32, 64, 4, 3), (64, 64, 8, 2)]
    assert attention.LUCID_KEY_GRAD_CONFIGS[0] == (32, 64, 4, 3)  # the launch before it had its own
    for bad in ("32,64,4", "32,64,0,3", "a,b,c,d", "32,64,4,3,1", ";", ""):
        with pytest.raises(ValueError, match="ROWS,COLS,WARPS,STAGES"):
            attention.parse_lucid_key_grad_configs(bad)
    tool = load_tool("bench_attention")
    with pytest.raises(SystemExit):
        tool.main(["--lucid-key-grad-only", "--lucid-key-grad-configs", "32,64,4"])
    assert "ROWS,COLS,WARPS,STAGES" in capsys.readouterr().err
    rows = [dict(block_rows=32, block_cols=64, num_warps=4, num_stages=3, ms=0.912, rel_err_dk=8.7e-6),
            dict(block_rows=128, block_cols=128, num_warps=8, num_stages=3, error="out of resource: shared memory")]
    assert attention.markdown(dict(lucid_key_grad=rows)).splitlines()[-2:] == [
        "| 32 | 64 | 4 | 3 | 0.912 | 8.70e-06 |", "| 128 | 128 | 8 | 3 | n/a: out of resource: shared memory | |"]


def test_kernel_launch_sweeps_parse_sizes_and_restore_the_module_constants():
    """bench_qk_path's --block-t and bench_epilogue's --block-n / --warps: sizes are powers of two, the Triton
    path is measured once per setting with the module's constants set, and they are restored after."""
    import argparse

    from neollm.bench import launch_sweep
    from neollm.kernels import qk_path as qp

    assert launch_sweep.power_of_two_list("16,32,64") == [16, 32, 64]
    for bad in ("48", "16,,32", "", "0", "a"):
        with pytest.raises(argparse.ArgumentTypeError, match="powers of two"):
            launch_sweep.power_of_two_list(bad)
    before = qp.BLOCK_T
    with pytest.raises(RuntimeError):
        with launch_sweep.module_settings(qp, BLOCK_T=before * 4):
            assert qp.BLOCK_T == before * 4
            raise RuntimeError("a launch that fails")
    assert qp.BLOCK_T == before

    paths = {"reference, eager": "ref", "triton": "fused"}
    assert list(launch_sweep.launches(paths, [])) == [("reference, eager", "ref", {}), ("triton", "fused", {})]
    sweep = [dict(BLOCK_N=16, NUM_WARPS=4), dict(BLOCK_N=32, NUM_WARPS=8)]
    assert list(launch_sweep.launches(paths, sweep))[1:] == [
        ("triton, BLOCK_N 16, NUM_WARPS 4", "fused", sweep[0]), ("triton, BLOCK_N 32, NUM_WARPS 8", "fused", sweep[1])]
    for tool, flag in (("bench_qk_path", "--block-t"), ("bench_epilogue", "--block-n"), ("bench_epilogue", "--warps")):
        with pytest.raises(SystemExit):
            load_tool(tool).main([flag, "24"])


def test_bench_optim_times_every_optimizer_and_records_where(tmp_path, capsys):
    """tools/bench_optim.py on the debug flavor with a smaller vocabulary: one row per optimizer (the
    TF32 Conda row and the refresh's SVD placements among them), the embedding's rows from --vocab, device, date and commit in the JSON."""
    out = tmp_path / "optim.json"
    assert load_tool("bench_optim").main(["--flavor", "debug", "--vocab", "1000", "--steps", "1", "--warmup", "0",
                                          "--device", "cpu", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"device", "date", "commit"} <= set(data) and data["command"].endswith(f"--json {out}")
    names = [row["optimizer"] for row in data["rows"]]
    assert "Conda batched, TF32 products (no SVD)" in names and len(names) == 9
    assert "Conda (SVD refresh every step, svd-cpu)" in names
    assert all(row["step_ms"] > 0 for row in data["rows"])
    assert data["parameters"] < 20_000_000  # the debug flavor's 20.2M with its own vocabulary
