"""CPU tests of Gated DeltaNet's custom ops (neollm/kernels/gdn_ops.py) and of a GDN block compiled whole.

On CPU the ops run the pure-PyTorch references, so these tests check what is shared with the GPU: the op
schemas, the fake (meta) functions, the autograd formulas and the backward ops, against references written
independently (the token-by-token recurrence and a per-tap conv loop). Injected errors (a wrong sign in the
backward, a wrong shape in the fake) must make the checks fail.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from neollm.kernels import gdn_ops
from neollm.kernels.gated_delta_rule import recurrent_gated_delta_rule
from neollm.model.args import FLAVORS
from neollm.model.model import NeoLLM
from neollm.parallelize import FULLGRAPH_MIXERS, SAC_SAVE_OPS, compile_blocks

# fp64: the chunked and token-by-token algorithms agree to rounding (1e-8 is ~1e6 ulps of slack for
# T = 70); fp32: both accumulate in fp32, measured differences ~1e-6, allowed 2e-5.
TOL = {torch.float64: 1e-8, torch.float32: 2e-5}


def _rule_inputs(dtype, B=2, T=70, H=2, K=8, V=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    g = -F.softplus(torch.randn(B, T, H, generator=gen, dtype=dtype) * 2 - 1)
    beta = torch.rand(B, T, H, generator=gen, dtype=dtype)
    do = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    return [t.requires_grad_(True) for t in (q, k, v, g, beta)], do


def _conv_inputs(dtype, B=2, T=19, C=12, W=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(C, W, generator=gen, dtype=dtype, requires_grad=True)
    dy = torch.randn(B, T, C, generator=gen, dtype=dtype)
    return x, w, dy


def _conv_per_tap(x, w):
    """y_t = silu(sum_j w[:, j] x_{t-(W-1)+j}), one tap at a time (written from fla's definition)."""
    T, W = x.shape[1], w.shape[1]
    y = torch.zeros_like(x)
    for j in range(W):
        shift = W - 1 - j
        y[:, shift:] = y[:, shift:] + w[:, j] * x[:, : T - shift]
    return y * torch.sigmoid(y)


def check_rule_against_recurrence(dtype, chunk_size=16):
    inputs, do = _rule_inputs(dtype)
    scale = 0.37
    o = gdn_ops.chunk_gated_delta_rule(*inputs, scale, chunk_size)
    grads = torch.autograd.grad(o, inputs, do)
    o_ref, _ = recurrent_gated_delta_rule(*inputs, scale=scale)
    grads_ref = torch.autograd.grad(o_ref, inputs, do)
    tol = TOL[dtype]
    assert o.dtype == dtype and o.shape == o_ref.shape
    torch.testing.assert_close(o, o_ref, atol=tol, rtol=tol)
    for name, a, b in zip(("q", "k", "v", "g", "beta"), grads, grads_ref):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m, n=name: f"grad {n}: {m}")


def check_conv_against_taps(dtype):
    x, w, dy = _conv_inputs(dtype)
    y = gdn_ops.causal_conv1d_silu(x, w)
    grads = torch.autograd.grad(y, (x, w), dy)
    y_ref = _conv_per_tap(x, w)
    grads_ref = torch.autograd.grad(y_ref, (x, w), dy)
    tol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    for name, a, b in zip(("x", "weight"), grads, grads_ref):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m, n=name: f"grad {n}: {m}")


# --------------------------------------------------------------------------------------------- values, grads
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_rule_op_matches_recurrence(dtype, chunk_size):
    check_rule_against_recurrence(dtype, chunk_size)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_conv_op_matches_per_tap_loop(dtype):
    check_conv_against_taps(dtype)


def test_rule_op_bf16_within_its_rounding():
    """bf16 inputs: the op computes in fp32 inside and rounds the output once (relative error ~2^-9)."""
    inputs, _ = _rule_inputs(torch.float32)
    o32 = gdn_ops.chunk_gated_delta_rule(*inputs, 0.37, 64)
    q, k, v = (t.detach().bfloat16() for t in inputs[:3])
    o16 = gdn_ops.chunk_gated_delta_rule(q, k, v, inputs[3].detach(), inputs[4].detach().bfloat16(), 0.37, 64)
    assert o16.dtype == torch.bfloat16
    rel = ((o16.float() - o32).norm() / o32.norm()).item()
    assert rel < 2e-2, rel


def test_ops_reject_bad_shapes():
    inputs, _ = _rule_inputs(torch.float32)
    q, k, v, g, beta = (t.detach() for t in inputs)
    with pytest.raises(ValueError, match="g and beta"):
        gdn_ops.chunk_gated_delta_rule(q, k, v, g[:, :-1], beta, 1.0, 64)
    with pytest.raises(ValueError, match="one dtype"):
        gdn_ops.chunk_gated_delta_rule(q.double(), k, v, g, beta, 1.0, 64)
    with pytest.raises(ValueError, match="chunk_size"):
        gdn_ops.chunk_gated_delta_rule(q, k, v, g, beta, 1.0, 48)
    x, w, _ = _conv_inputs(torch.float32)
    with pytest.raises(ValueError, match=r"weight \[C, W\]"):
        gdn_ops.causal_conv1d_silu(x, w[:-1])


# --------------------------------------------------------------------------------------------- opcheck
def _opcheck_cases():
    (q, k, v, g, beta), do = _rule_inputs(torch.float64, T=40)
    x, w, dy = _conv_inputs(torch.float64)
    plain = lambda ts: [t.detach() for t in ts]  # noqa: E731
    return [
        (torch.ops.neollm.chunk_gated_delta_rule.default, (q, k, v, g, beta, 0.37, 16)),
        (torch.ops.neollm.chunk_gated_delta_rule_bwd.default, (*plain([q, k, v, g, beta]), do, 0.37, 16)),
        (torch.ops.neollm.causal_conv1d_silu.default, (x, w)),
        (torch.ops.neollm.causal_conv1d_silu_bwd.default, (*plain([x, w]), dy)),
    ]


ALL_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("case", range(4), ids=["rule", "rule_bwd", "conv", "conv_bwd"])
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    result = torch.library.opcheck(op, args, test_utils=ALL_CHECKS)
    assert set(result) == set(ALL_CHECKS) and set(result.values()) == {"SUCCESS"}, result


# --------------------------------------------------------------------------------------------- injected errors
@pytest.fixture
def restore_rule_registrations():
    yield
    gdn_ops.chunk_gated_delta_rule.register_autograd(gdn_ops._rule_backward, setup_context=gdn_ops._rule_setup)
    gdn_ops.chunk_gated_delta_rule.register_fake(gdn_ops._rule_fake)


def test_wrong_sign_in_backward_is_caught(restore_rule_registrations):
    def flipped(ctx, do):
        dq, *rest = gdn_ops._rule_backward(ctx, do)
        return (-dq, *rest)

    gdn_ops.chunk_gated_delta_rule.register_autograd(flipped, setup_context=gdn_ops._rule_setup)
    with pytest.raises(AssertionError, match="grad q"):
        check_rule_against_recurrence(torch.float64)


def test_wrong_fake_is_caught(restore_rule_registrations):
    def transposed_fake(q, k, v, g, beta, scale, chunk_size=64):
        return v.new_empty(v.shape[0], v.shape[2], v.shape[1], v.shape[3])  # [B, H, T, V]: wrong layout

    gdn_ops.chunk_gated_delta_rule.register_fake(transposed_fake)
    op, args = _opcheck_cases()[0]
    with pytest.raises(Exception):
        torch.library.opcheck(op, args, test_utils=("test_faketensor",))


def test_wrong_sign_in_conv_backward_is_caught():
    def flipped(ctx, dy):
        dx, dw = gdn_ops._conv_backward(ctx, dy)
        return dx, -dw

    gdn_ops.causal_conv1d_silu.register_autograd(flipped, setup_context=gdn_ops._conv_setup)
    try:
        with pytest.raises(AssertionError, match="grad weight"):
            check_conv_against_taps(torch.float64)
    finally:
        gdn_ops.causal_conv1d_silu.register_autograd(gdn_ops._conv_backward, setup_context=gdn_ops._conv_setup)


# --------------------------------------------------------------------------------------------- whole blocks
# The hybrid flavor's techniques (FAN, PolyNorm MLP, LayerNorm scaling, GPAS) on two GDN layers only:
# compiling its attention block on 2 CPU cores would take most of a minute and tests nothing of this file.
HYBRID = dataclasses.replace(
    FLAVORS["neollm_110m_hybrid"], dim=64, n_layers=2, layer_pattern="D", n_heads=4, n_kv_heads=2,
    head_dim=16, ffn_hidden_dim=96, vocab_size=128, max_seq_len=64, gdn_num_heads=2, gdn_head_dim=16,
)


def _model() -> NeoLLM:
    torch.manual_seed(0)
    model = NeoLLM(HYBRID)
    model.init_weights()
    return model.double()


def _tokens() -> torch.Tensor:
    return torch.randint(0, HYBRID.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))


def test_gdn_block_traces_as_one_graph():
    """torch._dynamo.explain over a whole GDN block (norms, FAN, mixer, PolyNorm MLP, GPAS): no breaks."""
    model = _model()
    block = model.layers["0"]
    assert block.mixer_code == "D" and "D" in FULLGRAPH_MIXERS
    captured = {}

    def grab(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    model(_tokens())
    handle.remove()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(*captured["args"], **captured["kwargs"])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    targets = {str(n.target) for gm in explanation.graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert {"neollm.chunk_gated_delta_rule.default", "neollm.causal_conv1d_silu.default"} <= targets, targets


def test_compiled_hybrid_matches_eager():
    """compile_blocks compiles GDN blocks with fullgraph=True (a break would raise); loss and every
    gradient equal the eager model's (fp64, aot_eager: the same ops, so to rounding)."""
    results = []
    for compiled in (False, True):
        model = _model()
        if compiled:
            torch._dynamo.reset()
            compile_blocks(model, "aot_eager")
        tokens = _tokens()
        loss = model(tokens, tokens)
        loss.backward()
        grads = {n.replace("_orig_mod.", ""): p.grad for n, p in model.named_parameters()}
        results.append((loss.detach(), grads))
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0, atol=1e-12, rtol=0)
    assert grads0.keys() == grads1.keys()
    gdn_grads = [n for n in grads0 if ".mixer." in n and "A_log" in n]
    assert gdn_grads, "the flavor should contain GDN layers"
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], atol=1e-10, rtol=1e-8, msg=lambda m, n=name: f"{n}: {m}")


def test_selective_ac_saves_the_gdn_ops():
    assert set(gdn_ops.GDN_OPS) <= SAC_SAVE_OPS


def test_selective_op_ac_through_the_ops_matches_plain():
    """checkpoint_blocks with selective-op AC (the ops' outputs saved, the rest recomputed): same gradients."""
    from torchtitan.config import ActivationCheckpoint

    from neollm.parallelize import checkpoint_blocks

    results = []
    for ac in (None, ActivationCheckpoint(mode="selective", selective_ac_option="op")):
        model = _model()
        if ac is not None:
            checkpoint_blocks(model, ac, compile_model=False)
        tokens = _tokens()
        model(tokens, tokens).backward()
        clean = lambda n: n.replace("_checkpoint_wrapped_module.", "")  # noqa: E731
        results.append({clean(n): p.grad for n, p in model.named_parameters()})
    assert results[0].keys() == results[1].keys()
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], atol=1e-12, rtol=1e-10)
