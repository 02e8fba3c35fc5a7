"""Activation memory that a NeoLLM flavor keeps for backward, per technique, on the CPU.

Why: a GPU's peak memory mixes weights, optimizer state, allocator caching and activations, and
needs the GPU. What a technique adds is mostly the tensors autograd keeps between forward and
backward. This tool counts them: every tensor saved for backward in one forward pass (through
``torch.autograd.graph.saved_tensors_hooks``, storages counted once), with each block compiled
(inductor, as in training: the compiler's partitioner decides what is kept) or eager. It builds
``--layers`` blocks at ``--batch`` x ``--seq`` tokens and scales the result to the flavor's layer
count and to ``--scale-batch`` sequences. ``--ablate`` repeats it with each technique of the
flavor switched off.

    python tools/bench_memory.py --flavor neollm_135m --ablate
    python tools/bench_memory.py --flavor neollm_135m --no-compile --batch 1 --seq 256

Everything runs in fp32 (LUCID's solve has no bf16 CPU kernel), so bf16 activations are counted at
twice their GPU size; the loss's logits are not counted (the fused loss frees them chunk by chunk).
Tensors kept outside the blocks (embedding output, final norm,
the loss's input) are scaled with the blocks, so the absolute figure is a little high. Use it to
compare variants, not as a GPU peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch


from neollm.model.args import FLAVORS, NeoLLMModelArgs
from neollm.model.model import NeoLLM
from neollm.model.params import technique_switches
from neollm.parallelize import compile_blocks


def saved_bytes(args: NeoLLMModelArgs, batch: int, seq: int, compiled: bool) -> int:
    """Bytes of the storages autograd keeps for backward after one forward pass of ``args``,
    the model's parameters and buffers left out."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = NeoLLM(args)
    model.init_weights()
    if compiled:
        compile_blocks(model, "inductor")
    tokens = torch.randint(0, args.vocab_size, (batch, seq))
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:  # weights and buffers do not grow with the batch
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(tokens, tokens)
    del loss
    return sum(storages.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="neollm_135m", choices=sorted(FLAVORS))
    p.add_argument("--layers", type=int, default=2, help="blocks actually built (scaled to the flavor's count)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--scale-batch", type=int, default=64, help="report for this many sequences")
    p.add_argument("--no-compile", action="store_true", help="eager: what autograd keeps without the compiler")
    p.add_argument("--ablate", action="store_true", help="also each technique switched off alone")
    opts = p.parse_args(argv)
    flavor = FLAVORS[opts.flavor]
    if not 1 <= opts.layers <= flavor.n_layers:
        print(f"error: --layers must be in 1..{flavor.n_layers} for {opts.flavor}", file=sys.stderr)
        return 2
    if opts.seq > flavor.max_seq_len:
        print(f"error: --seq {opts.seq} is over {opts.flavor}'s max_seq_len {flavor.max_seq_len}", file=sys.stderr)
        return 2
    base = dataclasses.replace(flavor, n_layers=opts.layers)
    scale = (opts.scale_batch / opts.batch) * (flavor.n_layers / opts.layers) / 2**30
    mode = "eager" if opts.no_compile else "compiled (inductor)"
    print(f"# Activations kept for backward: {opts.flavor}, {mode}, fp32, scaled to "
          f"{opts.scale_batch} x {opts.seq} tokens and {flavor.n_layers} layers\n")
    print("| variant | GiB | vs all on |\n|---|---:|---:|")
    total = saved_bytes(base, opts.batch, opts.seq, not opts.no_compile) * scale
    print(f"| {opts.flavor} | {total:.2f} | |", flush=True)
    if opts.ablate:
        for name, off in technique_switches(base).items():
            if getattr(base, name) == off:
                continue
            value = saved_bytes(dataclasses.replace(base, **{name: off}), opts.batch, opts.seq,
                                not opts.no_compile) * scale
            print(f"| - {name} | {value:.2f} | {value - total:+.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
