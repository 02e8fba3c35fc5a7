"""GPU checks of LUCID's Triton kernels (neollm/kernels/lucid.py) against fp64.

Through ``lucid_values`` (RMS norm in PyTorch, the op's kernels forward and backward) at NeoLLM's
shape (T 512, 4 KV heads, head dim 64), fp32 and bf16 inputs, independent and correlated keys
(entries of P near 1): the value and the gradients to k and v within ``SLACK`` times the error of
the PyTorch reference run in the same dtype (fp32 math; bf16 results rounded once), relative RMS
over the whole tensor. The injected-error checks run on the CPU (tests/lucid_kernel_interpreted.py).
"""

from __future__ import annotations

import pytest
import torch

from gpu_checks import GPU_ONLY, rel_err
from neollm.model.attention_ops import lucid_values

pytestmark = GPU_ONLY
SLACK, FLOOR = 3.0, 2e-7
EPS = 1e-6


def _problem(batch, dtype, keys, t=512, hkv=4, d=64):
    g = torch.Generator(device="cuda").manual_seed(batch)
    k = torch.randn(batch, t, hkv, d, device="cuda", generator=g)
    if keys == "correlated":
        k = torch.randn(batch, 1, hkv, d, device="cuda", generator=g) + 0.2 * k
    v = torch.randn(batch, t, hkv, d, device="cuda", generator=g)
    dx = torch.randn(batch, hkv, t, d, device="cuda", generator=g)
    return k.to(dtype).transpose(1, 2), v.to(dtype).transpose(1, 2), dx.to(dtype)  # the model's layout


def _value_and_grads(k, v, dx, impl, autocast=False):
    k, v = k.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        x = lucid_values(k, v, EPS, impl=impl)
    return (x, *torch.autograd.grad(x, (k, v), dx))


@pytest.mark.parametrize("diagonal", ["substitute", "inverse", "inverse+lookback"])  # lucid.DIAGONAL, lucid.SOLVE
@pytest.mark.parametrize("dots", ["ieee", "tf32x3"])  # lucid.DOT_PRECISION: IEEE, and the default
@pytest.mark.parametrize("keys", ["independent", "correlated"])
@pytest.mark.parametrize("batch", [2, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lucid_kernels_match_fp64_within_the_references_error(dtype, batch, keys, dots, diagonal, monkeypatch):
    from neollm.kernels import lucid

    monkeypatch.setattr(lucid, "DOT_PRECISION", dots)
    diagonal, _, solve = diagonal.partition("+")
    monkeypatch.setattr(lucid, "DIAGONAL", diagonal)
    monkeypatch.setattr(lucid, "SOLVE", solve or "walk")
    k, v, dx = _problem(batch, dtype, keys)
    want = _value_and_grads(k.double(), v.double(), dx.double(), "torch")
    ref = _value_and_grads(k, v, dx, "torch")
    got = _value_and_grads(k, v, dx, "triton", autocast=dtype == torch.bfloat16)
    for name, g, r, w in zip(("X", "dk", "dv"), got, ref, want):
        assert g.dtype == dtype and g.shape == w.shape
        err, ref_err = rel_err(g, w), rel_err(r, w)
        print(f"{dtype} B {batch} {keys} dots {dots} {diagonal} {solve or 'walk'} {name}: kernel {err:.2e} "
              f"reference {ref_err:.2e}")
        assert err <= SLACK * ref_err + FLOOR, f"{name}: kernel {err:.2e} vs reference {ref_err:.2e}"


def test_lookback_solve_is_exact_and_repeatable_under_many_programs():
    """The look-back solve's flags under load: 256 x 4 heads x 16 row blocks of 16 (16,384 programs,
    more than the GPU holds at once, so late blocks wait on ones still running), forward and
    transposed: each of 20 repeats bitwise equal to the first (a block that read stale rows of an
    earlier one would differ between repeats) and equal to the walk's solution up to rounding."""
    from neollm.kernels import lucid
    from neollm.model.attention_ops import rms_normalize

    k, v, _ = _problem(256, torch.float32, "correlated", t=256)
    kr = rms_normalize(k, EPS)
    for transposed in (False, True):
        launch = dict(block_rows=16, diagonal="inverse", dots="tf32x3")
        walk = lucid.substitute(kr, v, transposed, solve="walk", **launch)
        first = lucid.substitute(kr, v, transposed, solve="lookback", **launch)
        assert not first.isnan().any(), "a block gave up waiting (NaN rows)"
        for _ in range(20):
            assert torch.equal(lucid.substitute(kr, v, transposed, solve="lookback", **launch), first)
        assert rel_err(first, walk) < 5e-5, rel_err(first, walk)  # the same solve, tiles summed in another order


def test_lucid_auto_takes_the_kernels_and_compiles_with_inductor():
    from neollm.model.attention_ops import lucid_uses_kernel

    k, v, dx = _problem(2, torch.bfloat16, "correlated")
    assert lucid_uses_kernel("auto", k, v)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: lucid_values(a, b, EPS, impl="auto"), fullgraph=True)
    kk, vv = k.clone().requires_grad_(), v.clone().requires_grad_()
    x = compiled(kk, vv)
    got = (x, *torch.autograd.grad(x, (kk, vv), dx))
    for g, e in zip(got, _value_and_grads(k, v, dx, "triton")):
        assert rel_err(g, e) < 1e-2


def test_auto_solve_runs_the_lookback_at_small_batches_and_the_walk_at_large(monkeypatch):
    """SOLVE "auto" (the default): bitwise the look-back's result where batch x KV heads fits the SMs,
    the walk's where it does not (the two sum their tiles in another order, so their last bits differ)."""
    from neollm.kernels import lucid
    from neollm.model.attention_ops import rms_normalize

    monkeypatch.setattr(lucid, "SOLVE", "auto")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch, expected in ((max(1, sms // 4 // 2), "lookback"), (sms // 4 + 1, "walk")):
        k, v, _ = _problem(batch, torch.float32, "correlated", t=256)
        kr = rms_normalize(k, EPS)
        launch = dict(diagonal="inverse", dots="tf32x3")
        for transposed in (False, True):
            walk, lookback = (lucid.substitute(kr, v, transposed, solve=s, **launch) for s in ("walk", "lookback"))
            assert not torch.equal(walk, lookback)  # else this problem could not tell which one ran
            auto = lucid.substitute(kr, v, transposed, **launch)
            assert torch.equal(auto, lookback if expected == "lookback" else walk), (batch, expected)
