"""Training-step throughput of NeoLLM flavors and torchtitan's llama3, measured the same way.

Every configuration trains on the same token batch (drawn once, from its own generator, before any
model is built), after a dynamo reset (so each one compiles its own graphs: variants of one block
class would otherwise pile up recompiles of one code object until dynamo's limit). The baseline a
speedup is reported against is llama3 at the vocabulary rounded up to a multiple of 64, which is
how a torchtitan user runs it (an unaligned head runs slow GEMM kernels; NeoLLM's fused loss pads
internally).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from neollm.bench.trace import family_text, family_times, host_breakdown, host_text, load_events
from neollm.loss import LossSettings
from neollm.model.args import FLAVORS, ModelConfigError, NeoLLMModelArgs
from neollm.model.flops import training_flops_per_token
from neollm.model.model import NeoLLM
from neollm.model.params import technique_switches
from neollm.parallelize import checkpoint_blocks, compile_model_for_training
from neollm.provenance import record

VOCAB_ALIGNMENT = 64


@dataclasses.dataclass
class Result:
    name: str
    params: int
    tok_per_s: float
    step_ms: float
    mfu: float
    peak_gib: float
    loss: float
    first_step_s: float = 0.0
    """Wall time of the first step: compilation (and autotuning) dominate it."""
    vocab: int = 0
    speedup: float | None = None
    """tok/s over the padded llama3 row's of the same run (None without one)."""
    peak_tflops: float = 0.0
    peak_source: str = ""
    """Where the MFU's bf16 peak came from (neollm.bench.peak)."""


def padded_vocab(vocab: int, multiple: int = VOCAB_ALIGNMENT) -> int:
    return -(-vocab // multiple) * multiple


def synthetic_batch(vocab: int, batch: int, seq: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Token ids [batch, seq + 1] below ``vocab`` from a generator of their own: every config of a
    run gets the same tokens, whatever its model drew from the global generator."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq + 1), generator=generator).to(device)


def float8_filter(module: torch.nn.Module, fqn: str) -> bool:
    """Linears whose both sizes are multiples of 16 (float8 matmul alignment)."""
    return (isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0
            and module.out_features % 16 == 0)


def build_neollm(args: NeoLLMModelArgs, device: torch.device, compile_backend: str | None,
                 loss_impl: str = "auto", float8: str = "", ac_mode: str = "none",
                 compile_mode: str = "default", compile_scope: str = "blocks"):
    """NeoLLM as the trainer builds it (meta init, optional float8 and AC, compiled with
    ``compile_backend`` as the trainer's ``[compile]`` mode and scope, None for eager); returns
    (model, training FLOPs per token, step)."""
    with torch.device("meta"):
        model = NeoLLM(args)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights()
    model.loss_settings = LossSettings(impl=loss_impl)
    if float8:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(float8),
                                   module_filter_fn=float8_filter)
    if ac_mode != "none":
        from torchtitan.config.job_config import ActivationCheckpoint

        ac = (ActivationCheckpoint(mode="full") if ac_mode == "full"
              else ActivationCheckpoint(mode="selective", selective_ac_option=ac_mode))
        checkpoint_blocks(model, ac, compile_backend is not None)
    if compile_backend is not None:
        compile_model_for_training(model, SimpleNamespace(backend=compile_backend, mode=compile_mode,
                                                          scope=compile_scope))
    flops = training_flops_per_token(model, args, args.max_seq_len)

    def step(tokens, labels):
        return model(tokens, labels) / labels.numel()

    return model, flops, step


def build_llama3(vocab: int, seq: int, device: torch.device, compile_backend: str | None, n_layers: int = 12):
    """torchtitan's llama3 at NeoLLM's 135M shape (dim 512, 8 heads, 4 KV heads) with logits +
    cross-entropy, compiled per block as its trainer does; FLOPs per token from torchtitan's count."""
    from torchtitan.components.loss import cross_entropy_loss
    from torchtitan.config.job_config import Compile
    from torchtitan.models.llama3 import Transformer, TransformerModelArgs
    from torchtitan.models.llama3.infra.parallelize import apply_compile

    args = TransformerModelArgs(dim=512, n_layers=n_layers, n_heads=8, n_kv_heads=4, vocab_size=vocab,
                                multiple_of=256, max_seq_len=seq, rope_theta=10000)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    loss_fn = cross_entropy_loss
    if compile_backend is not None:
        apply_compile(model, Compile(enable=True, backend=compile_backend))
        loss_fn = torch.compile(cross_entropy_loss, backend=compile_backend)
    _, flops = args.get_nparams_and_flops(model, seq)

    def step(tokens, labels):
        return loss_fn(model(tokens), labels) / labels.numel()

    return model, flops, step


# CUDA runtime/driver calls that launch a kernel, and those that make the host wait for the device
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                "cudaGraphLaunch")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def host_summary(averages, steps: int, row_limit: int = 25) -> str:
    """What the host does per step: kernel launches, waits on the device, device-to-host copies
    (``cudaMemcpyAsync``: a ``.item()`` or ``.cpu()`` waits for the device too) and the ops that
    spend the most host time. Where kernels fill much less than the wall time, this says why."""
    def per_step(names) -> tuple[float, float]:
        hits = [e for e in averages if e.key in names]
        return (sum(e.count for e in hits) / steps, sum(e.self_cpu_time_total for e in hits) / 1e3 / steps)

    launches, launch_ms = per_step(LAUNCH_CALLS)
    syncs, sync_ms = per_step(SYNC_CALLS)
    copies, copy_ms = per_step(("cudaMemcpyAsync", "cudaMemcpy"))
    lines = [f"host per step: {launches:.0f} kernel launches ({launch_ms:.1f} ms), {syncs:.0f} waits on "
             f"the device ({sync_ms:.1f} ms), {copies:.0f} memcpy calls ({copy_ms:.1f} ms)",
             "ops by host (self CPU) time per step:"]
    top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:row_limit]
    lines += [f"  {e.self_cpu_time_total / 1e3 / steps:8.2f} ms  {e.count / steps:7.0f} calls  {e.key[:90]}"
              for e in top]
    return "\n".join(lines) + "\n"


def profile_table(step_fn, steps: int, device: torch.device, row_limit: int = 40,
                  trace: Path | None = None) -> str:
    """The kernels that take the time: torch.profiler over ``steps`` calls of ``step_fn``.

    The first line compares the summed kernel time per step with the wall time per step: where
    kernels fill much less than the wall time, the step is bound by the host's launches, not the GPU.
    ``trace`` also writes the chrome trace (large: tens of MB) for a closer look, and the table then
    says where the host's time goes (``trace.host_breakdown``).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step_fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3 / steps
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    averages = prof.key_averages()
    if device.type == "cuda":
        from torch.autograd import DeviceType

        # kernel events only, as the profiler's own "Self CUDA time total" (CPU ops also carry the
        # device time of the kernels they launch: summing both counts every kernel twice)
        families = family_times(((e.key, e.self_device_time_total / 1e3) for e in averages
                                 if e.device_type == DeviceType.CUDA and not e.is_user_annotation), steps)
        kernel_ms = sum(families.values())
        head = (f"per step: {kernel_ms:.1f} ms of kernels (summed, overlap not removed) in "
                f"{wall_ms:.1f} ms wall (profiler on)\n" + host_summary(averages, steps) + "\n"
                + "kernel time per step by family (neollm/bench/trace.py):\n" + family_text(families) + "\n")
    else:
        head = f"per step: {wall_ms:.1f} ms wall (profiler on)\n"
    if trace is not None:  # where the host's time goes, from the trace's nesting (neollm/bench/trace.py)
        head += host_text(host_breakdown(load_events(trace), steps)) + "\n"
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return head + averages.table(sort_by=key, row_limit=row_limit, max_name_column_width=90)


def run(name: str, build: Callable, *, tokens: torch.Tensor, vocab: int, steps: int, warmup: int,
        device: torch.device, peak_tflops: float, peak_source: str = "",
        profile_dir: Path | None = None) -> Result:
    """Build one config (after a dynamo reset, seed 0) and time ``steps`` real AdamW steps on
    ``tokens`` ([batch, seq + 1], shared by every config) after ``warmup`` untimed ones."""
    if int(tokens.max()) >= vocab:
        raise ValueError(f"{name}: token ids reach {int(tokens.max())}, outside its vocabulary {vocab}")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, flops_per_token, step = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    batch, seq = inputs.shape
    amp = torch.autocast(device.type, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loss = torch.zeros(())

    def train_step() -> torch.Tensor:
        with amp:
            loss = step(inputs, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    sync()
    first = time.perf_counter()
    first_step_s = float("nan")
    start = first
    for i in range(warmup + steps):
        if i == 1:
            sync()
            first_step_s = time.perf_counter() - first
        if i == warmup:
            sync()
            start = time.perf_counter()
        loss = train_step()
    sync()
    elapsed = (time.perf_counter() - start) / steps
    tok_s = batch * seq / elapsed
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    params = sum(p.numel() for p in model.parameters())
    result = Result(name, params, tok_s, elapsed * 1e3, flops_per_token * tok_s / (peak_tflops * 1e12),
                    peak, float(loss.detach()), first_step_s, vocab=vocab, peak_tflops=peak_tflops,
                    peak_source=peak_source)
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
        (profile_dir / f"{safe}.txt").write_text(
            profile_table(train_step, 3, device, trace=profile_dir / f"{safe}.trace.json"))
    del model, optimizer, step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def set_speedups(results: list[Result], baseline: Result | None) -> None:
    for r in results:
        r.speedup = r.tok_per_s / baseline.tok_per_s if baseline is not None else None


def table(results: list[Result], baseline: Result | None = None) -> str:
    ref = f"x {baseline.name}" if baseline is not None else "speedup"
    lines = [f"| config | params | tok/s | {ref} | step ms | MFU | peak GiB | loss | first step s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        speedup = f"{r.speedup:.2f}" if r.speedup is not None else "-"
        lines.append(f"| {r.name} | {r.params:,} | {r.tok_per_s:,.0f} | {speedup} | {r.step_ms:.1f} | "
                     f"{100 * r.mfu:.1f}% | {r.peak_gib:.2f} | {r.loss:.3f} | {r.first_step_s:.1f} |")
    return "\n".join(lines)


def plan(opts) -> list[tuple[str, int, Callable]]:
    """(row name, vocabulary, builder) for every row tools/bench.py's ``opts`` ask for, in order; the
    padded llama3 row is named ``... padded``. A config that cannot be built raises ValueError."""
    device = torch.device(opts.device)
    backend = None if opts.no_compile else opts.compile_backend
    layers = {"n_layers": opts.layers} if opts.layers else {}
    mode, scope = opts.compile_mode, opts.compile_scope
    rows = []
    for name in opts.configs.split(","):
        if name == "llama3":
            vocab = opts.vocab or FLAVORS["neollm_135m"].vocab_size
            n_layers = opts.layers or 12
            for v in dict.fromkeys((vocab, padded_vocab(vocab))):
                label = f"llama3 (torchtitan) V={v}" + (" padded" if v != vocab else "")
                rows.append((label, v, lambda v=v: build_llama3(v, opts.seq, device, backend, n_layers)))
            continue
        if name not in FLAVORS:
            raise ValueError(f"unknown config {name!r}: choose llama3 or one of {sorted(FLAVORS)}")
        try:
            args = dataclasses.replace(FLAVORS[name], max_seq_len=opts.seq, **layers,
                                       **({"vocab_size": opts.vocab} if opts.vocab else {}))
        except ModelConfigError as error:
            raise ValueError(f"{name}: {error}") from error
        variants = [(name, args)]
        if opts.ablate:
            variants += [(f"{name} -{field}", dataclasses.replace(args, **{field: off}))
                         for field, off in technique_switches(args).items()]
        suffix = (f" loss={opts.loss}" if opts.loss != "auto" else "") + (f" fp8={opts.float8}" if opts.float8 else "")
        suffix += f" ac={opts.ac}" if opts.ac != "none" else ""
        suffix += f" compile={mode},{scope}" if backend is not None and (mode, scope) != ("default", "blocks") else ""
        for label, variant in variants:
            rows.append((f"{label} V={variant.vocab_size}{suffix}", variant.vocab_size,
                         lambda a=variant: build_neollm(a, device, backend, opts.loss, opts.float8, opts.ac,
                                                        mode, scope)))
    return rows


def run_rows(rows: list[tuple[str, int, Callable]], *, tokens: torch.Tensor, steps: int, warmup: int,
             device: torch.device, peak, profile_dir: Path | None = None,
             json_path: Path | None = None, command: str = "") -> tuple[list[Result], Result | None]:
    """``run`` each of ``plan``'s rows on ``tokens``, printing a line per row; ``json_path`` is rewritten
    after every row (a run that dies later keeps the rows before): ``{device, date, commit, environment,
    command, rows}``. Returns the results and the baseline: the last llama3 row with an aligned vocabulary
    (the padded one), or None."""
    results: list[Result] = []
    baseline: list[Result] = []

    def write_json() -> None:
        if json_path:
            set_speedups(results, baseline[0] if baseline else None)
            rows = [dataclasses.asdict(r) for r in results]
            json_path.write_text(json.dumps({**record(), "command": command, "rows": rows}, indent=2) + "\n")

    for label, vocab, build in rows:
        result = run(label, build, tokens=tokens, vocab=vocab, steps=steps, warmup=warmup,
                     device=device, peak_tflops=peak.tflops, peak_source=peak.source, profile_dir=profile_dir)
        results.append(result)
        if label.startswith("llama3") and (label.endswith(" padded") or vocab % 64 == 0):
            baseline[:] = [result]
        print(f"{result.name}: {result.tok_per_s:,.0f} tok/s, {result.step_ms:.1f} ms/step, "
              f"MFU {100 * result.mfu:.1f}%, peak {result.peak_gib:.2f} GiB", flush=True)
        write_json()
    return results, baseline[0] if baseline else None
