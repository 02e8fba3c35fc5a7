"""Loss + head cost: Cut Cross-Entropy vs compiled logits + cross-entropy vs our chunked paths.

Times forward + backward of the loss from the final hidden states [batch * seq, dim] and the tied
head weight [vocab, dim] (bf16, gradients to both), and the peak memory it adds above its inputs,
for each vocabulary. One process, one device, every method side by side.

    python tools/bench_loss.py --vocabs 64402,151665 --batch 64 --seq 512 --dim 512
    python tools/bench_loss.py --vocabs 64402,151680 --chunk-kernel   # the softmax step alone

``--chunk-kernel`` times only the fused loss's per-chunk softmax / gradient step on [4,096 x
vocab padded to 64] bf16 logits: the compiled torch function against the Triton kernel
(neollm/loss/kernel.py) at several launch shapes, with their largest differences.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import neollm  # noqa: F401
from neollm.loss.fused_linear_ce import fused_linear_cross_entropy_sum
from neollm.loss import IGNORE_INDEX, LossSettings, linear_cross_entropy_sum


def torch_logits_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """What torchtitan's trainer does: materialise the logits, fp32 cross-entropy."""
    return F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum")


def methods() -> dict:
    compiled = torch.compile(torch_logits_ce)
    return {
        "cce (exact, filter_eps=None)": lambda h, w, t: linear_cross_entropy_sum(h, w, t, LossSettings(impl="cce")),
        "torch logits + CE (compiled)": compiled,
        "torch logits + CE (eager)": torch_logits_ce,
        "fused 4096 (gradient in forward, vocab padded to 64)": lambda h, w, t: linear_cross_entropy_sum(
            h, w, t, LossSettings(impl="fused", chunk_size=4096)),
        "fused 8192 (gradient in forward, vocab padded to 64)": lambda h, w, t: linear_cross_entropy_sum(
            h, w, t, LossSettings(impl="fused", chunk_size=8192)),
        # the same two without the padding (the path before it), to measure what the alignment buys
        "fused 4096 unpadded (vocab_multiple=1)": lambda h, w, t: fused_linear_cross_entropy_sum(
            h, w, t, 0.0, 4096, IGNORE_INDEX, vocab_multiple=1),
        "fused 8192 unpadded (vocab_multiple=1)": lambda h, w, t: fused_linear_cross_entropy_sum(
            h, w, t, 0.0, 8192, IGNORE_INDEX, vocab_multiple=1),
        "logits (NeoLLM's impl, compiled)": lambda h, w, t: linear_cross_entropy_sum(h, w, t, LossSettings(impl="logits")),
        "chunked 4096 (recompute in backward)": lambda h, w, t: linear_cross_entropy_sum(
            h, w, t, LossSettings(impl="chunked", chunk_size=4096)),
    }


def measure(fn, hidden, weight, targets, steps: int, warmup: int) -> tuple[float, float, float]:
    """(ms per fwd+bwd, peak GiB above the inputs, loss)."""
    for _ in range(warmup):
        fn(hidden, weight, targets).backward()
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = fn(hidden, weight, targets)
        loss.backward()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / steps * 1e3
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    hidden.grad = weight.grad = None
    return ms, peak, float(loss.detach()) / targets.numel()


def chunk_kernel_rows(vocab: int, rows: int = 4096, z_loss: float = 1e-4) -> list[dict]:
    """The chunk step alone: compiled torch vs the Triton kernel at several (block, warps)."""
    from bench_attention import time_ms  # tools/ is on sys.path when this runs as a script

    from neollm.loss.fused_linear_ce import _chunk_loss_and_grad
    from neollm.loss import kernel as cross_entropy

    cols = -(-vocab // 64) * 64
    torch.manual_seed(0)
    logits = (3 * torch.randn(rows, cols, device="cuda")).bfloat16()
    logits[:, vocab:] = 0
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    targets[::9] = IGNORE_INDEX
    compiled = torch.compile(_chunk_loss_and_grad, dynamic=False)
    want_loss, want_grad = compiled(logits, targets, z_loss, IGNORE_INDEX, vocab)
    gbytes = rows * cols * logits.element_size() * 2 / 1e9  # one read + one write
    ms = time_ms(lambda: compiled(logits, targets, z_loss, IGNORE_INDEX, vocab))
    out = [dict(vocab=vocab, method="compiled torch", ms=ms, tb_s=gbytes / ms, max_grad_diff=0.0)]
    work = logits.clone()
    shapes = [(2048, 8), (4096, 8), (4096, 16), (8192, 16), (8192, 32), (16384, 32), cross_entropy.launch_shape(cols)]
    for block, warps in dict.fromkeys(shapes):
        work.copy_(logits)
        loss, grad = cross_entropy.loss_and_grad_(work, targets, z_loss, IGNORE_INDEX, vocab, block=block,
                                                  num_warps=warps)
        diff = (grad.float() - want_grad.float()).abs().max().item()
        loss_diff = abs(loss.item() - want_loss.item()) / abs(want_loss.item())
        ms = time_ms(lambda: cross_entropy.loss_and_grad_(work, targets, z_loss, IGNORE_INDEX, vocab,
                                                          block=block, num_warps=warps))
        out.append(dict(vocab=vocab, method=f"triton block {block} warps {warps}", ms=ms, tb_s=gbytes / ms,
                        max_grad_diff=diff, rel_loss_diff=loss_diff))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocabs", default="64402,151665")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--methods", default="",
                   help="comma list of substrings: only the methods whose name contains one (default all)")
    p.add_argument("--chunk-kernel", action="store_true",
                   help="time only the per-chunk softmax step: compiled torch vs the Triton kernel")
    p.add_argument("--json", type=Path)
    opts = p.parse_args(argv)
    wanted = [m for m in opts.methods.split(",") if m]
    if not torch.cuda.is_available():
        p.error("needs a CUDA device (Cut Cross-Entropy is Triton)")
    # fused's compiled chunk function is specialised per (chunk shape, vocab): 4 variants a vocabulary
    # here (2 chunk sizes, padded or not), which past dynamo's default 8 would fall back to eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if opts.chunk_kernel:
        rows = []
        print("| vocab | chunk step | ms | TB/s (1 read + 1 write) | max grad diff |\n|---|---|---|---|---|")
        for vocab in (int(v) for v in opts.vocabs.split(",")):
            for row in chunk_kernel_rows(vocab):
                rows.append(row)
                print(f"| {vocab:,} | {row['method']} | {row['ms']:.3f} | {row['tb_s']:.2f} | "
                      f"{row['max_grad_diff']:.1e} |", flush=True)
        if opts.json:
            opts.json.write_text(json.dumps(rows, indent=2))
        return 0
    rows = []
    print("| vocab | method | fwd+bwd ms | peak GiB above inputs | loss/token |\n|---|---|---|---|---|", flush=True)
    for vocab in (int(v) for v in opts.vocabs.split(",")):
        torch.manual_seed(0)
        n = opts.batch * opts.seq
        hidden = (torch.randn(n, opts.dim, device="cuda") * 0.5).bfloat16().requires_grad_()
        weight = (torch.randn(vocab, opts.dim, device="cuda") * 0.02).bfloat16().requires_grad_()
        targets = torch.randint(0, vocab, (n,), device="cuda")
        for name, fn in methods().items():
            if wanted and not any(m in name for m in wanted):
                continue
            try:
                ms, peak, loss = measure(fn, hidden, weight, targets, opts.steps, opts.warmup)
            except torch.OutOfMemoryError:
                ms = peak = loss = float("nan")
                torch.cuda.empty_cache()
            rows.append(dict(vocab=vocab, method=name, ms=ms, peak_gib=peak, loss=loss))
            print(f"| {vocab:,} | {name} | {ms:.2f} | {peak:.2f} | {loss:.4f} |", flush=True)
        del hidden, weight, targets
        torch.cuda.empty_cache()
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
