"""Where a profiled training step's time goes, read from a torch.profiler chrome trace (torchtitan's
``[profiling]`` traces; ``tools/bench_trainer.py --profile`` takes one and prints this).

A host-bound step shows as GPU idle time: wall time per step (torch.profiler's ``ProfilerStep#N``
spans) against the union of the GPU's kernel, copy and set intervals within those spans. The
optimizer's share is the host span of its ``Optimizer.step#...`` annotation and the GPU time of the
kernels launched inside it (matched to their launch by the trace's ``correlation`` ids), since the
optimizer's steps run outside the compiled model and any CUDA graph of it.

Where the host's time goes (``host_breakdown``): the CPU events of each thread nested by time, so that
inside compiled graphs the custom ops' own time (their Python wrappers and Triton's launch path), the
kernels inductor launches, the aten ops the graphs call and the graphs' own Python are told apart.
``python -m neollm.bench.trace TRACE [--steps N]`` prints both for a saved trace.
"""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")  # cudaLaunchKernel, cuLaunchKernel (Triton), graph launches
OPTIMIZER_PREFIX = "Optimizer.step#"


def load_events(path: str | Path) -> list[dict]:
    """The complete ("X") events of a chrome trace file (.json or .json.gz)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        data = json.load(handle)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def _union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the (start, end) intervals (overlaps, e.g. two streams, counted once)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def _clipped(intervals: list[tuple[float, float]], spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The parts of ``intervals`` inside ``spans`` (the host runs ahead of the GPU: kernels of the warm-up
    step may run into the first profiled step, the last step's after its span)."""
    return [(max(a, s), min(b, e)) for a, b in intervals for s, e in spans if min(b, e) > max(a, s)]


def _inside(ts: float, spans: list[tuple[float, float]]) -> bool:
    return any(start <= ts <= stop for start, stop in spans)


HOST_CATEGORIES = ("cpu_op", "user_annotation", *LAUNCH_CATEGORIES)
COMPILED_GRAPH_PREFIX = "## Call CompiledFxGraph"
CUSTOM_OP_PREFIX = "neollm::"
INDUCTOR_KERNEL_PREFIXES = ("triton_",)  # triton_poi_, _red_, _per_, _tem_, _for_ (foreach): inductor's names
CUSTOM_OWN = "custom ops (neollm::*), their own Python and launch path"
CUSTOM_CHILDREN = "custom ops' child aten ops and launches"
HOST_PARTS = (CUSTOM_OWN, CUSTOM_CHILDREN, "inductor's Triton launches", "aten ops called by compiled graphs",
              "compiled graphs' own Python", "outside compiled graphs")


def _nest(events: list[dict]) -> tuple[list[dict], dict[int, list[dict]]]:
    """Per thread, the outermost events and each event's direct children (by time containment)."""
    threads: dict[object, list[dict]] = defaultdict(list)
    for e in events:
        threads[(e.get("pid"), e.get("tid"))].append(e)
    roots: list[dict] = []
    children: dict[int, list[dict]] = defaultdict(list)
    for thread in threads.values():
        # equal spans: a compiled graph's call nests inside the other (e.g. the "Torch-Compiled Region" around it)
        thread.sort(key=lambda e: (e["ts"], -e["dur"], e["name"].startswith(COMPILED_GRAPH_PREFIX)))
        stack: list[dict] = []
        for e in thread:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            (children[id(stack[-1])] if stack else roots).append(e)
            stack.append(e)
    return roots, children


def host_breakdown(events: list[dict], steps: int) -> dict:
    """Host time per step (ms) of every thread in the trace, in ``HOST_PARTS``: inside each compiled
    graph call, the custom ops' own time (not in their child events), their children, inductor's kernel
    launches, the other aten ops and the graph's own Python; outside graphs, the outermost events
    (the optimizer, autograd's AccumulateGrad, the loss, ...). Also each custom op's calls and ms per step."""
    # the ProfilerStep spans would count the main thread's wait in backward (run by autograd's thread) as host work
    roots, children = _nest([e for e in events if e.get("cat") in HOST_CATEGORIES
                             and not e["name"].startswith("ProfilerStep#")])
    parts = dict.fromkeys(HOST_PARTS, 0.0)
    ops: dict[str, list[float]] = defaultdict(list)

    def own(e: dict) -> float:
        return e["dur"] - sum(c["dur"] for c in children[id(e)])

    holds: set[int] = set()  # events with a compiled graph call at or below them

    def mark(e: dict) -> bool:
        found = e["name"].startswith(COMPILED_GRAPH_PREFIX)
        for c in children[id(e)]:
            found = mark(c) or found
        if found:
            holds.add(id(e))
        return found

    def visit(e: dict) -> None:
        if not e["name"].startswith(COMPILED_GRAPH_PREFIX):  # outside graphs: its time but the graphs' below it
            inner = [c for c in children[id(e)] if id(c) in holds]
            parts["outside compiled graphs"] += e["dur"] - sum(c["dur"] for c in inner)
            for c in inner:
                visit(c)
            return
        parts["compiled graphs' own Python"] += own(e)
        for c in children[id(e)]:
            if c["name"].startswith(CUSTOM_OP_PREFIX):
                parts[CUSTOM_OWN] += own(c)
                parts[CUSTOM_CHILDREN] += c["dur"] - own(c)
                ops[c["name"]].append(c["dur"])
            elif c["name"].startswith(INDUCTOR_KERNEL_PREFIXES) or c.get("cat") in LAUNCH_CATEGORIES:
                parts["inductor's Triton launches"] += c["dur"]
            else:
                parts["aten ops called by compiled graphs"] += c["dur"]

    for root in roots:
        mark(root)
        visit(root)
    ms = 1e-3 / steps
    return {"parts_ms": {k: v * ms for k, v in parts.items()},
            "custom_ops": {name: {"calls_per_step": len(d) / steps, "ms_per_step": sum(d) * ms}
                           for name, d in sorted(ops.items(), key=lambda item: -sum(item[1]))}}


def host_text(host: dict) -> str:
    """``host_breakdown`` as printed: the parts, then each custom op."""
    parts = host["parts_ms"]
    lines = ["host time per step (every thread of the trace):"]
    lines += [f"{ms:8.2f} ms  {part}" for part, ms in parts.items()]
    lines.append(f"{sum(parts.values()):8.2f} ms  sum")
    lines += [f"{o['ms_per_step']:8.2f} ms  {o['calls_per_step']:4.0f} calls  {name}"
              for name, o in host["custom_ops"].items()]
    return "\n".join(lines)


def summarize(events: list[dict], top: int = 15) -> dict:
    """Per profiled step (ms): wall, GPU busy, GPU idle; the optimizer's host span and kernel time;
    the ``top`` kernels by GPU time (calls and ms per step)."""
    steps = [e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("ProfilerStep#")]
    if not steps:
        raise ValueError("the trace has no ProfilerStep# spans: profile with a torch.profiler schedule "
                         "(torchtitan's [profiling] does)")
    n = len(steps)
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    step_spans = [(e["ts"], e["ts"] + e["dur"]) for e in steps]
    wall_us = sum(e["dur"] for e in steps)
    busy_us = _union_length(_clipped([(e["ts"], e["ts"] + e["dur"]) for e in gpu], step_spans))

    # nested: torchtitan's container is an Optimizer too, its step's span holds Conda's (or AdamW's)
    optimizer = [(e["ts"], e["ts"] + e["dur"]) for e in events
                 if e.get("cat") == "user_annotation" and e["name"].startswith(OPTIMIZER_PREFIX)]
    launched_in_optimizer = {e["args"]["correlation"] for e in events
                             if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})
                             and _inside(e["ts"], optimizer)}
    optimizer_gpu_us = sum(e["dur"] for e in gpu if e.get("args", {}).get("correlation") in launched_in_optimizer)

    by_name: dict[str, list[float]] = defaultdict(list)
    for e in gpu:
        by_name[e["name"]].append(e["dur"])
    ranked = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:top]
    ms = 1e-3 / n
    return {
        "steps": n,
        "wall_ms": wall_us * ms,
        "gpu_busy_ms": busy_us * ms,
        "gpu_idle_ms": max(wall_us - busy_us, 0.0) * ms,
        "gpu_kernels_per_step": len(gpu) / n,
        "optimizer_host_ms": _union_length(optimizer) * ms,
        "optimizer_gpu_ms": optimizer_gpu_us * ms,
        "top_kernels": [{"name": name, "calls_per_step": len(durs) / n, "ms_per_step": sum(durs) * ms}
                        for name, durs in ranked],
        "families_ms": family_times(((e["name"], e["dur"] * 1e-3) for e in gpu), n),  # copies and sets: "other"
        "host": host_breakdown(events, n),
    }


# Which part of the model a kernel belongs to, by its name. Inductor's kernels are told by their prefix
# first: it names a fused kernel after the ops it fuses, which may be a custom op's (``..._qk_path_backward_...``)
# or flash attention's backward. Then the first family whose marks match wins; NeoLLM's own Triton kernels
# are named in neollm/kernels/ and neollm/loss/kernel.py.
INDUCTOR_FAMILIES: tuple[tuple[str, str], ...] = (
    ("triton_tem_", "GEMMs (cuBLAS, inductor templates)"),
    ("triton_poi_", "inductor's fused elementwise / reduction kernels"),
    ("triton_red_", "inductor's fused elementwise / reduction kernels"),
    ("triton_per_", "inductor's fused elementwise / reduction kernels"),
)
KERNEL_FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("LUCID", ("_substitute_kernel", "_lookback_kernel", "_diagonal_inverse_kernel", "_key_grad_kernel")),
    ("q/k path, epilogue, PolyNorm GLU kernels", ("_qk_path_", "_epilogue_", "_polynorm_glu_")),
    ("fused loss kernel", ("_loss_and_grad_rows",)),
    ("flash attention", ("flash", "fmha")),
    ("fla (Gated DeltaNet, short convolution)", ("chunk_", "recompute_w_u", "solve_tril", "merge_16x16", "l2norm",
                                                 "causal_conv1d", "fused_recurrent", "kkt", "prepare_wy")),
    ("GEMMs (cuBLAS, inductor templates)", ("nvjet", "gemm", "cutlass", "xmma", "sm90_", "sm80_", "ampere_")),
    ("foreach (optimizer, gradient accumulation)", ("multi_tensor_apply",)),
)
OTHER_FAMILY = "other (aten elementwise / reductions, copies)"


def kernel_family(name: str) -> str:
    """The family a kernel's name falls in: inductor's prefixes first, then ``KERNEL_FAMILIES``
    (``OTHER_FAMILY`` if none)."""
    for prefix, family in INDUCTOR_FAMILIES:
        if name.startswith(prefix):
            return family
    for family, marks in KERNEL_FAMILIES:
        if any(mark in name for mark in marks):
            return family
    return OTHER_FAMILY


def family_times(kernels: Iterable[tuple[str, float]], steps: int = 1) -> dict[str, float]:
    """Sum (name, time) pairs per kernel family, divided by ``steps``, largest first."""
    totals: dict[str, float] = defaultdict(float)
    for name, duration in kernels:
        totals[kernel_family(name)] += duration / steps
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def family_text(times_ms: dict[str, float]) -> str:
    """The families as a small table, ms per step, with their sum."""
    lines = [f"{ms:8.2f} ms  {family}" for family, ms in times_ms.items()]
    return "\n".join(lines + [f"{sum(times_ms.values()):8.2f} ms  sum of kernel time"])


def text(summary: dict) -> str:
    """The summary as printed: one line of totals, the optimizer, then the top kernels."""
    s = summary
    share = s["gpu_busy_ms"] / s["wall_ms"] if s["wall_ms"] else 0.0
    lines = [f"profile, per step over {s['steps']} steps: wall {s['wall_ms']:.2f} ms, GPU busy {s['gpu_busy_ms']:.2f} ms "
             f"({share:.0%}), idle {s['gpu_idle_ms']:.2f} ms, {s['gpu_kernels_per_step']:.0f} GPU events",
             f"optimizer step: host {s['optimizer_host_ms']:.2f} ms, its kernels {s['optimizer_gpu_ms']:.2f} ms on the GPU",
             "| kernel | calls / step | ms / step |", "|---|---:|---:|"]
    lines += [f"| {k['name'][:90]} | {k['calls_per_step']:.0f} | {k['ms_per_step']:.3f} |" for k in s["top_kernels"]]
    if s.get("families_ms"):
        lines += ["kernel time per step by family:", family_text(s["families_ms"])]
    if s.get("host"):
        lines.append(host_text(s["host"]))
    return "\n".join(lines)


def latest_trace(folder: str | Path, rank: int = 0) -> Path:
    """The last ``iteration_N/rank{rank}_trace.json`` torchtitan wrote under ``folder``."""
    found = sorted(Path(folder).glob(f"iteration_*/rank{rank}_trace.json*"),
                   key=lambda p: int(p.parent.name.split("_")[-1]))
    if not found:
        raise FileNotFoundError(f"no iteration_*/rank{rank}_trace.json under {folder}: was [profiling] on, and did "
                                "the run reach profile_freq steps?")
    return found[-1]


def main(argv: list[str] | None = None) -> int:
    """Print where a saved trace's steps go: the summary (torchtitan's traces, with ProfilerStep spans) or,
    for a trace without them (tools/bench.py --profile), the host breakdown over ``--steps`` steps."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("trace", type=Path)
    p.add_argument("--steps", type=int, default=0, help="steps in the trace (default: its ProfilerStep spans)")
    opts = p.parse_args(argv)
    events = load_events(opts.trace)
    if opts.steps:
        print(host_text(host_breakdown(events, opts.steps)))
    else:
        print(text(summarize(events)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
