"""DDP (``dp_replicate`` > 1, ``dp_shard`` = 1: neollm.parallelize.apply_ddp) on two CPU ranks.

The trainer divides the summed loss by the global token count on every rank, so the replicas'
gradients must be summed, not averaged (DDP's default): with averaging each step's gradient is
1/replicas of the true one, which shows as a smaller gradient norm and changes clipping (seen on
4 H100s: a quarter of FSDP2's norm and losses 0.09 apart by step 10).
"""

from __future__ import annotations

import torch
import torch.multiprocessing as mp
import torch.nn as nn

N, D_IN, D_OUT = 8, 6, 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 16), nn.Tanh(), nn.Linear(16, D_OUT)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(N, D_IN, generator=gen, dtype=torch.float64), torch.randn(N, D_OUT, generator=gen,
                                                                                 dtype=torch.float64)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).sum() / N  # divided by the GLOBAL count, as the trainer does


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from gloo_ranks import gloo_rank
    from neollm.parallelize import apply_ddp

    with gloo_rank(rank, world, init_file):
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_replicate",))
        model = _model()
        apply_ddp(model, mesh, enable_compile=False)
        x, y = _data()
        part = slice(rank * N // world, (rank + 1) * N // world)
        _loss(model, x[part], y[part]).backward()
        if rank == 0:
            torch.save([p.grad.clone() for p in model.parameters()], out)


def test_ddp_sums_the_replicas_gradients(tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "pg_init"), str(out)), nprocs=2, join=True)
    model = _model()
    _loss(model, *_data()).backward()
    got = torch.load(out)
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-12, atol=1e-12)
