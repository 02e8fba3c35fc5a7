"""Running the static decode step (``static_step``, neollm/inference/step.py) fast: eager, CUDA graph
or torch.compile.

``StaticDecoder(model, batch, max_len, mode)`` owns one cache (every tensor allocated up front),
a token buffer [B, 1] and the position as an int64 tensor [1] on the model's device. A sequence
is ``prefill(prompt)`` (the dynamic ``forward_step`` over the prompt, writing into the
decoder's cache in place) then ``step(tokens)`` per new token. Modes:

* ``"eager"``: the static step called from Python each token (any device; the tests use it).
  On a GPU it is as launch-bound as the dynamic path: for checks, not for speed.
* ``"cuda_graph"``: on construction the step (plus the position increment) runs ``warmup``
  times on a side stream (cuBLAS / Triton set-up, fla's kernel compiled), is captured once
  into a ``torch.cuda.CUDAGraph``, and the cache is reset. ``step`` copies the tokens into the
  static buffer and calls ``replay()``: one launch per token instead of thousands.
* ``"compile"``: the step compiled by ``torch.compile(dynamic=False)`` (default mode, inductor;
  ``compile_backend`` to change), then on CUDA captured into a CUDA graph exactly as
  ``"cuda_graph"`` (fewer, fused kernels inside the graph). fla's kernel is a graph break
  (``_fla_recurrence`` in neollm/model/mixers/deltanet.py is ``torch.compiler.disable``-d),
  which the manual graph capture does not mind. Chosen over ``mode="reduce-overhead"`` (CUDA-graph trees) because the
  step mutates cache tensors that are not module buffers, which the trees would need marked as
  static addresses; one capture path serves both modes. On CPU the compiled step runs without
  a graph. Compilation happens on the first step (CPU) or in the construction's warm-up (CUDA),
  once per (batch, max_len, dtype): the position is a tensor, so it never recompiles.

Sampling stays outside the graph (it draws from a torch.Generator). In the graph modes the
logits returned by ``step`` are the graph's static output, overwritten by the next step.
``DecoderPool`` keeps decoders (and their graphs) for reuse across ``generate`` calls.
tools/bench_generate.py measures the modes' speed (BENCHMARKS.md, docs/generation.md).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from neollm.inference.cache import allocate_cache, new_cache
from neollm.inference.sampling import DECODE_MODES
from neollm.inference.step import forward_step, static_step
from neollm.model.model import NeoLLM

__all__ = ["STATIC_MODES", "StaticDecoder", "DecoderPool", "resolve_decode_mode", "weights_signature"]

STATIC_MODES = DECODE_MODES[2:]  # ("eager", "cuda_graph", "compile"); DECODE_MODES adds "auto", "dynamic"


def resolve_decode_mode(mode: str, device: torch.device | str) -> str:
    """``"auto"`` -> ``"cuda_graph"`` on CUDA, ``"dynamic"`` (``forward_step`` per token) elsewhere;
    refuses a mode that cannot run on ``device``."""
    device = torch.device(device)
    if mode not in DECODE_MODES:
        raise ValueError(f"decode_mode must be one of {', '.join(DECODE_MODES)}; got {mode!r}")
    if mode == "auto":
        return "cuda_graph" if device.type == "cuda" else "dynamic"
    if mode == "cuda_graph" and device.type != "cuda":
        raise ValueError(f"decode_mode 'cuda_graph' needs a model on a CUDA device (this one is on {device}); "
                         "use 'dynamic' or 'eager' (or 'compile', which runs without a graph off CUDA)")
    return mode


def weights_signature(model: NeoLLM) -> tuple:
    """Addresses and dtypes of the model's tensors: a captured graph reads them by address."""
    return tuple((t.data_ptr(), t.dtype) for t in (*model.parameters(), *model.buffers()))


class StaticDecoder:
    """One cache for ``batch`` sequences of up to ``max_len`` positions, and the static step run
    in ``mode`` (see the module docstring). Reusable: each ``prefill`` starts a new sequence."""

    def __init__(self, model: NeoLLM, batch: int, max_len: int, mode: str = "eager",
                 kernels: str = "auto", compile_backend="inductor", warmup: int = 2) -> None:
        if mode not in STATIC_MODES:
            raise ValueError(f"StaticDecoder mode must be one of {', '.join(STATIC_MODES)}; got {mode!r} "
                             "(the dynamic path is forward_step)")
        if model.training:
            raise ValueError("the static decoder needs model.eval() (dropout is not cached)")
        weight = model.tok_embeddings.weight
        self.device = weight.device
        resolve_decode_mode(mode, self.device)  # refuses cuda_graph off CUDA
        self.model, self.mode, self.batch = model, mode, batch
        self.cache = new_cache(model, max_len, kernels)  # refuses mixers without a step / max_len > context
        allocate_cache(model, self.cache, batch, weight.dtype, self.device)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.signature = weights_signature(model)
        self._fn = self._run
        if mode == "compile":
            self._fn = torch.compile(self._run, backend=compile_backend, dynamic=False)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._logits: Tensor | None = None
        if mode != "eager" and self.device.type == "cuda":
            self._capture(warmup)

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def _run(self) -> Tensor:
        """The captured / compiled region: one token at ``pos``, then ``pos += 1``."""
        logits = static_step(self.model, self.tokens, self.pos, self.cache)
        self.pos.add_(1)
        return logits

    def _capture(self, warmup: int) -> None:
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(max(warmup, 1)):  # kernels compiled / tuned, workspaces allocated
                self._fn()
                self.pos.zero_()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            self._logits = self._fn()
        self._graph = graph
        self.reset()  # the warm-up wrote into the cache

    def reset(self) -> None:
        """Zero the cache and the position in place (a new sequence)."""
        self.cache.reset()
        self.pos.zero_()

    @torch.no_grad()
    def prefill(self, prompt: Tensor) -> Tensor:
        """Start a sequence: the dynamic forward over ``prompt`` [B, P]; last position's logits [B, vocab]."""
        B, P = prompt.shape
        if B != self.batch:
            raise ValueError(f"this decoder was built for a batch of {self.batch}, got {B}")
        self.reset()
        logits = forward_step(self.model, prompt, self.cache)[:, -1]
        self.pos.fill_(P)
        return logits

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        """Feed ``tokens`` [B] (or [B, 1]) at the next position; logits [B, vocab]. In the graph
        modes the result is the graph's static output: overwritten by the next step."""
        if self.cache.pos >= self.cache.max_len:
            raise ValueError(f"the decoder's {self.cache.max_len} positions are used up; build it with a larger max_len")
        self.tokens.copy_(tokens.reshape(self.batch, 1))
        if self._graph is not None:
            self._graph.replay()
            logits = self._logits
        else:
            logits = self._fn()
        self.cache.pos += 1
        return logits


class DecoderPool:
    """Reuse of ``StaticDecoder``s (their caches, graphs, compiled steps) across ``generate``
    calls: keyed by model, mode, batch, max_len and kernels, the ``size`` most recently used
    are kept. A decoder whose model tensors have moved or changed dtype since its capture
    (``model.to(...)``, a replaced parameter) is rebuilt; in-place weight updates are seen."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._entries: OrderedDict[tuple, StaticDecoder] = OrderedDict()

    def get(self, model: NeoLLM, batch: int, max_len: int, mode: str, kernels: str = "auto") -> StaticDecoder:
        key = (id(model), mode, batch, max_len, kernels)
        dec = self._entries.pop(key, None)
        if dec is not None and (dec.model is not model or dec.signature != weights_signature(model)):
            dec = None  # stale: released before its replacement is built
        if dec is None:
            dec = StaticDecoder(model, batch, max_len, mode, kernels)
        self._entries[key] = dec
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return dec

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
