"""Conda: column-normalised Adam, following the author's reference ``Conda_optimizer.py``
(github.com/Kitsunp/Conda-optimizer, "based on official implementation", 'std' projection).

Matrices (``p.ndim == 2``), with m = exp_avg, v = exp_avg_sq and the step count t before this
step (0, 1, ...)::

    m = b1 m + (1 - b1) g
    if no basis yet or t % update_proj_gap == 0:      # SVD of the current m, in float32
        rows >= cols: P = Vh  [cols, cols]  ("right": g~ = g P^T, back: n P)
        rows <  cols: P = U   [rows, rows]  ("left":  g~ = P^T g, back: P n)
    g~, m~ = project(g), project(m)                   # m is stored unprojected, v projected
    v = b2 v + (1 - b2) g~^2
    n = scale * project_back(m~ / (sqrt(v) + eps))
    t = t + 1
    theta = theta - lr * sqrt(1 - b2^t) / (1 - b1^t) * n     (without the factor if not correct_bias)
    theta = theta - lr * wd * theta                          (decoupled weight decay, after the step)

Every other parameter gets the same Adam step without projection or scale.

Versions (``version``, TOML ``[optimizer] conda_version``), read from Kitsunp/Conda-optimizer's history:

* "2025-10-26" (commit 03134af, the file's first version, 'std' projection): the above.
* "2026-04-16" (commit 939adb0, the latest; with its default switches its step is 2025-10-27's dd20c2e):
  three changes: (1) bias correction on m and v themselves, n = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps),
  theta -= lr * n (differs from the above only through eps); (2) the left projection (U) for rows <= cols,
  so square matrices use U (the above: Vh); (3) cautious weight decay (arXiv 2510.12402) BEFORE the step,
  theta -= lr * wd * [n * theta >= 0] * theta, on the pre-step theta, then theta -= lr * n. 939adb0's
  optional extras (GPA iterate averaging, Huber decay, decay "correction", SPECTRA clipping, a per-group
  projection switch) are all off by default there and are not implemented here.

Which version trained seed 001 is not said by its card (it names "Conda (Column-Normalized Adam)", no
version or date): the default stays "2025-10-26".

FSDP2 (parameters are DTensors sharded by rows, ``Shard(0)``, possibly ``Replicate`` on an
HSDP replica dimension):

* the basis needs the whole matrix: every ``update_proj_gap`` steps (and at the first step) m is
  all-gathered (``full_tensor()``), every rank computes the same SVD, and the basis is broadcast
  from the mesh's first rank so all ranks hold bit-identical copies (the basis is a plain,
  replicated tensor in the optimizer state: min(rows, cols)^2 elements per matrix);
* "right" projections act on each row independently: shard-local, no communication per step;
* "left" projections mix rows (matrices with fewer rows than columns: MLP down projections, GQA
  k/v projections, ...). The batched step (below) all-gathers g, m and v of ALL of them in one
  collective, every rank computes the whole directions (the same batched math as one process)
  and keeps its rows of v and of the update: 3x those matrices' size in all-gather traffic per
  step, one NCCL call. The per-tensor step instead forms P^T [g | m] as per-rank partial products
  over the local rows, reduce-scattered back to row shards, and the back-projection P n likewise:
  two reduce-scatters per matrix, ~260 small collectives per step for NeoLLM-135M (132 such
  matrices). On 2 GPUs the batched step nearly halved a 2-GPU step of NeoLLM-135M; what is left
  over the one-GPU step is host launch overhead, not Conda (BENCHMARKS.md, fourth session).
* other placements (e.g. tensor-parallel ``Shard(1)``) fall back to gathering g, m and v and
  computing the full update on every rank (correct, costlier).

``foreach=True`` computes the same step batched: the moment updates and the non-matrix Adam steps
as ``torch._foreach_*`` ops over all tensors at once, and the projections of matrices with the
same (local) shape and side as one batched matmul, instead of ~10 small kernels per tensor (the
per-tensor step of NeoLLM-135M's 482 tensors is launch-bound on a GPU). ``None`` (the default)
batches CUDA tensors only: on a CPU, which is not launch-bound, the stacking copies made it slower
(the timings: BENCHMARKS.md, fifth and fourth sessions, and the third's CPU note). ``[optimizer]
implementation = "foreach"`` / ``"for-loop"`` force it on / off. Layouts other than row sharding keep the
per-tensor path. Equal to the per-tensor step up
to matmul summation order (tests/test_optim.py runs both against the reference).

Products (``precision``, TOML ``[optimizer] conda_precision``): the projections are fp32 matmuls, three
per matrix per step (g P^T, m P^T, n P), ~245 GFLOP a step for NeoLLM-135M (the 64,402 x 512 embedding
alone 40%). "ieee" (the default, as the reference runs under PyTorch's defaults) computes them in IEEE
fp32; "tf32" lets cuBLAS use TF32 tensor cores for them (inputs rounded to 10 mantissa bits, fp32
accumulation: a relative error of order 1e-3 in the direction by that rounding, below the bf16 noise of
the gradients it projects; tests/gpu/test_conda_gpu.py bounds it below 1e-2, passed on an H100). In the
trainer on an H100 the step's kernels took 4.84 ms against 9.46 in IEEE (NeoLLM-135M, vocabulary 64,402);
the step alone is bound by its ~10.7 ms of launches either way (BENCHMARKS.md, twentieth session). The SVD that builds the basis stays IEEE; the flag is set
for the optimizer step only and restored after it, so compiled model code never sees it change. No
effect on a CPU.

Bases (``basis``, TOML ``[optimizer] conda_basis``): every ``update_proj_gap`` steps each matrix's basis
is recomputed from an SVD of its m (181 matrices in NeoLLM-135M; on an H100 such a step took 2.1 s with the
SVDs one after another on the GPU, ~4% of a long run's time: BENCHMARKS.md, twenty-first session).
"svd" (the default) runs them so, as the reference; "svd-batched" runs one batched SVD per matrix
shape; "svd-cpu" copies all m to the host at once and runs the SVDs there in parallel threads. The
same float32 SVDs: the bases differ by rounding and by each singular vector's sign, which the update
does not see (a basis vector and its projected coordinate flip together; v holds squares). Which is
fastest on a GPU machine is for tools/bench_optim.py to say; sharded (DTensor) matrices are gathered
and take their SVDs one at a time on the device's or the host's side.

State per parameter: ``step`` (0-d float32 tensor), ``exp_avg``, ``exp_avg_sq`` (parameter-sized)
and, for matrices, ``projector`` (the basis). All are tensors, so DCP checkpoints them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
from collections import defaultdict
from typing import Iterable

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.optim import Optimizer

from neollm.optim.hyperparameters import check_common


VERSIONS = ("2025-10-26", "2026-04-16")
"""The author's Conda_optimizer.py versions on offer, by commit date (see the module docstring)."""
PRECISIONS = ("ieee", "tf32")
"""The projections' fp32 matmul precisions on offer (see the module docstring)."""
BASES = ("svd", "svd-batched", "svd-cpu")
"""Where the SVDs behind the bases run (see the module docstring, "Bases")."""


@contextlib.contextmanager
def fp32_products(precision: str):
    """cuBLAS's fp32 matmuls in ``precision`` ("ieee" or "tf32") inside, the previous setting after.
    It sets torch's new ``fp32_precision`` flag: code run inside must not read the legacy
    ``torch.backends.cuda.matmul.allow_tf32``, which torch then refuses as a mix of the two APIs."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = precision
    try:
        yield
    finally:
        matmul.fp32_precision = before


def svd_basis(matrix: torch.Tensor, right: bool | None = None) -> torch.Tensor:
    """The reference's orthogonal basis of a full (plain) matrix: Vh if ``right`` (default:
    rows >= cols) else U, from an SVD computed in float32 (as the reference does for every dtype,
    float64 included), returned in the matrix's dtype. A stack of matrices ``[k, rows, cols]`` gives
    the stack of their bases (one batched SVD)."""
    with fp32_products("ieee"):
        return _svd_basis(matrix, right)


def _svd_basis(matrix: torch.Tensor, right: bool | None = None) -> torch.Tensor:
    """``svd_basis`` without touching the matmul precision flag (a global: threads must not set it)."""
    U, _, Vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    right = _is_right(matrix.shape[-2:]) if right is None else right
    return (Vh if right else U).to(matrix.dtype).contiguous()


def svd_bases(matrices: list[torch.Tensor], rights: list[bool], method: str = "svd") -> list[torch.Tensor]:
    """``svd_basis`` of each plain matrix, by ``method`` (one of BASES): "svd" one SVD after another on
    the matrices' device (the reference), "svd-batched" one batched SVD per shape, "svd-cpu" every
    matrix copied to the host at once and the SVDs run there, in parallel threads, the bases copied
    back. The same SVD of the same float32 matrices: the bases differ only by rounding and by the sign
    of each singular vector, which the direction does not see (a vector and its coordinate flip together)."""
    if method == "svd":
        return [svd_basis(m, r) for m, r in zip(matrices, rights)]
    if method == "svd-batched":
        out: list[torch.Tensor | None] = [None] * len(matrices)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (m, r) in enumerate(zip(matrices, rights)):
            groups[(tuple(m.shape), r, m.device, m.dtype)].append(i)
        for (_, right, _, _), idx in groups.items():
            for i, basis in zip(idx, svd_basis(torch.stack([matrices[i] for i in idx]), right).unbind(0)):
                out[i] = basis.clone()  # its own storage: a view would checkpoint the whole stack
        return out
    if method == "svd-cpu":
        if not matrices:
            return []
        flat = torch.cat([m.float().reshape(-1) for m in matrices]).cpu()  # one copy, one wait
        hosts = [t.view(m.shape) for t, m in zip(flat.split([m.numel() for m in matrices]), matrices)]
        # each SVD may use torch's intra-op threads: share the cores this rank's process may use with the
        # other ranks of the host, not one pool of all cores per rank
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        workers = max(1, min(len(hosts), cores // (ranks * torch.get_num_threads())))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # LAPACK releases the GIL
            bases = list(pool.map(_svd_basis, hosts, rights))
        return [b.to(device=m.device, dtype=m.dtype) for b, m in zip(bases, matrices)]
    raise ValueError(f"Conda: basis {method!r} is unknown: choose one of {', '.join(BASES)}")


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (shares its storage), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _shard_dims(p: DTensor) -> list[int]:
    """Mesh dimensions over which a DTensor is sharded."""
    return [d for d, pl in enumerate(p.placements) if pl.is_shard()]


def _local_rows(p: DTensor) -> slice:
    """The rows of the whole tensor that this rank's shard of a row-sharded DTensor holds."""
    local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return slice(offset[0], offset[0] + local_shape[0])


def _all_gather_rows(locals_: list[torch.Tensor], shapes: list[torch.Size], mesh, shard_dim: int) -> list[torch.Tensor]:
    """The whole tensors of several row-sharded (``Shard(0)`` on mesh dim ``shard_dim``) 2-D tensors,
    from their local shards, in one ``all_gather_into_tensor``.

    Shard(0) splits rows like ``torch.chunk``: rank r holds rows [r c, min((r + 1) c, rows)) with
    c = ceil(rows / world), so the shards padded to c rows and laid end to end are the whole
    tensor followed by padding."""
    import torch.distributed as dist

    world, rank = mesh.size(shard_dim), mesh.get_local_rank(shard_dim)
    chunks = [-(-shape[0] // world) for shape in shapes]
    flat = []
    for t, shape, c in zip(locals_, shapes, chunks):
        start = min(rank * c, shape[0])
        if t.shape[0] != min(c, shape[0] - start):
            raise RuntimeError(f"Conda: a shard of {tuple(shape)} has {t.shape[0]} rows; expected torch.chunk "
                               f"row sharding ({c} rows per rank)")
        flat.append(torch.nn.functional.pad(t, (0, 0, 0, c - t.shape[0])).reshape(-1))
    send = torch.cat(flat)
    recv = send.new_empty(world * send.numel())
    dist.all_gather_into_tensor(recv, send, group=mesh.get_group(shard_dim))
    recv = recv.view(world, -1)
    fulls, offset = [], 0
    for shape, c in zip(shapes, chunks):
        size = c * shape[1]
        fulls.append(recv[:, offset:offset + size].reshape(world * c, shape[1])[:shape[0]])
        offset += size
    return fulls


def _is_right(shape, square_right: bool = True) -> bool:
    """Right projection (Vh) for tall matrices; square ones go right in 2025-10-26, left (U) later."""
    return shape[0] > shape[1] or (square_right and shape[0] == shape[1])


def _row_sharded(p: torch.Tensor) -> bool:
    """A DTensor whose placements are only Shard(0) / Replicate (FSDP2, HSDP)."""
    return all((type(pl) is Shard and pl.dim == 0) or pl.is_replicate() for pl in p.placements)


class Conda(Optimizer):
    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        correct_bias: bool = True,
        update_proj_gap: int = 500,
        scale: float = 0.25,
        foreach: bool | None = None,
        version: str = "2025-10-26",
        precision: str = "ieee",
        basis: str = "svd",
    ) -> None:
        if basis not in BASES:
            raise ValueError(f"Conda: basis {basis!r} is unknown: choose one of {', '.join(BASES)}")
        if version not in VERSIONS:
            raise ValueError(f"Conda: version {version!r} is unknown: choose one of {', '.join(VERSIONS)}")
        if precision not in PRECISIONS:
            raise ValueError(f"Conda: precision {precision!r} is unknown: choose one of {', '.join(PRECISIONS)}")
        check_common("Conda", lr, eps, betas, weight_decay)
        if update_proj_gap < 1:
            raise ValueError(f"Conda: update_proj_gap must be >= 1, got {update_proj_gap}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        correct_bias=correct_bias, update_proj_gap=int(update_proj_gap), scale=scale)
        super().__init__(params, defaults)
        # Not a param-group value: those are checkpointed, so a resumed run would take the saved
        # choice over its config, and checkpoints written without the key would not load.
        self.foreach = foreach
        self.version = version  # kept out of the param groups for the same reason
        self.square_right = version == "2025-10-26"
        self.precision = precision  # kept out of the param groups for the same reason
        self.basis = basis  # likewise

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with fp32_products(self.precision):  # the projections; svd_basis keeps IEEE
            self._step_groups()
        return loss

    def _step_groups(self) -> None:
        for group in self.param_groups:
            # Bucket by step (normally one bucket), mesh, device and dtype for the batched path.
            buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Conda does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p.grad)
                    state["exp_avg_sq"] = torch.zeros_like(p.grad)
                step = int(state["step"].item())  # before this step, as in the reference
                if self.foreach or (self.foreach is None and p.device.type == "cuda"):
                    mesh = p.device_mesh if isinstance(p, DTensor) else None
                    buckets[(step, mesh, p.device, p.dtype)].append(p)
                else:
                    self._update_single(p, state, step, group)
            for (step, *_), params in buckets.items():
                self._update_foreach(params, step, group)

    @staticmethod
    def _step_size(step: int, group: dict) -> float:
        beta1, beta2 = group["betas"]
        if not group["correct_bias"]:
            return group["lr"]
        t = step + 1
        return group["lr"] * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)

    def _math_group(self, step: int, group: dict) -> dict:
        """The group the direction maths reads. 2026-04-16 corrects m and v themselves:
        (m / b1c) / (sqrt(v / b2c) + eps) = sqrt(b2c) / b1c * m / (sqrt(v) + eps sqrt(b2c)), i.e. the
        2025-10-26 step size with eps scaled by sqrt(1 - beta2^t) (b1c, b2c: 1 - beta^t)."""
        if self.version == "2025-10-26" or not group["correct_bias"]:
            return group
        return {**group, "eps": group["eps"] * math.sqrt(1.0 - group["betas"][1] ** (step + 1))}

    def _right(self, shape) -> bool:
        return _is_right(shape, self.square_right)

    @staticmethod
    def _basis_due(state: dict, step: int, group: dict) -> bool:
        return "projector" not in state or step % group["update_proj_gap"] == 0

    def _refresh_basis(self, state: dict, step: int, group: dict, shape) -> None:
        if self._basis_due(state, step, group):
            state["projector"] = self._basis(state["exp_avg"], self._right(shape))

    def _refresh_bases(self, params: list[torch.Tensor], states: list[dict], step: int, group: dict) -> None:
        """The due bases of a foreach bucket's matrices together (``self.basis``: all SVDs at once)."""
        due = [i for i, p in enumerate(params) if p.ndim == 2 and self._basis_due(states[i], step, group)]
        plain = []
        for i in due:
            if isinstance(states[i]["exp_avg"], DTensor):  # sharded: gathered and broadcast one at a time
                states[i]["projector"] = self._basis(states[i]["exp_avg"], self._right(params[i].shape))
            else:
                plain.append(i)
        bases = svd_bases([states[i]["exp_avg"] for i in plain], [self._right(params[i].shape) for i in plain],
                          self.basis)
        for i, basis in zip(plain, bases):
            states[i]["projector"] = basis

    def _update_single(self, p: torch.Tensor, state: dict, step: int, group: dict) -> None:
        """One tensor: the reference's order of operations."""
        beta1, beta2 = group["betas"]
        grad = p.grad
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        math_group = self._math_group(step, group)
        if grad.ndim == 2:
            self._refresh_basis(state, step, group, p.shape)
            norm_grad = self._projected_direction(grad, exp_avg, exp_avg_sq, state["projector"], math_group,
                                                  self._right(p.shape))
        else:
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            norm_grad = exp_avg / exp_avg_sq.sqrt().add_(math_group["eps"])
        state["step"] += 1
        decay = group["lr"] * group["weight_decay"]
        if self.version == "2025-10-26":
            p.add_(norm_grad, alpha=-self._step_size(step, group))
            if decay > 0.0:
                p.add_(p, alpha=-decay)
        else:  # cautious weight decay on p_t where sign(update) = sign(p_t), then the step
            if decay > 0.0:
                p.add_(p * (norm_grad * p >= 0), alpha=-decay)
            p.add_(norm_grad, alpha=-self._step_size(step, group))

    def _update_foreach(self, params: list[torch.Tensor], step: int, group: dict) -> None:
        """Tensors at the same step, on one mesh/device/dtype: the same math as ``_update_single``,
        on local shards, with foreach ops and batched projections."""
        beta1, beta2 = group["betas"]
        math_group = self._math_group(step, group)
        eps = math_group["eps"]
        states = [self.state[p] for p in params]
        local = [_local(p) for p in params]
        grads = [_local(p.grad) for p in params]
        ms = [_local(s["exp_avg"]) for s in states]
        vs = [_local(s["exp_avg_sq"]) for s in states]
        torch._foreach_mul_(ms, beta1)
        torch._foreach_add_(ms, grads, alpha=1.0 - beta1)

        directions: list[torch.Tensor | None] = [None] * len(params)
        others = [i for i, p in enumerate(params) if p.ndim != 2]
        if others:  # Adam without projection
            v_o, g_o = [vs[i] for i in others], [grads[i] for i in others]
            torch._foreach_mul_(v_o, beta2)
            torch._foreach_addcmul_(v_o, g_o, g_o, value=1.0 - beta2)
            denom = torch._foreach_sqrt(v_o)
            torch._foreach_add_(denom, eps)
            for i, d in zip(others, torch._foreach_div([ms[i] for i in others], denom)):
                directions[i] = d

        batches: dict[tuple, list[int]] = defaultdict(list)
        gathered: dict[tuple, list[int]] = defaultdict(list)
        self._refresh_bases(params, states, step, group)
        for i, p in enumerate(params):
            if p.ndim != 2:
                continue
            right = self._right(p.shape)
            shard_dims = _shard_dims(p.grad) if isinstance(p, DTensor) and _row_sharded(p.grad) else None
            if not isinstance(p, DTensor) or (shard_dims is not None and (right or not shard_dims)):
                batches[(tuple(grads[i].shape), right)].append(i)  # shard-local (or whole) matrices
            elif shard_dims is not None and len(shard_dims) == 1:  # left, row-sharded: rows mix
                gathered[(tuple(p.grad.placements), shard_dims[0])].append(i)
            else:  # other layouts: one tensor at a time
                d = self._projected_direction(params[i].grad, states[i]["exp_avg"], states[i]["exp_avg_sq"],
                                              states[i]["projector"], math_group, right)
                directions[i] = _local(d)
        for (_, right), idx in batches.items():
            for i, d in zip(idx, self._batched_directions(
                    [grads[i] for i in idx], [ms[i] for i in idx], [vs[i] for i in idx],
                    [states[i]["projector"] for i in idx], right, math_group)):
                directions[i] = d
        for (_, shard_dim), idx in gathered.items():
            for i, d in zip(idx, self._gathered_left_directions(
                    [params[i] for i in idx], [ms[i] for i in idx], [vs[i] for i in idx],
                    [states[i]["projector"] for i in idx], shard_dim, math_group)):
                directions[i] = d

        torch._foreach_add_([s["step"] for s in states], 1.0)
        decay = group["lr"] * group["weight_decay"]
        if self.version == "2025-10-26":
            torch._foreach_add_(local, directions, alpha=-self._step_size(step, group))
            if decay > 0.0:
                torch._foreach_add_(local, local, alpha=-decay)
        else:  # cautious weight decay on p_t, then the step
            if decay > 0.0:
                cautious = [p * (d * p >= 0) for p, d in zip(local, directions)]
                torch._foreach_add_(local, cautious, alpha=-decay)
            torch._foreach_add_(local, directions, alpha=-self._step_size(step, group))

    @staticmethod
    def _batched_directions(grads, ms, vs, bases, right: bool, group: dict) -> list[torch.Tensor]:
        """``_direction_local`` for k matrices of one shape and side as batched matmuls; v updated in place."""
        beta2 = group["betas"][1]
        if len(grads) == 1:  # views, no copies (v is updated in place through its view)
            g, m, v, basis = grads[0][None], ms[0][None], vs[0][None], bases[0][None]
        else:
            g, m, v, basis = torch.stack(grads), torch.stack(ms), torch.stack(vs), torch.stack(bases)
        if right:
            g_proj, m_proj = g @ basis.mT, m @ basis.mT
        else:
            g_proj, m_proj = basis.mT @ g, basis.mT @ m
        v.mul_(beta2).addcmul_(g_proj, g_proj, value=1.0 - beta2)
        if len(vs) > 1:
            torch._foreach_copy_(vs, list(v.unbind(0)))
        n = m_proj / v.sqrt().add_(group["eps"])
        back = n @ basis if right else basis @ n
        return list((back * group["scale"]).unbind(0))

    @classmethod
    def _gathered_left_directions(cls, params, ms, vs, bases, shard_dim: int, group: dict) -> list[torch.Tensor]:
        """Left projections of row-sharded matrices (one mesh, one shard dimension): g, m and v of
        all of them in ONE all-gather, the full directions batched on every rank (the same math
        as one process), each rank keeping its rows of v and of the direction. The per-tensor path
        costs two reduce-scatters per matrix; on 2 GPUs those ~100 small collectives per step
        made NeoLLM-135M's step several times slower than on one GPU (BENCHMARKS.md, fourth session)."""
        mesh = params[0].grad.device_mesh
        pieces = [(_local(p.grad), m, v) for p, m, v in zip(params, ms, vs)]
        fulls = _all_gather_rows([t for trio in pieces for t in trio],
                                 [p.shape for p in params for _ in range(3)], mesh, shard_dim)
        g_full, m_full, v_full = fulls[0::3], fulls[1::3], fulls[2::3]
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for k, p in enumerate(params):
            by_shape[tuple(p.shape)].append(k)
        out: list[torch.Tensor | None] = [None] * len(params)
        for idx in by_shape.values():
            backs = cls._batched_directions([g_full[k] for k in idx], [m_full[k] for k in idx],
                                            [v_full[k] for k in idx], [bases[k] for k in idx], False, group)
            for k, back in zip(idx, backs):
                rows = _local_rows(params[k].grad)
                vs[k].copy_(v_full[k][rows])
                out[k] = back[rows]
        return out

    # -- basis -------------------------------------------------------------------------------

    def _basis(self, exp_avg: torch.Tensor, right: bool) -> torch.Tensor:
        if not isinstance(exp_avg, DTensor):
            return svd_bases([exp_avg], [right], self.basis)[0]
        mesh = exp_avg.device_mesh
        # all-gather of m, the same SVD on every rank
        basis = svd_bases([exp_avg.full_tensor()], [right], self.basis)[0]
        # Broadcast rank 0's basis (each Replicate mesh dim), so all ranks hold identical bits.
        return DTensor.from_local(basis, mesh, [Replicate()] * mesh.ndim, run_check=True).to_local()

    # -- projected Adam direction ---------------------------------------------------------------

    def _projected_direction(self, grad, exp_avg, exp_avg_sq, basis, group, right: bool) -> torch.Tensor:
        """scale * project_back(project(m) / (sqrt(v) + eps)), updating v in place.
        Returns a tensor laid out like the parameter (a DTensor for a DTensor parameter)."""
        if not isinstance(grad, DTensor):
            return self._direction_local(grad, exp_avg, exp_avg_sq, basis, group, right)
        if _row_sharded(grad):
            return self._direction_row_sharded(grad, exp_avg, exp_avg_sq, basis, group, right)
        return self._direction_gathered(grad, exp_avg, exp_avg_sq, basis, group, right)

    @staticmethod
    def _direction_local(grad, exp_avg, exp_avg_sq, basis, group, right: bool) -> torch.Tensor:
        beta2 = group["betas"][1]
        if right:
            g_proj, m_proj = grad @ basis.t(), exp_avg @ basis.t()
        else:
            g_proj, m_proj = basis.t() @ grad, basis.t() @ exp_avg
        exp_avg_sq.mul_(beta2).addcmul_(g_proj, g_proj, value=1.0 - beta2)
        n = m_proj / exp_avg_sq.sqrt().add_(group["eps"])
        back = n @ basis if right else basis @ n
        return back * group["scale"]

    @staticmethod
    def _direction_row_sharded(grad, exp_avg, exp_avg_sq, basis, group, right: bool) -> DTensor:
        beta2 = group["betas"][1]
        mesh, placements = grad.device_mesh, grad.placements
        shape = grad.shape
        g, m, v = grad.to_local(), exp_avg.to_local(), exp_avg_sq.to_local()
        if right:
            # Rows are independent: g~ = g P^T row by row.
            g_proj, m_proj = g @ basis.t(), m @ basis.t()
            v.mul_(beta2).addcmul_(g_proj, g_proj, value=1.0 - beta2)
            back = (m_proj / v.sqrt().add_(group["eps"])) @ basis
        else:
            rows = _local_rows(grad)
            partial = [Partial() if pl.is_shard() else Replicate() for pl in placements]
            cols = shape[1]
            # P^T [g | m] = sum over ranks of P[rows]^T [g | m][rows]  -> reduce-scatter to rows
            gm = torch.cat([g, m], dim=1)
            gm_part = basis[rows].t() @ gm
            gm_proj = DTensor.from_local(gm_part, mesh, partial, run_check=False,
                                         shape=torch.Size((shape[0], 2 * cols)), stride=(2 * cols, 1))
            gm_proj = gm_proj.redistribute(mesh, placements).to_local()
            g_proj, m_proj = gm_proj[:, :cols], gm_proj[:, cols:]
            v.mul_(beta2).addcmul_(g_proj, g_proj, value=1.0 - beta2)
            n = m_proj / v.sqrt().add_(group["eps"])
            # P n = sum over ranks of P[:, rows] n[rows]  -> reduce-scatter to rows
            back_part = basis[:, rows] @ n
            back = DTensor.from_local(back_part, mesh, partial, run_check=False,
                                      shape=shape, stride=grad.stride())
            back = back.redistribute(mesh, placements).to_local()
        return DTensor.from_local(back * group["scale"], mesh, placements, run_check=False,
                                  shape=shape, stride=grad.stride())

    @classmethod
    def _direction_gathered(cls, grad, exp_avg, exp_avg_sq, basis, group, right: bool) -> DTensor:
        """Any other layout: gather g, m, v, compute the full update everywhere, keep the shards."""
        mesh, placements = grad.device_mesh, grad.placements
        v_full = exp_avg_sq.full_tensor()
        back = cls._direction_local(grad.full_tensor(), exp_avg.full_tensor(), v_full, basis, group, right)
        replicated = [Replicate()] * mesh.ndim
        v_new = DTensor.from_local(v_full, mesh, replicated, run_check=False).redistribute(mesh, placements)
        exp_avg_sq.to_local().copy_(v_new.to_local())
        return DTensor.from_local(back, mesh, replicated, run_check=False).redistribute(mesh, placements)
