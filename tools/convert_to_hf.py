#!/usr/bin/env python
"""Export a NeoLLM checkpoint as a transformers folder (see neollm/hf/convert.py).

    python tools/convert_to_hf.py --checkpoint outputs/debug --flavor debug \
        --tokenizer assets/tokenizer/qwen3 --out exports/neollm-debug --max-seq-len 256

--checkpoint takes what tools/generate.py takes: a DCP step folder, a checkpoint or dump folder
(latest step) or a state-dict file; the vocabulary size is read from it. --flavor: a flavor
name, or the model_args.json tools/convert_from_hf.py writes beside its step folder. --max-seq-len: the
run's [training] seq_len (the RoPE table is not in the checkpoint; default: the flavor's).
The folder then loads with

    AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True); AutoTokenizer.from_pretrained(out)

and needs `pip install neollm` wherever it is loaded (its modeling code imports neollm.model).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="DCP step/checkpoint/dump folder or state-dict file")
    p.add_argument("--flavor", required=True,
                   help="model flavor the checkpoint was trained with, or a model_args.json "
                        "(as tools/convert_from_hf.py writes)")
    p.add_argument("--tokenizer", default=str(REPO / "assets" / "tokenizer" / "qwen3"),
                   help="tokenizer folder (tokenizer.json, tokenizer_config.json) of the run")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-seq-len", type=int, default=None, help="context length (default: the flavor's)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="weight dtype in model.safetensors (float32 keeps the round trip lossless)")
    p.add_argument("--overwrite", action="store_true", help="write into an existing export folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from neollm.checkpoint import load_model
    from neollm.hf.convert import export_hf, model_args_from_json

    out = Path(args.out)
    if (out / "config.json").exists() and not args.overwrite:
        raise SystemExit(f"{out} already holds an export (config.json); pass --overwrite to replace it")
    overrides = {} if args.max_seq_len is None else {"max_seq_len": args.max_seq_len}
    flavor = args.flavor
    if flavor.endswith(".json"):
        flavor = model_args_from_json(flavor)
    model = load_model(args.checkpoint, flavor, device="cpu", dtype=torch.float32, **overrides)
    export_hf(model, out, args.tokenizer, dtype=getattr(torch, args.dtype))
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters()):,} parameters, {args.dtype}); "
          f"load with AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True) "
          "(needs `pip install neollm`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
