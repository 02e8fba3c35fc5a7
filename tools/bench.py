"""Training-step throughput of NeoLLM flavors and torchtitan's llama3 baseline, side by side.

Each configuration is built, compiled (per block) and trained for ``--steps`` timed steps after
``--warmup`` untimed ones in this one process on the current device: real AdamW step, bf16
autocast, random tokens. NeoLLM computes its loss from the hidden states (``--loss``, default
``auto``: the fused chunked loss on CUDA); the baseline is torchtitan's own llama3 with logits + cross-entropy (compiled), as its
trainer runs it. Prints one markdown table; ``--json`` / ``--markdown`` also write it.

    python tools/bench.py --configs llama3,plain,neollm_135m,neollm_110m_hybrid --vocab 64402
    python tools/bench.py --configs neollm_135m --ablate      # each technique switched off alone
    python tools/bench.py --device cpu --configs debug --batch 2 --seq 64 --steps 2 --warmup 1

MFU = FLOPs per token (neollm/model/flops.py for NeoLLM, torchtitan's count for llama3) x tok/s /
``--peak-tflops`` (default 800: the dense bf16 matmul rate measured on the lent H100; 989 is the
datasheet figure torchtitan uses). ``--profile DIR`` writes each config's top kernels.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
from pathlib import Path

# Compile / autotune caches in the repository's .cache/compile unless NEOLLM_COMPILE_CACHE says otherwise
# (neollm/compile_cache.py, applied when neollm is imported): a second run's first step skips most compiling.
os.environ.setdefault("NEOLLM_COMPILE_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "compile"))

import torch  # noqa: E402

import neollm  # noqa: F401  (the project is installed: pip install -e .)
from neollm.compile_cache import describe_compile_cache
from neollm.loss import LOSS_IMPLS, LossSettings
from neollm.model.args import FLAVORS, NeoLLMModelArgs
from neollm.model.flops import training_flops_per_token
from neollm.model.model import NeoLLM
from neollm.model.params import technique_switches
from neollm.parallelize import checkpoint_blocks, compile_blocks


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


def float8_filter(module: torch.nn.Module, fqn: str) -> bool:
    """Linears whose both sizes are multiples of 16 (float8 matmul alignment)."""
    return (isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0
            and module.out_features % 16 == 0)


def build_neollm(args: NeoLLMModelArgs, device: torch.device, compile_model: bool,
                 loss_impl: str = "auto", float8: str = "", ac_mode: str = "none"):
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
        checkpoint_blocks(model, ac, compile_model)
    if compile_model:
        compile_blocks(model, "inductor")
    flops = training_flops_per_token(model, args, args.max_seq_len)

    def step(tokens, labels):
        return model(tokens, labels) / labels.numel()

    return model, flops, step


def build_llama3(vocab: int, seq: int, device: torch.device, compile_model: bool):
    from torchtitan.components.loss import cross_entropy_loss
    from torchtitan.models.llama3 import Transformer, TransformerModelArgs
    from torchtitan.models.llama3.infra.parallelize import apply_compile
    from torchtitan.config.job_config import Compile

    args = TransformerModelArgs(dim=512, n_layers=12, n_heads=8, n_kv_heads=4, vocab_size=vocab,
                                multiple_of=256, max_seq_len=seq, rope_theta=10000)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    loss_fn = cross_entropy_loss
    if compile_model:
        apply_compile(model, Compile(enable=True))
        loss_fn = torch.compile(cross_entropy_loss)
    _, flops = args.get_nparams_and_flops(model, seq)

    def step(tokens, labels):
        return loss_fn(model(tokens), labels) / labels.numel()

    return model, flops, step


def profile_table(step_fn, steps: int, device: torch.device, row_limit: int = 40,
                  trace: Path | None = None) -> str:
    """The kernels that take the time: torch.profiler over ``steps`` calls of ``step_fn``.

    The first line compares the summed kernel time per step with the wall time per step: where
    kernels fill much less than the wall time, the step is bound by the host's launches, not the GPU.
    ``trace`` also writes the chrome trace (large: tens of MB) for a closer look.
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
        kernel_ms = sum(e.self_device_time_total for e in averages
                        if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 1e3 / steps
        head = (f"per step: {kernel_ms:.1f} ms of kernels (summed, overlap not removed) in "
                f"{wall_ms:.1f} ms wall (profiler on)\n")
    else:
        head = f"per step: {wall_ms:.1f} ms wall (profiler on)\n"
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return head + averages.table(sort_by=key, row_limit=row_limit, max_name_column_width=90)


def run(name: str, build, *, batch: int, seq: int, vocab: int, steps: int, warmup: int,
        device: torch.device, peak_tflops: float, profile_dir: Path | None = None) -> Result:
    torch.manual_seed(0)
    model, flops_per_token, step = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")
    tokens = torch.randint(0, vocab, (batch, seq + 1), device=device)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
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
                    peak, float(loss.detach()), first_step_s)
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


def table(results: list[Result]) -> str:
    lines = ["| config | params | tok/s | step ms | MFU | peak GiB | loss | first step s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.params:,} | {r.tok_per_s:,.0f} | {r.step_ms:.1f} | "
                     f"{100 * r.mfu:.1f}% | {r.peak_gib:.2f} | {r.loss:.3f} | {r.first_step_s:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="llama3,neollm_135m", help="comma list: flavors and/or llama3")
    p.add_argument("--ablate", action="store_true", help="also run each flavor with one technique off at a time")
    p.add_argument("--vocab", type=int, default=0, help="vocabulary for every config (0: each flavor's own)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-tflops", type=float, default=800.0,
                   help="bf16 peak for MFU: 800 = the dense bf16 matmul rate measured on the lent H100 "
                        "(989 = the H100 SXM datasheet figure torchtitan uses)")
    p.add_argument("--loss", choices=LOSS_IMPLS, default="auto", help="NeoLLM's [loss] impl")
    p.add_argument("--float8", choices=("", "tensorwise", "rowwise"), default="",
                   help="torchao float8 training on NeoLLM's linears (sizes divisible by 16)")
    p.add_argument("--ac", default="none",
                   help="activation checkpointing of NeoLLM's blocks, as [activation_checkpoint]: none, full, "
                        "op (mode selective, selective_ac_option op) or N (selective, every Nth block)")
    p.add_argument("--profile", type=Path, help="also write a torch.profiler kernel table per config here")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    opts = p.parse_args(argv)
    if opts.ac not in ("none", "full", "op") and not (opts.ac.isdigit() and int(opts.ac) > 0):
        p.error(f"--ac must be none, full, op or a positive integer, got {opts.ac!r}")

    device = torch.device(opts.device)
    compile_model = not opts.no_compile
    print(f"compile cache: {describe_compile_cache()}", flush=True)
    common = dict(batch=opts.batch, seq=opts.seq, steps=opts.steps, warmup=opts.warmup,
                  device=device, peak_tflops=opts.peak_tflops, profile_dir=opts.profile)
    results: list[Result] = []

    def record(result: Result) -> None:
        results.append(result)
        print(f"{result.name}: {result.tok_per_s:,.0f} tok/s, {result.step_ms:.1f} ms/step, "
              f"MFU {100 * result.mfu:.1f}%, peak {result.peak_gib:.2f} GiB", flush=True)
        if opts.json:
            opts.json.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=2))

    for name in opts.configs.split(","):
        if name == "llama3":
            vocab = opts.vocab or FLAVORS["neollm_135m"].vocab_size
            record(run(f"llama3 (torchtitan) V={vocab}",
                       lambda v=vocab: build_llama3(v, opts.seq, device, compile_model), vocab=vocab, **common))
            continue
        if name not in FLAVORS:
            p.error(f"unknown config {name!r}: choose llama3 or one of {sorted(FLAVORS)}")
        args = dataclasses.replace(FLAVORS[name], max_seq_len=opts.seq, **({"vocab_size": opts.vocab} if opts.vocab else {}))
        variants = [(name, args)]
        if opts.ablate:
            variants += [(f"{name} -{field}", dataclasses.replace(args, **{field: off}))
                         for field, off in technique_switches(args).items()]
        for label, variant in variants:
            suffix = (f" loss={opts.loss}" if opts.loss != "auto" else "") + (f" fp8={opts.float8}" if opts.float8 else "")
            suffix += f" ac={opts.ac}" if opts.ac != "none" else ""
            record(run(f"{label} V={variant.vocab_size}{suffix}",
                       lambda a=variant: build_neollm(a, device, compile_model, opts.loss, opts.float8, opts.ac),
                       vocab=variant.vocab_size, **common))

    print()
    print(table(results))
    if opts.markdown:
        opts.markdown.write_text(table(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
