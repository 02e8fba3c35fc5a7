"""GPU checks of Conda's products (neollm/optim/conda.py, ``precision``).

On a CUDA device, Conda's projected direction (g P^T, m P^T, their Adam ratio, back through P) for
NeoLLM-135M's matrix shapes (the tied embedding's 64,402 x 512, a 1536 x 544 FAN projection, a
256 x 512 left projection), from the same fp32 inputs and orthogonal basis: under
``fp32_products("ieee")`` within fp32 rounding of the float64 result; under ``fp32_products("tf32")``
visibly different from it (the tensor cores ran) and within TF32 rounding (10 mantissa bits). The
CPU tests check that a step sets the products' precision around the projections only.
"""

from __future__ import annotations

import pytest
import torch

from gpu_checks import GPU_ONLY, rel_err
from neollm.optim.conda import Conda, fp32_products

pytestmark = GPU_ONLY
GROUP = {"betas": (0.9, 0.999), "eps": 1e-8, "scale": 0.25}


def _inputs(rows: int, cols: int, right: bool, k: int):
    gen = torch.Generator(device="cuda").manual_seed(rows + cols)
    side = cols if right else rows
    g = torch.randn(k, rows, cols, generator=gen, device="cuda")
    m = 0.1 * g + torch.randn(k, rows, cols, generator=gen, device="cuda")
    v = torch.rand(k, rows, cols, generator=gen, device="cuda")
    basis = torch.linalg.qr(torch.randn(k, side, side, generator=gen, device="cuda", dtype=torch.float64))[0]
    return g, m, v, basis.float()


def _directions(inputs, right: bool, dtype: torch.dtype) -> list[torch.Tensor]:
    g, m, v, basis = (t.to(dtype) for t in inputs)
    return Conda._batched_directions(list(g), list(m), list(v.clone()), list(basis), right, GROUP)


@pytest.mark.parametrize("rows, cols, right, k", [(64402, 512, True, 1), (1536, 544, True, 2), (256, 512, False, 2)])
def test_tf32_products_are_tensor_core_rounding_of_the_ieee_direction(rows, cols, right, k):
    inputs = _inputs(rows, cols, right, k)
    exact = _directions(inputs, right, torch.float64)
    with fp32_products("ieee"):
        ieee = _directions(inputs, right, torch.float32)
    with fp32_products("tf32"):
        tf32 = _directions(inputs, right, torch.float32)
    for e, i, t in zip(exact, ieee, tf32):
        assert rel_err(i, e) < 1e-5
        assert 1e-5 < rel_err(t, e) < 1e-2, rel_err(t, e)
