"""``init_weights`` under FSDP2 on two CPU ranks, for every flavor and every mixer / FFN option.

With more than one data-parallel rank the trainer shards the model (``fully_shard`` per block and
at the root, as neollm/parallelize.py) *before* ``init_weights``, so every init runs on DTensors.
An init that writes a whole plain tensor into a parameter fails there (MEA's identity head mixing
once did: a 2-GPU run of neollm_135m stopped before step 1) or, worse, fills one shard only.
Checks: init succeeds, every parameter is finite (parameters are first poisoned with NaN, so an
init that skips a shard is caught), and every deterministic parameter (equal under two seeds in
one process: identities, ones, zeros, constants) equals the one-process value.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_model import build, tiny  # noqa: E402

from neollm.model.args import FLAVORS  # noqa: E402
from neollm.model.model import NeoLLM  # noqa: E402


def _cases() -> dict:
    cases = {name: tiny(args) for name, args in FLAVORS.items()}
    cases["every_mixer_moe"] = tiny(
        FLAVORS["debug"], layer_pattern="ADGTMRLN", n_layers=8, mlp_type="moe", mamba2_head_dim=16,
        mamba2_state_size=16, rwkv_proj_low_rank_dim=4, rwkv_gate_low_rank_dim=8, rwkv_backend="torch",
    )
    return cases


def _worker(rank: int, world: int, init_file: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from gloo_ranks import gloo_rank

    with gloo_rank(rank, world, init_file):
        mesh = init_device_mesh("cpu", (world,))
        for name, args in _cases().items():
            with torch.device("meta"):
                model = NeoLLM(args)
            for block in model.layers.values():
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            model.to_empty(device="cpu")
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
                torch.manual_seed(0)
                model.init_weights()
            assert all(isinstance(p, DTensor) for p in model.parameters()), name
            full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
            ref0, ref1 = build(args, seed=0).state_dict(), build(args, seed=1).state_dict()
            for key, value in full.items():
                assert torch.isfinite(value).all(), f"{name}: {key} not initialised on every shard"
                if torch.equal(ref0[key], ref1[key]):  # deterministic init
                    torch.testing.assert_close(value, ref0[key], atol=0, rtol=0, msg=f"{name}: {key}")


def test_init_weights_under_fsdp2_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)


def test_cases_cover_every_mixer_and_ffn():
    from neollm.model.mixers import MIXERS

    cases = _cases()
    codes = set("".join(a.layer_pattern for a in cases.values()))
    assert codes >= {"A", "D", *MIXERS}
    assert {a.mlp_type for a in cases.values()} >= {"swiglu", "polynorm", "moe"}
    assert any(a.mea for a in cases.values()) and any(a.lucid for a in cases.values())
