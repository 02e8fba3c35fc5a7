#!/usr/bin/env python
"""Sample text from a NeoLLM checkpoint (cached incremental decoding; see neollm/inference/).

    python tools/generate.py --checkpoint outputs/debug --flavor debug \
        --prompt "The history of" --prompt "In mathematics," --max-new-tokens 64 \
        --temperature 0.8 --top-k 50 --top-p 0.95 --seed 0

--checkpoint takes a DCP step folder (checkpoint/step-N), a checkpoint folder or a run's dump
folder (the latest step is used), or a state-dict file (.pt / .safetensors). The vocabulary
size is read from the checkpoint; --max-seq-len sets the context (default: the flavor's).
Each prompt's continuation is printed after it; timing goes to stderr.

--decode-mode picks the per-token step of cached decoding (neollm/inference/decoder.py): "auto"
(default) = "cuda_graph" on CUDA (the static-shape step captured once and replayed per token;
"dynamic" with a warning if the capture fails), "dynamic" elsewhere; "dynamic" = forward_step
per token (Python positions, launch-bound on a GPU); "eager" = the static step without a graph
(for checks); "compile" = the static step through torch.compile (+ a CUDA graph on CUDA; the
compilation takes a while). The reported time includes the capture / compilation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="DCP step/checkpoint/dump folder or state-dict file")
    p.add_argument("--flavor", required=True, help="model flavor the checkpoint was trained with")
    p.add_argument("--tokenizer", default=str(REPO / "assets" / "tokenizer" / "qwen3"),
                   help="tokenizer folder (tokenizer.json)")
    p.add_argument("--prompt", action="append", default=None, help="repeatable; default: one BOS/EOS-only prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--min-length", type=int, default=0, help="new tokens before EOS is allowed")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-eos-stop", action="store_true", help="do not stop at the tokenizer's EOS")
    p.add_argument("--no-cache", action="store_true", help="full forward per token (slow; for checks)")
    p.add_argument("--decode-mode", choices=("auto", "dynamic", "eager", "cuda_graph", "compile"), default="auto",
                   help="cached decoding step: auto = cuda_graph on CUDA, dynamic elsewhere (see above)")
    p.add_argument("--kernels", "--gdn-kernels", dest="kernels", choices=("auto", "fla", "torch"), default="auto",
                   help="recurrent mixers' decode kernels (Gated DeltaNet, ...): auto = fla on CUDA, "
                        "torch references elsewhere")
    p.add_argument("--max-seq-len", type=int, default=None, help="context length (default: the flavor's)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from neollm.checkpoint import load_model
    from neollm.inference import SamplingConfig
    from neollm.inference.text import generate_text
    from neollm.tokenizer import NeoLLMTokenizer, _tokenizer_dir, check_covers

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = NeoLLMTokenizer(str(_tokenizer_dir(args.tokenizer)))
    overrides = {} if args.max_seq_len is None else {"max_seq_len": args.max_seq_len}
    model = load_model(args.checkpoint, args.flavor, device=device,
                       dtype=getattr(torch, args.dtype), **overrides)
    try:
        check_covers(tokenizer, model.model_args.vocab_size)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    cfg = SamplingConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_length=args.min_length, repetition_penalty=args.repetition_penalty,
        seed=args.seed, eos_id=None if args.no_eos_stop else tokenizer.eos_id,
        use_cache=not args.no_cache, decode_mode=args.decode_mode,
    )
    cfg.validate()
    texts = args.prompt or [""]
    continuations, n, elapsed, mode = generate_text(model, tokenizer, texts, cfg, args.kernels, device)
    for text, new in zip(texts, continuations):
        print(text + new)
        print("-" * 40)
    print(f"{n} new tokens in {elapsed:.2f}s ({n / max(elapsed, 1e-9):.1f} tokens/s, {device}, "
          f"{mode})", file=sys.stderr)
    return 0

if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as exc:  # bad checkpoint / flavor / tokenizer / prompt
        sys.exit(f"error: {exc}")
