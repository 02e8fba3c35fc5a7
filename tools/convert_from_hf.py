#!/usr/bin/env python
"""Turn an exported transformers folder back into a DCP checkpoint to fine-tune or resume from.

    python tools/convert_from_hf.py --hf exports/neollm-debug --out ckpt/neollm-debug
    # -> ckpt/neollm-debug/step-0 (model only, float32) and ckpt/neollm-debug/model_args.json

The step folder has the keys torchtitan's CheckpointManager saves for the model (the flat
NeoLLM state dict: tok_embeddings.weight, layers.N...., norm.weight). Train from it with

    ./run_train.sh --job.config_file <flavor's toml> --checkpoint.initial_load_path ckpt/neollm-debug/step-0

(torchtitan loads it model-only by default; the run's own checkpoint folder must not exist yet),
or copy step-0 into the run's <dump_folder>/checkpoint/ (torchtitan loads step 0 model-only).
A step above 0 (--step) is loaded as a full training state unless the run sets
[checkpoint] exclude_from_loading = ["optimizer", "lr_scheduler", "dataloader", "train_state"].
"""

from __future__ import annotations

import argparse
import sys



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="exported folder (config.json + model.safetensors)")
    p.add_argument("--out", required=True, help="checkpoint folder; step-<step> is written inside")
    p.add_argument("--step", type=int, default=0, help="step number of the folder (default 0: model-only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing step folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from neollm.hf.convert import hf_to_dcp, matching_flavor

    target, model_args = hf_to_dcp(args.hf, args.out, step=args.step, overwrite=args.overwrite)
    flavor = matching_flavor(model_args)
    hint = (f"flavor {flavor!r}" if flavor else "no named flavor (see model_args.json)")
    print(f"wrote {target}: {hint}, vocab_size {model_args.vocab_size}, max_seq_len "
          f"{model_args.max_seq_len}; train with --checkpoint.initial_load_path {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
