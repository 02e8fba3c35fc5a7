"""AdEMAMix (Pagliardini, Ablin, Grangier, arXiv 2409.03033), as in the official PyTorch code
(github.com/apple/ml-ademamix, ``pytorch/ademamix.py``).

Per parameter, at step t = 1, 2, ...::

    m1 = b1 m1 + (1 - b1) g                   fast EMA (dropped when b1 = 0: m1 = g)
    m2 = b3(t) m2 + (1 - b3(t)) g             slow EMA, NOT bias-corrected
    v  = b2 v + (1 - b2) g^2
    u  = (m1 / (1 - b1^t) + alpha(t) m2) / (sqrt(v) / sqrt(1 - b2^t) + eps) + wd * theta
    theta = theta - lr * u                    (decoupled weight decay, scaled by lr as in AdamW)

Warm-ups (each off when its length is 0): alpha(t) = alpha * min(t / t_alpha, 1);
b3(t) interpolates linearly in half-life space from b1 to b3 over t_beta3 steps:
f(b) = ln(0.5) / ln(b + 1e-8) - 1, b3(t) = 0.5 ** (1 / ((1 - a) f(b1) + a f(b3) + 1)),
a = t / t_beta3 (b3 itself once t >= t_beta3).

Everything is elementwise, so FSDP2-sharded DTensor parameters are updated shard-locally
(no communication). State per parameter: ``step`` (0-d float32 tensor), ``exp_avg_fast``
(absent when b1 = 0), ``exp_avg_slow``, ``exp_avg_sq``: 3 tensors of the parameter's size
(1.5x AdamW's memory).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable

import torch
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from neollm.optim.hyperparameters import check_common


def alpha_at(step: int, alpha: float, t_alpha: int) -> float:
    """alpha(t): linear warm-up from 0 over ``t_alpha`` steps (official linear_warmup_scheduler)."""
    if t_alpha and step < t_alpha:
        a = step / float(t_alpha)
        return a * alpha
    return alpha


def _half_life(beta: float, eps: float = 1e-8) -> float:
    return math.log(0.5) / math.log(beta + eps) - 1


def beta3_at(step: int, beta1: float, beta3: float, t_beta3: int) -> float:
    """b3(t): half-life-linear warm-up from b1 to b3 (official linear_hl_warmup_scheduler)."""
    if t_beta3 and step < t_beta3:
        a = step / float(t_beta3)
        return math.pow(0.5, 1 / ((1.0 - a) * _half_life(beta1) + a * _half_life(beta3) + 1))
    return beta3


class AdEMAMix(Optimizer):
    """AdEMAMix. ``foreach=True`` batches the elementwise math with ``torch._foreach_*`` ops
    (same formulas; last-bit rounding may differ from the single-tensor loop)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 2.0,
        t_alpha: int = 0,
        t_beta3: int = 0,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        foreach: bool = True,
    ) -> None:
        check_common("AdEMAMix", lr, eps, betas, weight_decay)
        if alpha < 0.0:
            raise ValueError(f"AdEMAMix: invalid alpha {alpha}")
        if t_alpha < 0 or t_beta3 < 0:
            raise ValueError(f"AdEMAMix: t_alpha/t_beta3 must be >= 0, got {t_alpha}/{t_beta3}")
        defaults = dict(lr=lr, betas=tuple(betas), alpha=alpha, t_alpha=int(t_alpha),
                        t_beta3=int(t_beta3), eps=eps, weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults)

    def _init_state(self, p: torch.Tensor, beta1: float) -> dict:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            if beta1 != 0.0:
                state["exp_avg_fast"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_slow"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            beta1 = group["betas"][0]
            # Bucket by step (normally one bucket) and tensor kind, for the foreach path.
            buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdEMAMix does not support sparse gradients")
                state = self._init_state(p, beta1)
                state["step"] += 1
                step = int(state["step"].item())
                if group["foreach"]:
                    mesh = p.device_mesh if isinstance(p, DTensor) else None
                    buckets[(step, mesh, p.device, p.dtype)].append(p)
                else:
                    self._update_single(p, state, step, group)
            for (step, *_), params in buckets.items():
                self._update_foreach(params, step, group)
        return loss

    def _scalars(self, step: int, group: dict) -> tuple[float, float, float, float]:
        beta1, beta2, beta3_final = group["betas"]
        alpha = alpha_at(step, group["alpha"], group["t_alpha"])
        beta3 = beta3_at(step, beta1, beta3_final, group["t_beta3"])
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        return alpha, beta3, bias_correction1, bias_correction2

    def _update_single(self, p: torch.Tensor, state: dict, step: int, group: dict) -> None:
        beta1, beta2, _ = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        alpha, beta3, bc1, bc2 = self._scalars(step, group)
        grad = p.grad
        exp_avg_slow, exp_avg_sq = state["exp_avg_slow"], state["exp_avg_sq"]
        if beta1 != 0.0:
            exp_avg_fast = state["exp_avg_fast"]
            exp_avg_fast.mul_(beta1).add_(grad, alpha=1 - beta1)
        else:
            exp_avg_fast = grad
        exp_avg_slow.mul_(beta3).add_(grad, alpha=1 - beta3)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(eps)
        update = (exp_avg_fast.div(bc1) + alpha * exp_avg_slow) / denom
        if wd != 0.0:
            update.add_(p, alpha=wd)
        p.add_(update, alpha=-lr)

    def _update_foreach(self, params: list[torch.Tensor], step: int, group: dict) -> None:
        beta1, beta2, _ = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        alpha, beta3, bc1, bc2 = self._scalars(step, group)
        grads = [p.grad for p in params]
        states = [self.state[p] for p in params]
        slow = [s["exp_avg_slow"] for s in states]
        sq = [s["exp_avg_sq"] for s in states]
        if beta1 != 0.0:
            fast = [s["exp_avg_fast"] for s in states]
            torch._foreach_mul_(fast, beta1)
            torch._foreach_add_(fast, grads, alpha=1 - beta1)
        else:
            fast = grads
        torch._foreach_mul_(slow, beta3)
        torch._foreach_add_(slow, grads, alpha=1 - beta3)
        torch._foreach_mul_(sq, beta2)
        torch._foreach_addcmul_(sq, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(sq)
        torch._foreach_div_(denom, math.sqrt(bc2))
        torch._foreach_add_(denom, eps)
        update = torch._foreach_div(fast, bc1)
        torch._foreach_add_(update, slow, alpha=alpha)
        torch._foreach_div_(update, denom)
        del denom
        if wd != 0.0:
            torch._foreach_add_(update, params, alpha=wd)
        torch._foreach_add_(params, update, alpha=-lr)
