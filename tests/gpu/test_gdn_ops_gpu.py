"""GPU checks of Gated DeltaNet's custom ops (neollm/kernels/gdn_ops.py): fla's kernels behind the ops.

* the delta-rule op (fla's chunk kernels, backward with the intra-chunk factor recomputed, Hopper fix inside)
  against fla's own token-by-token reference ``naive_recurrent_gated_delta_rule`` (fp32), values and grads;
* the conv op (fla's Triton causal conv) against the PyTorch conv reference, values and grads;
* torch.library.opcheck of all four ops with CUDA tensors (fake functions, autograd, AOT dispatch);
* a hybrid GDN block compiled by inductor with fullgraph=True against eager, and no graph breaks.

Metric and tolerances as tests/gpu/test_gdn_gpu.py (relative RMS error; fp32 is TF32 inside Triton's dots,
bf16 keeps fla's intermediates in bf16). A wrong kernel, a sign error in a backward or a transposed layout
gives O(1) errors.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from gpu_checks import GPU_ONLY, rel_err

pytestmark = GPU_ONLY

TOL = {
    torch.float32: {"value": 5e-3, "grad": 2e-2},
    torch.bfloat16: {"value": 2.5e-2, "grad": 5e-2},
}
DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])


@DTYPES
@pytest.mark.parametrize("H,K,V", [(4, 64, 128), (8, 64, 64)])
def test_rule_op_matches_fla_naive(H, K, V, dtype):
    naive = pytest.importorskip("fla.ops.gated_delta_rule.naive")
    from neollm.kernels import gdn_ops

    torch.manual_seed(0)
    B, T, dev = 2, 300, "cuda"  # T not a multiple of the chunk
    q = F.normalize(torch.randn(B, T, H, K, device=dev), dim=-1).to(dtype)
    k = F.normalize(torch.randn(B, T, H, K, device=dev), dim=-1).to(dtype)
    v = torch.randn(B, T, H, V, device=dev).to(dtype)
    g = F.logsigmoid(torch.randn(B, T, H, device=dev))  # fp32, as the module passes it
    beta = torch.rand(B, T, H, device=dev).to(dtype)
    do = torch.randn(B, T, H, V, device=dev)
    leaves = [t.requires_grad_(True) for t in (q, k, v, g, beta)]
    scale = K ** -0.5

    o = gdn_ops.chunk_gated_delta_rule(q, k, v, g, beta, scale, 64)
    assert o.dtype == dtype and o.shape == (B, T, H, V)
    grads = torch.autograd.grad((o.float() * do).sum(), leaves)
    o_ref, _ = naive.naive_recurrent_gated_delta_rule(q.float(), k.float(), v.float(), beta.float(), g, scale=scale)
    grads_ref = torch.autograd.grad((o_ref * do).sum(), leaves)

    tol = TOL[dtype]
    errs = {f"d{n}": rel_err(a, b) for n, a, b in zip(("q", "k", "v", "g", "beta"), grads, grads_ref)}
    print(H, K, V, dtype, "o", f"{rel_err(o, o_ref):.1e}", {n: f"{e:.1e}" for n, e in errs.items()})
    assert rel_err(o, o_ref) < tol["value"]
    bad = {n: e for n, e in errs.items() if not e < tol["grad"]}
    assert not bad, bad


@DTYPES
def test_conv_op_matches_reference(dtype):
    from neollm.kernels import gdn_ops

    torch.manual_seed(0)
    B, T, C, W = 2, 300, 4 * 64 * 4, 4  # NeoLLM's fused q/k/v channels: 2 H K + H V at H 4, K 64, V 128
    x = torch.randn(B, T, C, device="cuda").to(dtype).requires_grad_(True)
    w = (torch.randn(C, W, device="cuda") * 0.5).to(dtype).requires_grad_(True)
    dy = torch.randn(B, T, C, device="cuda")
    y = gdn_ops.causal_conv1d_silu(x, w)
    assert y.dtype == dtype
    grads = torch.autograd.grad((y.float() * dy).sum(), (x, w))
    x32, w32 = x.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    y_ref = gdn_ops.causal_conv1d_silu_ref(x32, w32)
    grads_ref = torch.autograd.grad((y_ref * dy).sum(), (x32, w32))
    tol = TOL[dtype]
    errs = {"y": rel_err(y, y_ref), "dx": rel_err(grads[0], grads_ref[0]), "dw": rel_err(grads[1], grads_ref[1])}
    print(dtype, {n: f"{e:.1e}" for n, e in errs.items()})
    assert errs.pop("y") < tol["value"]
    assert all(e < tol["grad"] for e in errs.values()), errs


def test_opcheck_cuda():
    from neollm.kernels import gdn_ops  # noqa: F401  (registers the ops)

    torch.manual_seed(0)
    B, T, H, K, V, dev = 1, 128, 2, 64, 64, "cuda"
    q = F.normalize(torch.randn(B, T, H, K, device=dev), dim=-1).requires_grad_(True)
    k = F.normalize(torch.randn(B, T, H, K, device=dev), dim=-1).requires_grad_(True)
    v = torch.randn(B, T, H, V, device=dev, requires_grad=True)
    g = F.logsigmoid(torch.randn(B, T, H, device=dev)).requires_grad_(True)
    beta = torch.rand(B, T, H, device=dev, requires_grad=True)
    do = torch.randn(B, T, H, V, device=dev)
    x = torch.randn(B, T, 96, device=dev, requires_grad=True)
    w = torch.randn(96, 4, device=dev, requires_grad=True)
    plain = [t.detach() for t in (q, k, v, g, beta)]
    cases = [
        (torch.ops.neollm.chunk_gated_delta_rule.default, (q, k, v, g, beta, K ** -0.5, 64)),
        (torch.ops.neollm.chunk_gated_delta_rule_bwd.default, (*plain, do, K ** -0.5, 64)),
        (torch.ops.neollm.causal_conv1d_silu.default, (x, w)),
        (torch.ops.neollm.causal_conv1d_silu_bwd.default, (x.detach(), w.detach(), torch.randn_like(x))),
    ]
    for op, args in cases:
        # TF32 inside the kernels: opcheck's aot_dispatch test compares two runs of the same kernel, exact enough
        result = torch.library.opcheck(op, args, atol=1e-3, rtol=1e-3)
        assert set(result.values()) == {"SUCCESS"}, (op, result)


def test_compiled_gdn_block_one_graph_matches_eager():
    from neollm.model.args import FLAVORS
    from neollm.model.model import NeoLLM
    from neollm.parallelize import compile_blocks

    args = dataclasses.replace(FLAVORS["neollm_110m_hybrid"], n_layers=2, layer_pattern="D", vocab_size=1024)
    tokens = torch.randint(0, args.vocab_size, (4, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(1))

    def run(compiled: bool):
        torch.manual_seed(0)
        model = NeoLLM(args).cuda()
        model.init_weights()
        if compiled:
            torch._dynamo.reset()
            compile_blocks(model, "inductor")  # fullgraph=True for GDN blocks: a break raises
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens, tokens)
        loss.backward()
        return loss.detach().float(), {n.replace("_orig_mod.", ""): p.grad.float() for n, p in model.named_parameters()}

    loss0, grads0 = run(False)
    loss1, grads1 = run(True)
    assert abs(loss1.item() - loss0.item()) < 1e-2 * abs(loss0.item())
    errs = {n: rel_err(grads1[n], grads0[n]) for n in grads0}
    worst = max(errs.items(), key=lambda kv: kv[1])
    print("loss", loss0.item(), loss1.item(), "worst grad", worst)
    assert worst[1] < 5e-2, worst

    model = NeoLLM(args).cuda()
    model.init_weights()
    captured = {}
    model.layers["0"].register_forward_pre_hook(
        lambda mod, a, kw: captured.update(args=a, kwargs=kw), with_kwargs=True)
    with torch.no_grad():
        model(tokens)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model.layers["0"])(*captured["args"], **captured["kwargs"])
    assert explanation.graph_break_count == 0, explanation.break_reasons
