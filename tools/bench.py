"""Training-step throughput of NeoLLM flavors and torchtitan's llama3 baseline, side by side.

Each configuration is built, compiled (per block) and trained for ``--steps`` timed steps after
``--warmup`` untimed ones in this one process on the current device: real AdamW step, bf16
autocast, the same random tokens for every config. NeoLLM computes its loss from the hidden states
(``--loss``, default ``auto``: the fused chunked loss on CUDA); the baseline is torchtitan's own
llama3 with logits + cross-entropy (compiled), as its trainer runs it, at the given vocabulary and
at that vocabulary rounded up to a multiple of 64 (how a torchtitan user runs it): speedups are
against the padded row. Prints one markdown table; ``--json`` / ``--markdown`` also write it.

    python tools/bench.py --configs llama3,plain,neollm_135m,neollm_110m_hybrid --vocab 64402
    python tools/bench.py --configs neollm_135m --ablate      # each technique switched off alone
    python tools/bench.py --device cpu --configs debug --batch 2 --seq 64 --steps 2 --warmup 1

MFU = FLOPs per token (neollm/model/flops.py for NeoLLM, torchtitan's count for llama3) x tok/s /
the bf16 peak of ``--peak-tflops``: ``measure`` (default: a bf16 GEMM timed in this run),
``datasheet`` (torchtitan's figure for the GPU, as its MFU uses) or a number; the table and the
JSON rows say which. ``--profile DIR`` writes each config's top kernels and its kernel time by family.
``--compile-mode`` / ``--compile-scope`` compile NeoLLM as the trainer's ``[compile]`` mode and scope do
(``reduce-overhead`` runs each compiled graph as a CUDA graph: for host-bound steps). The code is
neollm/bench/.

    python tools/bench.py --configs neollm_135m --compile-mode reduce-overhead --compile-scope model
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Compile / autotune caches in the repository's .cache/compile unless NEOLLM_COMPILE_CACHE says otherwise
# (neollm/compile_cache.py, applied when neollm is imported): a second run's first step skips most compiling.
os.environ.setdefault("NEOLLM_COMPILE_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "compile"))

import torch  # noqa: E402

from neollm.bench.peak import resolve_peak  # noqa: E402
from neollm.bench.throughput import plan, run_rows, set_speedups, synthetic_batch, table  # noqa: E402
from neollm.compile_cache import describe_compile_cache  # noqa: E402
from neollm.config import COMPILE_MODES, COMPILE_SCOPES  # noqa: E402
from neollm.loss import LOSS_IMPLS  # noqa: E402
from neollm.provenance import tool_command  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="llama3,neollm_135m",
                   help="comma list: flavors and/or llama3 (two rows: the vocabulary as given and padded to 64)")
    p.add_argument("--ablate", action="store_true", help="also run each flavor with one technique off at a time")
    p.add_argument("--vocab", type=int, default=0, help="vocabulary for every config (0: each flavor's own)")
    p.add_argument("--layers", type=int, default=0, help="blocks of every config (0: each flavor's own; llama3 12)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the blocks")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="NeoLLM rows: torch.compile mode, as [compile] mode (reduce-overhead: CUDA graphs)")
    p.add_argument("--compile-scope", choices=COMPILE_SCOPES, default="blocks",
                   help="NeoLLM rows: compile each block or the whole model, as [compile] scope")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-tflops", default="measure",
                   help="bf16 peak for MFU: measure (a bf16 GEMM timed in this run), datasheet (torchtitan's "
                        "figure for this GPU) or a number in TFLOP/s")
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
    if opts.layers < 0:
        p.error(f"--layers must be 0 (each flavor's own) or positive, got {opts.layers}")

    device = torch.device(opts.device)
    print(f"compile cache: {describe_compile_cache()}", flush=True)
    try:
        rows = plan(opts)
    except ValueError as error:
        p.error(str(error))
    try:
        peak = resolve_peak(opts.peak_tflops, device)
    except ValueError as error:
        p.error(str(error))
    print(f"bf16 peak for MFU: {peak.tflops:.1f} TFLOP/s, {peak.source}", flush=True)
    # one batch for every row, below the smallest vocabulary among them
    tokens = synthetic_batch(min(v for _, v, _ in rows), opts.batch, opts.seq, device)
    results, baseline = run_rows(rows, tokens=tokens, steps=opts.steps, warmup=opts.warmup, device=device,
                                 peak=peak, profile_dir=opts.profile, json_path=opts.json,
                                 command=tool_command("bench.py", argv))
    set_speedups(results, baseline)
    text = table(results, baseline) + f"\n\nMFU against {peak.tflops:.1f} TFLOP/s: {peak.source}."
    print()
    print(text)
    if opts.markdown:
        opts.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
