"""Loglikelihood scoring as lm-evaluation-harness does it, and loss / bits-per-byte on text.

Multiple choice (lm-eval's ``output_type: multiple_choice``)
------------------------------------------------------------
Each choice becomes one request ``(context, target_delimiter + choice)`` (delimiter " ").
``encode_pair`` tokenises it as lm-eval's ``TemplateLM._encode_pair``: trailing whitespace of
the context moves to the front of the continuation, then ``whole = encode(context +
continuation)``, ``ctx = encode(context)`` and the continuation tokens are ``whole[len(ctx):]``
(so a merge across the boundary is tokenised as in the full text). An empty context is replaced
by one prefix token (lm-eval uses the EOT/BOS id). No special tokens are added otherwise (lm-eval's
default for causal HF models without ``add_bos_token``).

``loglikelihoods`` runs the model on ``(ctx + cont)[-(max_len + 1):][:-1]`` (left truncation, as
lm-eval's HFLM) and sums ``log_softmax(logits)[pos, token]`` over the continuation tokens; it also
reports ``is_greedy`` (every continuation token is the argmax). Requests with the same
model input share one row (lm-eval groups one-token continuations of one context likewise). Rows
are sorted by length (longest first) and right-padded into batches: the model is causal, so padding after a sequence
cannot change the logits at its positions.

Metrics, as lm-eval's ``ConfigurableTask.process_results``:
* ``acc``      = [argmax_i ll_i == gold]
* ``acc_norm`` = [argmax_i ll_i / len(choice_i) == gold], ``len`` = the number of *characters*
  of the choice string (Python ``len(str)``, without the leading delimiter). lm-eval calls this
  length normalisation; it is characters, not UTF-8 bytes (they coincide for ASCII text).
Ties go to the lowest index (``np.argmax``).

Text: loss and bits per byte
----------------------------
Each document is scored as lm-eval's ``loglikelihood_rolling``: tokens ``[prefix] + encode(text)``,
every text token predicted, in disjoint windows of ``max_len`` predictions (each window conditioned
only on itself plus the last token of the previous window). ``loss`` = total NLL / tokens (nats per
token); ``bpb`` = total NLL (nats) / ln 2 / total UTF-8 bytes of the texts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

Encode = Callable[[str], list[int]]

__all__ = [
    "encode_pair", "loglikelihoods", "mc_metrics", "rolling_windows", "text_nll", "TextScore",
    "bits_per_byte",
]


def encode_pair(encode: Encode, context: str, continuation: str,
                prefix_id: int | None = None) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair``: (context ids, continuation ids)."""
    if not context:
        if prefix_id is None:
            raise ValueError("an empty context needs a prefix token id (lm-eval uses EOT/BOS)")
        return [prefix_id], encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx):]


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _logits_at(model: torch.nn.Module, tokens: torch.Tensor,
               positions: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits of row ``j`` at ``positions[j]`` only. For a NeoLLM the output head (vocab x dim, the
    largest matmul of a small model with a 151k vocabulary) runs on those rows alone; the trunk is
    ``NeoLLM.forward``'s (embeddings, blocks, final norm). Other modules: the full forward."""
    if all(hasattr(model, a) for a in ("tok_embeddings", "layers", "norm", "head_weight", "rope")):
        if tokens.shape[1] > model.model_args.max_seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds the model's max_seq_len "
                             f"{model.model_args.max_seq_len}")
        h = model.tok_embeddings(tokens)
        for block in model.layers.values():
            h = block(h, model.rope)
        h = model.norm(h)
        w = model.head_weight()
        return [F.linear(h[j, pos], w) for j, pos in enumerate(positions)]
    logits = model(tokens)
    return [logits[j, pos] for j, pos in enumerate(positions)]


@torch.no_grad()
def loglikelihoods(model: torch.nn.Module, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                   max_len: int, batch_size: int = 16, pad_id: int = 0,
                   progress: Callable[[int, int], None] | None = None) -> list[tuple[float, bool]]:
    """(sum of continuation logprobs, is_greedy) per (context ids, continuation ids) request."""
    device = _model_device(model)
    # requests with the same model input (e.g. MMLU's " A"/" B"/" C"/" D" after one context) share
    # one row, as lm-eval's one-token-continuation grouping: same logits, computed once
    groups: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise ValueError(f"request {i} has an empty continuation")
        if len(cont) > max_len:
            raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds the context {max_len}")
        full = (list(ctx) + list(cont))[-(max_len + 1):]
        groups.setdefault(tuple(full[:-1]), []).append((i, len(cont)))
    rows = sorted(groups.items(), key=lambda r: (-len(r[0]), r[1][0][0]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    done = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = len(chunk[0][0])
        batch = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for j, (inp, _) in enumerate(chunk):
            batch[j, :len(inp)] = torch.tensor(inp, dtype=torch.long)
        # the last n input positions predict the n continuation tokens
        n_max = [max(n for _, n in members) for _, members in chunk]
        positions = [torch.arange(len(inp) - n, len(inp), device=device) for (inp, _), n in zip(chunk, n_max)]
        logits = _logits_at(model, batch.to(device), positions)
        for j, (inp, members) in enumerate(chunk):
            logp_all = F.log_softmax(logits[j].float(), dim=-1)
            for i, n in members:
                cont = torch.tensor(requests[i][1], dtype=torch.long, device=device)
                logp = logp_all[n_max[j] - n:]
                ll = logp.gather(-1, cont[:, None]).sum().item()
                greedy = bool((logp.argmax(-1) == cont).all())
                out[i] = (ll, greedy)
            done += len(members)
        if progress is not None:
            progress(done, len(requests))
    return out


def mc_metrics(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """lm-eval's multiple-choice acc and acc_norm (character-length normalised) for one item."""
    if len(lls) != len(choices):
        raise ValueError(f"{len(lls)} loglikelihoods for {len(choices)} choices")
    pred = max(range(len(lls)), key=lambda i: (lls[i], -i))
    normed = [ll / float(len(c)) for ll, c in zip(lls, choices)]
    pred_norm = max(range(len(normed)), key=lambda i: (normed[i], -i))
    return {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold),
            "pred": pred, "pred_norm": pred_norm}


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    return nll_nats / math.log(2) / n_bytes


def rolling_windows(ids: Sequence[int], prefix_id: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(input, target) windows covering every token of ``ids`` (lm-eval's rolling windows with
    context length 1): inputs ``([prefix] + ids)[s : s + L]``, targets ``ids[s : s + L]``."""
    seq = [prefix_id] + list(ids)
    n = len(ids)
    return [(seq[s:min(s + max_len, n)], seq[s + 1:s + 1 + max_len]) for s in range(0, n, max_len)]


@dataclass
class TextScore:
    nll: float = 0.0      # nats, summed over all predicted tokens
    tokens: int = 0
    bytes: int = 0
    docs: int = 0

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def bpb(self) -> float:
        return bits_per_byte(self.nll, self.bytes) if self.bytes else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "bpb": self.bpb, "perplexity": math.exp(min(self.loss, 700.0)),
                "nll_nats": self.nll, "tokens": self.tokens, "bytes": self.bytes, "docs": self.docs}


@torch.no_grad()
def text_nll(model: torch.nn.Module, encode: Encode, texts: Iterable[str], prefix_id: int,
             max_len: int, batch_size: int = 16, pad_id: int = 0) -> TextScore:
    """Total NLL of ``texts`` (every token, rolling windows) with token and UTF-8 byte counts."""
    device = _model_device(model)
    score = TextScore()
    windows: list[tuple[list[int], list[int]]] = []

    def flush() -> None:
        windows.sort(key=lambda w: -len(w[0]))
        for start in range(0, len(windows), batch_size):
            chunk = windows[start:start + batch_size]
            width = len(chunk[0][0])
            inp = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            for j, (x, _) in enumerate(chunk):
                inp[j, :len(x)] = torch.tensor(x)
            positions = [torch.arange(len(x), device=device) for x, _ in chunk]
            for logits, (_, y) in zip(_logits_at(model, inp.to(device), positions), chunk):
                score.nll += F.cross_entropy(logits.float(), torch.tensor(y, device=device),
                                             reduction="sum").item()
        windows.clear()

    for text in texts:
        ids = encode(text)
        if not ids:
            continue
        score.docs += 1
        score.tokens += len(ids)
        score.bytes += len(text.encode("utf-8"))
        windows.extend(rolling_windows(ids, prefix_id, max_len))
        if len(windows) >= 64 * batch_size:
            flush()
    flush()
    return score
