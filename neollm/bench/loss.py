"""Loss + head cost measurements behind tools/bench_loss.py (its docstring says what is timed): every
loss method on the same hidden states and tied head, and the fused loss's chunk step alone.
"""

from __future__ import annotations

import time
from typing import Iterable

import torch
import torch.nn.functional as F

from neollm.bench.timing import time_ms
from neollm.loss import IGNORE_INDEX, LossSettings, linear_cross_entropy_sum
from neollm.loss.fused_linear_ce import fused_linear_cross_entropy_sum


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


def chunk_kernel_table(vocabs: Iterable[int]) -> list[dict]:
    """``chunk_kernel_rows`` for each vocabulary, each row printed as a markdown line when measured."""
    rows = []
    print("| vocab | chunk step | ms | TB/s (1 read + 1 write) | max grad diff |\n|---|---|---|---|---|")
    for vocab in vocabs:
        for row in chunk_kernel_rows(vocab):
            rows.append(row)
            print(f"| {vocab:,} | {row['method']} | {row['ms']:.3f} | {row['tb_s']:.2f} | "
                  f"{row['max_grad_diff']:.1e} |", flush=True)
    return rows


def method_table(vocabs: Iterable[int], batch: int, seq: int, dim: int, steps: int, warmup: int,
                 wanted: list[str] = ()) -> list[dict]:
    """Every method of ``methods()`` (those whose name contains one of ``wanted``, when given) at each
    vocabulary, on one seeded batch per vocabulary; each row printed as a markdown line when measured.
    A method that runs out of memory gets NaN."""
    rows = []
    print("| vocab | method | fwd+bwd ms | peak GiB above inputs | loss/token |\n|---|---|---|---|---|", flush=True)
    for vocab in vocabs:
        torch.manual_seed(0)
        n = batch * seq
        hidden = (torch.randn(n, dim, device="cuda") * 0.5).bfloat16().requires_grad_()
        weight = (torch.randn(vocab, dim, device="cuda") * 0.02).bfloat16().requires_grad_()
        targets = torch.randint(0, vocab, (n,), device="cuda")
        for name, fn in methods().items():
            if wanted and not any(m in name for m in wanted):
                continue
            try:
                ms, peak, loss = measure(fn, hidden, weight, targets, steps, warmup)
            except torch.OutOfMemoryError:
                ms = peak = loss = float("nan")
                torch.cuda.empty_cache()
            rows.append(dict(vocab=vocab, method=name, ms=ms, peak_gib=peak, loss=loss))
            print(f"| {vocab:,} | {name} | {ms:.2f} | {peak:.2f} | {loss:.4f} |", flush=True)
        del hidden, weight, targets
        torch.cuda.empty_cache()
    return rows
