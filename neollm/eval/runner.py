"""Run the multiple-choice tasks on a model: prompts -> loglikelihood requests -> acc / acc_norm."""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch

from neollm.eval.data import load_task
from neollm.eval.scoring import Encode, encode_pair, loglikelihoods, mc_metrics, text_nll
from neollm.eval.tasks import MCDoc, requests_for

__all__ = ["limit_docs", "evaluate_docs", "evaluate_tasks", "evaluate_text", "run_config", "summary",
           "write_samples"]

FEWSHOT_SOURCE = {"arc_easy": "ARC-Easy validation", "arc_challenge": "ARC-Challenge validation",
                  "hellaswag": "another validation item", "mmlu": "dev (first_n)"}


def limit_docs(task: str, docs: list[MCDoc], limit: int | None) -> list[MCDoc]:
    """The first ``limit`` items (for MMLU: of each subject, as lm-eval's per-subtask --limit)."""
    if limit is None:
        return docs
    if task != "mmlu":
        return docs[:limit]
    count: dict[str, int] = defaultdict(int)
    out = []
    for d in docs:
        if count[d.group] < limit:
            count[d.group] += 1
            out.append(d)
    return out


def evaluate_docs(model: torch.nn.Module, encode: Encode, task: str, docs: Sequence[MCDoc], pool: Any,
                  num_fewshot: int, max_len: int, batch_size: int = 16, prefix_id: int | None = None,
                  seed: int = 1234, pad_id: int = 0, samples: list | None = None,
                  log=None) -> dict[str, Any]:
    reqs = requests_for(task, docs, pool, num_fewshot, seed)
    shown = [0]

    def progress(done: int, total: int) -> None:  # about every 10 %
        if log is not None and total and done * 10 // total > shown[0]:
            shown[0] = done * 10 // total
            print(f"[eval] {task}: {done}/{total} requests", file=log, flush=True)

    flat, owner = [], []
    for i, (context, conts) in enumerate(reqs):
        for c in conts:
            flat.append(encode_pair(encode, context, c, prefix_id))
            owner.append(i)
    lls = loglikelihoods(model, flat, max_len, batch_size, pad_id, progress)
    per_doc: list[list[float]] = [[] for _ in docs]
    for i, (ll, _) in zip(owner, lls):
        per_doc[i].append(ll)
    totals = defaultdict(float)
    groups: dict[str, list[float]] = defaultdict(list)
    for i, doc in enumerate(docs):
        m = mc_metrics(per_doc[i], doc.choices, doc.gold)
        totals["acc"] += m["acc"]
        totals["acc_norm"] += m["acc_norm"]
        if doc.group:
            groups[doc.group].append(m["acc"])
        if samples is not None:
            samples.append({"task": task, "id": doc.id, "group": doc.group, "context": reqs[i][0],
                            "choices": reqs[i][1], "gold": doc.gold, "lls": per_doc[i], **m})
    n = max(len(docs), 1)
    res: dict[str, Any] = {"acc": totals["acc"] / n, "acc_norm": totals["acc_norm"] / n,
                           "n": len(docs), "num_fewshot": num_fewshot, "requests": len(flat)}
    # binomial standard error of the mean, as lm-eval's acc_stderr (sample std / sqrt(n))
    for key in ("acc", "acc_norm"):
        p = res[key]
        res[f"{key}_stderr"] = (p * (1 - p) / (len(docs) - 1)) ** 0.5 if len(docs) > 1 else 0.0
    if groups:
        res["subjects"] = {g: {"acc": sum(v) / len(v), "n": len(v)} for g, v in sorted(groups.items())}
    return res


def evaluate_tasks(model: torch.nn.Module, encode: Encode, tasks: Sequence[str], data_root: str | Path,
                   num_fewshot: int = 1, limit: int | None = None, max_len: int = 512,
                   batch_size: int = 16, prefix_id: int | None = None, seed: int = 1234,
                   pad_id: int = 0, samples: list | None = None, log=sys.stderr) -> dict[str, Any]:
    results = {}
    for task in tasks:
        start = time.perf_counter()
        docs, pool = load_task(data_root, task)
        docs = limit_docs(task, docs, limit)
        res = evaluate_docs(model, encode, task, docs, pool, num_fewshot, max_len, batch_size,
                            prefix_id, seed, pad_id, samples, log)
        res["seconds"] = round(time.perf_counter() - start, 2)
        results[task] = res
        if log is not None:
            print(f"[eval] {task}: acc {res['acc']:.4f} acc_norm {res['acc_norm']:.4f} "
                  f"(n={res['n']}, {res['seconds']} s)", file=log)
    return results


def evaluate_text(model: torch.nn.Module, encode: Encode, texts: Sequence[str], file: str, prefix_id: int,
                  max_len: int, batch_size: int = 16, log=sys.stderr) -> dict[str, Any]:
    """Loss and bits per byte of ``texts`` (read from ``file``), logged as one line."""
    score = text_nll(model, encode, texts, prefix_id, max_len, batch_size)
    if log is not None:
        print(f"[eval] text: loss {score.loss:.4f} bpb {score.bpb:.4f} ({score.docs} docs, "
              f"{score.tokens:,} tokens, {score.bytes:,} bytes)", file=log)
    return {"file": str(file), **score.as_dict()}


def run_config(args, device: str, max_len: int, data_root: Path | None) -> dict[str, Any]:
    """The results' ``config`` record of tools/evaluate.py's ``args``."""
    return {
        "checkpoint": str(args.checkpoint), "flavor": args.flavor, "tokenizer": str(args.tokenizer),
        "num_fewshot": args.num_fewshot, "limit": args.limit, "seed": args.seed, "device": device,
        "dtype": args.dtype, "batch_size": args.batch_size, "max_seq_len": max_len,
        "data": str(data_root) if data_root else None, "fewshot_source": dict(FEWSHOT_SOURCE),
    }


def summary(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """acc / acc_norm per task and loss / bpb of the text, rounded: the line a run ends with."""
    out = {t: {k: round(v[k], 4) for k in ("acc", "acc_norm")} for t, v in results.get("results", {}).items()}
    if "text" in results:
        out["text"] = {k: round(results["text"][k], 4) for k in ("loss", "bpb")}
    return out


def write_samples(path: str | Path, samples: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for s in samples:
            fh.write(json.dumps(s) + "\n")
