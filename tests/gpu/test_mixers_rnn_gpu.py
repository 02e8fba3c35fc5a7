"""GPU checks of the RWKV-6, LSTM and RNN mixers: fla's chunk_rwkv6 vs our reference, cuDNN vs the CPU path.

Error metric as tests/gpu/test_gdn_gpu.py: relative RMS error ||a - b|| / ||b|| over the whole tensor.
Tolerances: fp32 5e-3 (values) / 2e-2 (grads) — Triton's tl.dot runs fp32 at TF32 on Hopper and the chunk
kernel chains a few matmuls; bf16 2.5e-2 / 5e-2 — fla keeps r, k, v, w and o in bf16 while our reference
is fp32 inside. A broken kernel gives O(1) errors.
Measured on one H100 (torch 2.11, Triton 3.6, fla 0.6.0; 2026-11-26), worst relative error over y, dx and
every parameter gradient: RWKV6 fla backend vs torch backend fp32 5.4e-3 (the decay-LoRA bias; the rest
<= 1.4e-3), bf16 6.8e-3, autocast 6.5e-3; vs fla's RWKV6Attention fp32 1.3e-5, bf16 2.8e-3 (dx), autocast
y 7.5e-3 (its gradients: see the test); chunk_rwkv6 vs our reference fp32 9e-4, bf16 2.7e-3; cuDNN vs
the CPU fp64 path fp32 <= 5e-4, bf16 <= 6.3e-3. The first run spends minutes autotuning fla's kernels.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from gpu_checks import GPU_ONLY, rel_err

pytestmark = GPU_ONLY

TOL = {
    "fp32": {"value": 5e-3, "grad": 2e-2},
    "bf16": {"value": 2.5e-2, "grad": 5e-2},
    "autocast": {"value": 2.5e-2, "grad": 5e-2},
}


def perturb(module: torch.nn.Module, scale: float, seed: int = 1) -> None:
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p))


def _run(m: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, mode: str):
    m.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=(mode == "autocast")):
        y = m(x)
        if isinstance(y, tuple):  # fla's layer returns (o, attentions, cache)
            y = y[0]
    (y.float() * dy).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters()}
    return y.detach(), x.grad.detach().clone(), grads


# ---------------------------------------------------------------------------------------------------- RWKV-6
@pytest.mark.parametrize("mode", ["fp32", "bf16", "autocast"])
def test_rwkv6_fla_backend_matches_torch_backend_and_fla_layer(mode):
    import warnings

    from fla.layers import RWKV6Attention

    from neollm.model.mixers.rwkv6 import RWKV6

    torch.manual_seed(0)
    dim, H, K = 512, 8, 64  # the plain flavor's shape
    B, T = 2, 300  # T not a multiple of fla's chunk (64) nor of ours (16)
    base = RWKV6(dim, H, K, backend="torch").cuda()
    perturb(base, 0.05)  # off fla's zero inits, so the LoRA up-projections and bonus get real gradients
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    mods = {}
    for backend in ("torch", "fla"):
        m = RWKV6(dim, H, K, backend=backend).cuda()
        m.load_state_dict(base.state_dict())
        mods[backend] = m.to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = RWKV6Attention(hidden_size=dim, num_heads=H, expand_k=1.0, expand_v=1.0, mode="chunk",
                             norm_eps=base.norm_eps).cuda()
    ref.load_state_dict(base.state_dict())
    ref = ref.to(dtype).train()

    x = torch.randn(B, T, dim, device="cuda", dtype=dtype)
    dy = torch.randn(B, T, dim, device="cuda")
    y_t, dx_t, g_t = _run(mods["torch"], x, dy, mode)
    y_f, dx_f, g_f = _run(mods["fla"], x, dy, mode)
    y_l, dx_l, g_l = _run(ref, x, dy, mode)

    # vs fla's own layer: same kernel; only the torch GroupNorm / token shift (fla: Triton) and summation order.
    same = {"y": rel_err(y_f, y_l), "dx": rel_err(dx_f, dx_l)}
    same.update({n: rel_err(g_f[n], g_l[n]) for n in g_l})
    errs = {"y": rel_err(y_f, y_t), "dx": rel_err(dx_f, dx_t)}
    errs.update({n: rel_err(g_f[n], g_t[n]) for n in g_t})
    print(mode, "vs fla layer", {k: f"{v:.1e}" for k, v in same.items()})
    print(mode, "vs torch backend", {k: f"{v:.1e}" for k, v in errs.items()})
    same_tol = 1e-3 if mode == "fp32" else 2e-2
    if mode == "autocast":
        # Under autocast fla's layer hands chunk_rwkv6 the same dtypes and strides as ours and its output
        # agrees (2e-5), but its gradients of r/k/bonus/dx stray from the fp32 torch path by 0.1-0.4 — and
        # from its own fp32 gradients by ~0.36 (ours: <= 1.7e-2) — measured on an H100, 2026-11-26. Our
        # module is checked against the torch path below; against fla's layer only the output is.
        same = {"y": same["y"]}
    bad_same = {n: e for n, e in same.items() if not e < same_tol}
    assert not bad_same, bad_same
    tol = TOL[mode]
    assert errs.pop("y") < tol["value"]
    bad = {n: e for n, e in errs.items() if not e < tol["grad"]}
    assert not bad, bad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fla_chunk_rwkv6_matches_reference(dtype):
    from fla.ops.rwkv6 import chunk_rwkv6

    from neollm.kernels.rwkv6 import chunk_rwkv6_ref

    torch.manual_seed(42)
    B, T, H, K, V = 2, 300, 4, 64, 64
    r = torch.randn(B, T, H, K, device="cuda").to(dtype)
    k = torch.randn(B, T, H, K, device="cuda").to(dtype)
    v = torch.randn(B, T, H, V, device="cuda").to(dtype)
    w = (-torch.exp(torch.randn(B, T, H, K, device="cuda") - 2)).to(dtype)  # decays from ~1 to ~e^-3
    u = torch.randn(H, K, device="cuda").to(dtype)
    h0 = torch.randn(B, H, K, V, device="cuda") * 0.1
    do = torch.randn(B, T, H, V, device="cuda")
    dht = torch.randn(B, H, K, V, device="cuda")
    leaves = [t.requires_grad_(True) for t in (r, k, v, w, u, h0)]

    def grads(fn, **kw):
        o, ht = fn(r, k, v, w, u, scale=K ** -0.5, initial_state=h0, output_final_state=True, **kw)
        loss = (o.float() * do).sum() + (ht.float() * dht).sum()
        return o.detach().float(), ht.detach().float(), torch.autograd.grad(loss, leaves)

    o_f, ht_f, d_f = grads(chunk_rwkv6)
    o_r, ht_r, d_r = grads(chunk_rwkv6_ref)
    tol = TOL["bf16" if dtype == torch.bfloat16 else "fp32"]
    errs = {"o": rel_err(o_f, o_r), "ht": rel_err(ht_f, ht_r)}
    errs.update({f"d{n}": rel_err(a, b) for n, a, b in zip("r k v w u h0".split(), d_f, d_r)})
    print(dtype, {k_: f"{e:.1e}" for k_, e in errs.items()})
    assert errs.pop("o") < tol["value"] and errs.pop("ht") < tol["value"]
    bad = {n: e for n, e in errs.items() if not e < tol["grad"]}
    assert not bad, bad


# ------------------------------------------------------------------------------------------------ LSTM / RNN
@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_cudnn_recurrent_matches_cpu(kind):
    from neollm.model.mixers.rnn import RecurrentMixer

    with torch.device("meta"):
        m = RecurrentMixer(kind, dim=256, hidden=128)
    m.to_empty(device="cuda")  # as the trainer: cuDNN's flat weights must follow the materialised parameters
    torch.manual_seed(0)
    m.init_weights(0.02, 0.02)
    cpu = RecurrentMixer(kind, dim=256, hidden=128).double()
    cpu.load_state_dict({k: v.cpu() for k, v in m.state_dict().items()})
    x = torch.randn(2, 200, 256)
    dy = torch.randn(2, 200, 256)
    y_c, dx_c, g_c = _run(cpu, x.double(), dy.double(), "fp32")
    for mode in ("fp32", "bf16"):
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        y, dx, g = _run(m.to(dtype), x.cuda().to(dtype), dy.cuda(), mode)
        errs = {"y": rel_err(y.cpu(), y_c), "dx": rel_err(dx.cpu(), dx_c)}
        errs.update({n: rel_err(g[n].cpu(), g_c[n]) for n in g_c})
        print(kind, mode, {k_: f"{e:.1e}" for k_, e in errs.items()})
        tol = TOL[mode]
        assert errs.pop("y") < tol["value"]
        bad = {n: e for n, e in errs.items() if not e < tol["grad"]}
        assert not bad, bad


@pytest.mark.parametrize("pattern", ["RA", "LA", "NA"])
def test_compiled_blocks_match_eager_on_cuda(pattern):
    from neollm.model.args import FLAVORS
    from neollm.model.model import NeoLLM
    from neollm.parallelize import compile_blocks

    args = dataclasses.replace(FLAVORS["debug"], layer_pattern=pattern, vocab_size=1024, max_seq_len=128)
    with torch.device("meta"):
        model = NeoLLM(args)
    model.to_empty(device="cuda")
    torch.manual_seed(0)
    model.init_weights()
    tokens = torch.randint(0, args.vocab_size, (2, 100), device="cuda")
    expected = model(tokens)
    compile_blocks(model, "inductor")
    out = model(tokens)
    assert rel_err(out, expected) < 1e-4
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
