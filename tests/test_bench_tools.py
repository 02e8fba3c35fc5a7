"""tools/bench_data.py and tools/bench_trainer.py on the CPU (tiny settings)."""

from __future__ import annotations

import json

import pytest

from conftest import load_tool, require_prepared_assets


def test_bench_data_measures_a_source_and_flags_one_slower_than_the_model(tmp_path, capsys):
    require_prepared_assets()
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"rows": [
        {"name": "debug", "source": "bench", "tok_per_s": 1.0, "peak_gib": 1.0},
        {"name": "debug", "source": "trainer", "tok_per_s": 1e12, "peak_gib": 1.0}]}))
    out = tmp_path / "data.json"
    assert load_tool("bench_data").main([
        "--config", "train_configs/debug.toml", "--sources", "wiki_vital_en", "--workers", "0",
        "--batches", "3", "--warmup", "1", "--bench-json", str(bench), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "consumes 1,000,000,000,000 tok/s" in text and "(trainer)" in text  # the trainer's row wins
    assert "(GPU would wait)" in text
    report = json.loads(out.read_text())
    assert report["commit"] and report["device"] and report["date"]
    assert report["consume_tok_per_s"] == 1e12 and report["consume_from"] == f"{bench} (trainer)"
    [row] = report["rows"]
    assert row["source"] == "wiki_vital_en" and row["workers"] == 0 and row["tok_per_s"] > 0


def test_bench_data_reads_the_consumption_from_tools_bench_json(tmp_path, capsys):
    """tools/bench.py's --json holds rows named "<flavor> V=<vocab>": its row for the flavor counts,
    a technique-off row of the same flavor does not."""
    require_prepared_assets()
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"device": "CPU", "rows": [{"name": "debug -gpas V=256", "tok_per_s": 5.0},
                                                           {"name": "debug V=256", "tok_per_s": 7.0}]}))
    assert load_tool("bench_data").main([
        "--config", "train_configs/debug.toml", "--sources", "wiki_vital_en", "--workers", "0",
        "--batches", "2", "--warmup", "1", "--bench-json", str(bench)]) == 0
    assert f"consumes 7 tok/s (from {bench} (bench))" in capsys.readouterr().out


def test_bench_data_names_a_missing_flavor_row(tmp_path, capsys):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps([{"name": "plain", "tok_per_s": 5.0, "peak_gib": 1.0}]))
    assert load_tool("bench_data").main(["--config", "train_configs/debug.toml", "--bench-json", str(bench)]) == 2
    assert "has no row named 'debug'" in capsys.readouterr().err


def test_first_step_seconds_from_step_one_throughput():
    from neollm.bench.trainer import first_step_seconds

    assert first_step_seconds({"throughput(tps)": {1: 1148.0, 10: 2e5}}, 32768) == 32768 / 1148.0
    assert first_step_seconds({"throughput(tps)": {10: 2e5}}, 32768) is None


def test_a_trace_says_where_a_steps_time_goes():
    """neollm/bench/trace.py on a hand-made trace of two 10 ms steps: kernels on two streams overlapping
    (counted once), a memcpy, a kernel running past the last step (only its part inside counts), the
    optimizer's span inside its container's (counted once) and its kernels found through their launches'
    correlation ids (a runtime launch and a driver launch, as Triton's), and the top kernels per step."""
    from neollm.bench import trace

    def span(cat, name, ts, dur, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": args}

    events = [span("user_annotation", "ProfilerStep#5", 0, 10_000), span("user_annotation", "ProfilerStep#6", 10_000, 10_000)]
    for base in (0, 10_000):
        events += [
            span("kernel", "gemm", base + 1_000, 4_000, correlation=base + 1),
            span("kernel", "rmsnorm", base + 3_000, 1_000, correlation=base + 2),  # inside gemm's interval
            span("gpu_memcpy", "Memcpy HtoD", base + 5_000, 500, correlation=base + 3),
            span("user_annotation", "Optimizer.step#NeoLLMOptimizersContainer.step", base + 5_900, 3_200),
            span("user_annotation", "Optimizer.step#Conda.step", base + 6_000, 3_000),  # nested: counted once
            span("cuda_runtime", "cudaLaunchKernel", base + 6_100, 10, correlation=base + 4),
            span("cuda_driver", "cuLaunchKernel", base + 6_200, 10, correlation=base + 5),
            span("cuda_runtime", "cudaLaunchKernel", base + 500, 10, correlation=base + 1),
            span("kernel", "adam_foreach", base + 6_300, 800, correlation=base + 4),
            span("kernel", "triton_proj", base + 7_200, 1_200, correlation=base + 5),
        ]
    events.append(span("kernel", "late", 19_600, 1_000))  # the host ran ahead: only 0.4 ms inside the steps
    events.append({"ph": "i", "cat": "kernel", "name": "marker", "ts": 0})  # not a complete event: ignored
    s = trace.summarize([e for e in events if e.get("ph") == "X"], top=2)
    assert s["steps"] == 2 and s["wall_ms"] == 10.0
    assert s["gpu_busy_ms"] == pytest.approx(4.0 + 0.5 + 0.8 + 1.2 + 0.2) and s["gpu_idle_ms"] == pytest.approx(10.0 - 6.7)
    assert s["gpu_kernels_per_step"] == 5.5 and s["optimizer_host_ms"] == 3.2 and s["optimizer_gpu_ms"] == 2.0
    assert [(k["name"], k["calls_per_step"], k["ms_per_step"]) for k in s["top_kernels"]] == [
        ("gemm", 1, 4.0), ("triton_proj", 1, 1.2)]
    assert "GPU busy 6.70 ms (67%)" in trace.text(s)
    # every GPU event (the memcpy in "other", as the profile tables count it), each family's per step, the
    # late one's whole duration (1.0 ms / 2)
    assert s["families_ms"] == pytest.approx({"GEMMs (cuBLAS, inductor templates)": 4.0, trace.OTHER_FAMILY: 4.0})
    assert "8.00 ms  sum of kernel time" in trace.text(s)
    with pytest.raises(ValueError, match="no ProfilerStep# spans"):
        trace.summarize(events[2:])


def test_the_host_breakdown_tells_custom_ops_launches_and_python_apart(tmp_path, capsys):
    """trace.host_breakdown on a hand-made step of two threads (us): a compiled forward graph holding a custom
    op (its own Python, an empty and its launch), an inductor launch and an mm; a backward graph inside
    autograd's function on the other thread; an optimizer step outside the graphs. Each part per step, the
    ProfilerStep span not counted (the main thread's wait for backward is no host work); a graph call
    listed before the region of the same span still nests inside it; and the CLI."""
    from neollm.bench import trace

    def span(cat, name, ts, dur, tid=1):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "pid": 7, "args": {}}

    graph = "## Call CompiledFxGraph abc ##"
    events = [
        span("user_annotation", "ProfilerStep#3", 0, 1_000),
        span("cpu_op", "Torch-Compiled Region: 0/0", 0, 120),
        span("cpu_op", graph, 10, 100),
        span("cpu_op", "neollm::qk_path", 15, 30),  # own 30 - 2 - 5 = 23
        span("cpu_op", "aten::empty", 16, 2),
        span("cuda_driver", "cuLaunchKernelEx", 30, 5),
        span("cpu_op", "triton_poi_fused_add_0", 50, 5),
        span("cpu_op", "aten::mm", 60, 10),
        span("user_annotation", "Optimizer.step#AdamW.step", 600, 40),
        span("cuda_runtime", "cudaLaunchKernel", 610, 4),
        span("cpu_op", "autograd::engine::evaluate_function: CompiledFunctionBackward", 200, 300, tid=2),
        span("cpu_op", graph, 210, 250, tid=2),
        span("cpu_op", "neollm::qk_path_backward", 220, 50, tid=2),
        span("cpu_op", "autograd::engine::evaluate_function: torch::autograd::AccumulateGrad", 510, 20, tid=2),
        span("cpu_op", graph, 700, 50, tid=3),  # listed before the region of the same span that holds it
        span("cpu_op", "Torch-Compiled Region: 1/0", 700, 50, tid=3),
        span("cpu_op", "triton_for_fused_0", 705, 4, tid=3),  # inductor's foreach kernel
        span("cpu_op", "aten::mm", 710, 10, tid=3),
    ]
    host = trace.host_breakdown(events, steps=1)
    assert host["parts_ms"] == pytest.approx({
        trace.CUSTOM_OWN: (23 + 50) / 1e3, trace.CUSTOM_CHILDREN: 7 / 1e3, "inductor's Triton launches": (5 + 4) / 1e3,
        "aten ops called by compiled graphs": (10 + 10) / 1e3,
        "compiled graphs' own Python": (100 - 45 + 250 - 50 + 50 - 14) / 1e3,
        "outside compiled graphs": (20 + 40 + 50 + 20) / 1e3})
    assert host["custom_ops"] == {"neollm::qk_path_backward": {"calls_per_step": 1, "ms_per_step": 0.05},
                                  "neollm::qk_path": {"calls_per_step": 1, "ms_per_step": 0.03}}
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    assert trace.main([str(path), "--steps", "1"]) == 0
    assert "    0.07 ms  custom ops (neollm::*), their own Python and launch path" in capsys.readouterr().out


@pytest.mark.parametrize("name, family", [
    ("_lookback_kernel", "LUCID"),
    ("_key_grad_kernel", "LUCID"),
    ("_polynorm_glu_backward_kernel", "q/k path, epilogue, PolyNorm GLU kernels"),
    ("_qk_path_forward_kernel", "q/k path, epilogue, PolyNorm GLU kernels"),
    ("_loss_and_grad_rows", "fused loss kernel"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64>>", "flash attention"),
    ("chunk_gated_delta_rule_fwd_kernel_h_blockdim64", "fla (Gated DeltaNet, short convolution)"),
    ("nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_TNT", "GEMMs (cuBLAS, inductor templates)"),
    ("triton_per_fused__to_copy__unsafe_view_add_div_expand_mul_pow_sum_4",
     "inductor's fused elementwise / reduction kernels"),
    # inductor names fusions after the ops they hold, custom ops and flash attention's backward included
    ("triton_per_fused__scaled_dot_product_flash_attention_backward__to_copy_add_23",
     "inductor's fused elementwise / reduction kernels"),
    ("triton_per_fused__to_copy_add_div_expand_mul_pow_qk_path_backward_sum_transpose_29",
     "inductor's fused elementwise / reduction kernels"),
    ("triton_poi_fused__to_copy_attention_epilogue_backward_mul_view_17",
     "inductor's fused elementwise / reduction kernels"),
    ("triton_red_fused_chunk_gated_delta_rule_bwd_causal_conv1d_silu_bwd_add_5",
     "inductor's fused elementwise / reduction kernels"),
    ("triton_tem_fused_mm_0", "GEMMs (cuBLAS, inductor templates)"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<TensorListMetadata<2>>",
     "foreach (optimizer, gradient accumulation)"),
    ("void at::native::reduce_kernel<128, 4, at::native::ReduceOp<float>>", "other (aten elementwise / reductions, copies)"),
])
def test_kernels_fall_in_their_family(name, family):
    """The names are those a torch.profiler table of neollm_135m and the hybrid shows on an H100."""
    from neollm.bench import trace

    assert trace.kernel_family(name) == family


def test_steady_state_leaves_out_the_warm_up_steps():
    from neollm.bench.trainer import steady_state  # tools/bench_trainer.py's reading of metrics.jsonl

    metrics = {"throughput(tps)": {2: 10.0, 4: 100.0, 6: 120.0},
               "memory/max_active(GiB)": {2: 1.5, 4: 2.0, 6: 1.9}}
    assert steady_state(metrics, skip=2) == (110.0, 2.0, 2)
    with pytest.raises(RuntimeError, match="no throughput after step 6"):
        steady_state(metrics, skip=6)
    assert steady_state(metrics, skip=2, until=5) == (100.0, 2.0, 1)  # --profile: the last intervals left out


@pytest.mark.slow
def test_bench_trainer_times_the_trainer_and_bench_for_the_debug_flavor(tmp_path):
    require_prepared_assets()
    out = tmp_path / "trainer.json"
    assert load_tool("bench_trainer").main([
        "--config", "train_configs/debug.toml", "--steps", "8", "--log-freq", "2", "--skip", "2", "--profile",
        "--bench-steps", "1", "--bench-warmup", "1", "--out", str(out), "--",
        "--training.seq_len", "32", "--training.global_batch_size", "1",
        "--training.local_batch_size", "1"]) == 0
    report = json.loads(out.read_text())
    assert report["device"] and report["date"] and report["commit"]
    rows = {r["source"]: r for r in report["rows"]}
    assert set(rows) == {"trainer", "bench"}
    for row in rows.values():
        assert row["name"] == "debug" and row["tok_per_s"] > 0 and row["local_batch_size"] == 1
    assert rows["trainer"]["intervals"] == 1 and rows["trainer"]["peak_gib"] >= 0  # steps 3-4; 6-8 profiled
    assert rows["trainer"]["first_step_s"] > 0 and rows["bench"]["first_step_s"] > 0
    # --profile: torch.profiler's two active steps, the optimizer's annotation found (no GPU: no kernels)
    profile = rows["trainer"]["profile"]
    assert profile["steps"] == 2 and profile["wall_ms"] > 0 and profile["gpu_busy_ms"] == 0
    assert 0 < profile["optimizer_host_ms"] < profile["wall_ms"]


def test_bench_trainer_runs_the_bench_with_the_jobs_compile_settings(tmp_path, capsys):
    """The bench side compiles as the trainer does (CUDA graphs on both sides or neither), and not at all
    when the job does not compile; tools/bench.py accepts the command line it is given."""
    from neollm.bench.trainer import bench_command
    from neollm.config_check import parse_config

    def command(*overrides):
        job = parse_config(["--job.config_file", "train_configs/ablation_135m.toml", *overrides])
        return bench_command(job, "neollm_135m", 3, 1, tmp_path / "b.json")

    graphs = command("--compile.mode", "reduce-overhead", "--compile.scope", "model")
    at = graphs.index("--compile-mode")
    assert graphs[at - 2:at + 4] == ["--compile-backend", "inductor", "--compile-mode", "reduce-overhead",
                                     "--compile-scope", "model"]
    assert "--no-compile" not in graphs
    plain = command()
    assert plain[plain.index("--compile-mode") + 1] == "default" and plain[plain.index("--compile-scope") + 1] == "blocks"
    eager = command("--compile.no-enable")
    assert "--no-compile" in eager and "--compile-mode" not in eager
    # tools/bench.py parses that command line: it gets as far as the (unknown) config name
    argv = graphs[2:]
    argv[argv.index("--configs") + 1] = "no_such_flavor"
    with pytest.raises(SystemExit):
        load_tool("bench").main(argv + ["--device", "cpu"])
    assert "unknown config 'no_such_flavor'" in capsys.readouterr().err


def test_bench_trainer_refuses_a_kept_folder_that_holds_a_run(tmp_path, capsys):
    """--keep on a folder with a metrics.jsonl would append this run to it (and the report would read
    the old run's steps where this one's are missing): refused before anything runs."""
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "metrics.jsonl").write_text('{"step": 1, "throughput(tps)": 1.0}\n')
    assert load_tool("bench_trainer").main(["--config", "train_configs/debug.toml", "--keep", str(kept)]) == 2
    assert "already holds a run's metrics.jsonl" in capsys.readouterr().err


def test_reports_name_the_neollm_switches_set(monkeypatch):
    from neollm.provenance import neollm_environment

    monkeypatch.setenv("NEOLLM_LUCID_IMPL", "torch")
    monkeypatch.setenv("NEOLLM_COMMIT", "abc123")
    env = neollm_environment()
    assert env["NEOLLM_LUCID_IMPL"] == "torch" and "NEOLLM_COMMIT" not in env
