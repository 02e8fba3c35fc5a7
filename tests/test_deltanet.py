"""CPU tests of the Gated DeltaNet references, the GatedDeltaNet module (torch backend) and the fla Hopper shim."""

from __future__ import annotations

import importlib

import math

import pytest
import torch
import torch.nn.functional as F

from neollm.kernels import fla_compat
from neollm.kernels.gated_delta_rule import chunk_gated_delta_rule_ref, recurrent_gated_delta_rule
from neollm.model.mixers.deltanet import GatedDeltaNet, gdn_flops_per_token


def _inputs(B, T, H, K, V, dtype=torch.float64, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=dtype)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    # log decays spanning weak to strong forgetting (exp(g) from ~1 down to ~e^-4)
    g = -F.softplus(torch.randn(B, T, H, generator=gen, dtype=dtype) * 2 - 1)
    beta = torch.rand(B, T, H, generator=gen, dtype=dtype)
    h0 = torch.randn(B, H, K, V, generator=gen, dtype=dtype) * 0.5
    ts = [q, k, v, g, beta, h0]
    if requires_grad:
        for t in ts:
            t.requires_grad_(True)
    return ts


# --------------------------------------------------------------------------------------------- references
def _paper_recurrence(q, k, v, g, beta, h0=None, scale=None):
    """Gated DeltaNet as the paper writes it (Yang et al. 2024, eq. 10, state as [K, V]), one
    (batch, head, token) at a time with explicit matrices, sharing nothing with neollm.kernels:
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = S_t^T (q_t / sqrt(K))."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    eye = torch.eye(K, dtype=q.dtype)
    outs, finals = [], []
    for b in range(B):
        per_head_out, per_head_state = [], []
        for h in range(H):
            S = h0[b, h] if h0 is not None else torch.zeros(K, V, dtype=q.dtype)
            rows = []
            for t in range(T):
                kt, bt = k[b, t, h], beta[b, t, h]
                S = torch.exp(g[b, t, h]) * (eye - bt * torch.outer(kt, kt)) @ S + bt * torch.outer(kt, v[b, t, h])
                rows.append(S.T @ (q[b, t, h] * scale))
            per_head_out.append(torch.stack(rows))  # [T, V]
            per_head_state.append(S)
        outs.append(torch.stack(per_head_out, dim=1))  # [T, H, V]
        finals.append(torch.stack(per_head_state))  # [H, K, V]
    return torch.stack(outs), torch.stack(finals)


@pytest.mark.parametrize("use_h0", [False, True])
@pytest.mark.parametrize("T,chunk", [(77, 32), (100, 64), (5, 16)])
def test_chunk_and_recurrent_match_the_paper_fp64(use_h0, T, chunk):
    """Both torch references (token loop and chunked) against the paper's recurrence written here:
    outputs, final state and every input's gradient, in float64."""
    B, H, K, V = 2, 2, 8, 6
    q, k, v, g, beta, h0 = _inputs(B, T, H, K, V, requires_grad=True)
    init = h0 if use_h0 else None
    gen = torch.Generator().manual_seed(1)
    w_o = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    w_s = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    leaves = [q, k, v, g, beta] + ([h0] if use_h0 else [])

    def outputs_and_grads(fn, **kw):
        o, s = fn(**kw)
        loss = (o * w_o).sum() + (s * w_s).sum()
        return o, s, torch.autograd.grad(loss, leaves)

    o_ref, s_ref, g_ref = outputs_and_grads(lambda: _paper_recurrence(q, k, v, g, beta, init))
    for fn, kw in ((recurrent_gated_delta_rule, {}), (chunk_gated_delta_rule_ref, {"chunk_size": chunk})):
        o, s, grads = outputs_and_grads(
            lambda: fn(q, k, v, g, beta, initial_state=init, output_final_state=True, **kw))
        assert o.dtype == torch.float64 and s.shape == (B, H, K, V)
        torch.testing.assert_close(o, o_ref, atol=1e-8, rtol=0)
        torch.testing.assert_close(s, s_ref, atol=1e-8, rtol=0)
        for name, a, b in zip("q k v g beta h0".split(), grads, g_ref):
            torch.testing.assert_close(a, b, atol=1e-8, rtol=0, msg=lambda m, n=name: f"{fn.__name__} grad {n}: {m}")


def test_reference_defaults_and_dtypes():
    q, k, v, g, beta, _ = _inputs(1, 40, 2, 8, 4, dtype=torch.float32)
    o_def, s = chunk_gated_delta_rule_ref(q, k, v, g, beta)
    assert s is None
    o_exp, _ = chunk_gated_delta_rule_ref(q, k, v, g, beta, scale=8 ** -0.5)
    torch.testing.assert_close(o_def, o_exp, atol=0, rtol=0)
    ob, sb = recurrent_gated_delta_rule(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta, output_final_state=True)
    assert ob.dtype == torch.bfloat16 and sb.dtype == torch.float32


def test_chunk_strong_decay_is_finite():
    # g = -60 per token: exp(gamma) underflows within a chunk; exponents must be masked before exp (no inf*0).
    q, k, v, _, beta, _ = _inputs(1, 130, 2, 8, 4, dtype=torch.float32)
    g = torch.full((1, 130, 2), -60.0)
    g.requires_grad_(True)
    o, s = chunk_gated_delta_rule_ref(q, k, v, g, beta, output_final_state=True)
    o.sum().backward()
    assert torch.isfinite(o).all() and torch.isfinite(s).all() and torch.isfinite(g.grad).all()
    o_rec, _ = recurrent_gated_delta_rule(q, k, v, g.detach(), beta)
    torch.testing.assert_close(o, o_rec, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_h0", [False, True])
def test_references_match_fla_naive(use_h0):
    naive = importlib.import_module("fla.ops.gated_delta_rule.naive")
    B, T, H, K, V = 2, 90, 2, 16, 8
    q, k, v, g, beta, h0 = _inputs(B, T, H, K, V, dtype=torch.float32, seed=3)
    init = h0 if use_h0 else None
    # argument orders differ in fla: recurrent takes (q, k, v, beta, g), chunk takes (q, k, v, g, beta)
    o_fr, s_fr = naive.naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=init, output_final_state=True)
    o_fc, s_fc = naive.naive_chunk_gated_delta_rule(
        q, k, v, g, beta, chunk_size=32, initial_state=init, output_final_state=True
    )
    o_r, s_r = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=init, output_final_state=True)
    o_c, s_c = chunk_gated_delta_rule_ref(q, k, v, g, beta, chunk_size=32, initial_state=init, output_final_state=True)
    for ours, theirs in ((o_r, o_fr), (o_c, o_fc), (o_c, o_fr), (s_r, s_fr), (s_c, s_fc)):
        torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------------------------- the module
def _module(dtype=torch.float64, dim=24, H=2, K=8, expand_v=1.5, conv=4, seed=0) -> GatedDeltaNet:
    torch.manual_seed(seed)
    m = GatedDeltaNet(dim, num_heads=H, head_dim=K, expand_v=expand_v, conv_size=conv, backend="torch")
    m.init_weights(init_std=0.2)  # larger than the default so every term matters numerically
    return m.to(dtype)


def _per_token_reference(m: GatedDeltaNet, x: torch.Tensor) -> torch.Tensor:
    """Written from the math (fla/layers/gated_deltanet.py), one token at a time, from m's parameters."""
    B, T, _ = x.shape
    H, K, V, W = m.num_heads, m.head_k_dim, m.head_v_dim, m.conv_size

    def conv_silu(z, weight):  # z [B, T, C], weight [C, 1, W]; y_t = sum_j w_j z_{t-(W-1)+j}
        out = torch.zeros_like(z)
        for t in range(T):
            for j in range(W):
                s = t - (W - 1) + j
                if s >= 0:
                    out[:, t] = out[:, t] + weight[:, 0, j] * z[:, s]
        return out * torch.sigmoid(out)

    q = conv_silu(x @ m.q_proj.weight.T, m.q_conv1d.weight).view(B, T, H, K)
    k = conv_silu(x @ m.k_proj.weight.T, m.k_conv1d.weight).view(B, T, H, K)
    v = conv_silu(x @ m.v_proj.weight.T, m.v_conv1d.weight).view(B, T, H, V)
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    beta = 1 / (1 + torch.exp(-(x @ m.b_proj.weight.T)))
    dt = torch.log1p(torch.exp(x @ m.a_proj.weight.T + m.dt_bias))
    decay = torch.exp(-torch.exp(m.A_log) * dt)  # [B, T, H]
    gate = (x @ m.g_proj.weight.T).view(B, T, H, V)
    out = torch.zeros(B, T, H, V, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            S = torch.zeros(K, V, dtype=x.dtype)
            for t in range(T):
                kt, vt, bt = k[b, t, h], v[b, t, h], beta[b, t, h]
                S = decay[b, t, h] * (S - bt * torch.outer(kt, kt @ S)) + bt * torch.outer(kt, vt)
                o = S.T @ q[b, t, h] / math.sqrt(K)
                o = o / torch.sqrt((o * o).mean() + m.norm_eps) * m.o_norm.weight
                gt = gate[b, t, h]
                out[b, t, h] = o * gt * torch.sigmoid(gt)
    return out.reshape(B, T, H * V) @ m.o_proj.weight.T


def test_module_matches_per_token_reference():
    m = _module()
    x = torch.randn(2, 23, m.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        y = m(x)
        y_ref = _per_token_reference(m, x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-9)


def test_module_chunking_invisible():
    # the torch path's chunk size must not change the output (T spans several chunks with a ragged tail)
    m = _module()
    x = torch.randn(1, 150, m.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        y64 = m(x)
        m.chunk_size = 16
        y16 = m(x)
    torch.testing.assert_close(y16, y64, atol=1e-11, rtol=0)


def test_module_is_causal():
    m = _module()
    x = torch.randn(2, 90, m.hidden_size, dtype=torch.float64)
    t = 40
    x2 = x.clone()
    x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
    with torch.no_grad():
        y, y2 = m(x), m(x2)
    torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], atol=1e-12, rtol=0)
    assert (y2[:, t + 1:] - y[:, t + 1:]).abs().max() > 1e-3


def test_meta_construction_then_init():
    H = 256  # many heads so the A_log / dt_bias ranges are exercised
    with torch.device("meta"):
        m = GatedDeltaNet(64, num_heads=H, head_dim=4, expand_v=2.0)
    assert all(p.is_meta for p in m.parameters())
    m.to_empty(device="cpu")
    m.init_weights(init_std=0.02, out_std=0.005)
    for name, p in m.named_parameters():
        assert torch.isfinite(p).all(), name
    A = m.A_log.exp()
    assert ((A >= 0) & (A <= 16)).all() and A.max() > 8 and A.min() < 8
    dt = F.softplus(m.dt_bias)
    assert ((dt >= 1e-3 * (1 - 1e-4)) & (dt <= 0.1 * (1 + 1e-4))).all()
    assert m.A_log._no_weight_decay and m.dt_bias._no_weight_decay
    big = GatedDeltaNet(256, num_heads=4, head_dim=64)
    big.init_weights(init_std=0.02, out_std=0.005)
    assert abs(big.v_proj.weight.std().item() - 0.02) < 0.002
    assert abs(big.o_proj.weight.std().item() - 0.005) < 0.0005
    bound = 1 / math.sqrt(big.conv_size)  # nn.Conv1d default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = W
    assert big.v_conv1d.weight.abs().max() <= bound
    assert torch.equal(big.o_norm.weight, torch.ones_like(big.o_norm.weight))
    y = m(torch.randn(2, 10, 64))
    assert torch.isfinite(y).all()


def test_state_dict_matches_fla_layer():
    fla_layers = importlib.import_module("fla.layers")
    dim, H, K, ev, W = 96, 3, 16, 2.0, 4
    ours = GatedDeltaNet(dim, num_heads=H, head_dim=K, expand_v=ev, conv_size=W)
    theirs = fla_layers.GatedDeltaNet(
        hidden_size=dim, head_dim=K, num_heads=H, expand_v=ev, mode="chunk",
        use_gate=True, use_short_conv=True, conv_size=W,
    )
    sd_o, sd_t = ours.state_dict(), theirs.state_dict()
    assert list(sd_o) == list(sd_t)
    for key in sd_t:
        assert sd_o[key].shape == sd_t[key].shape and sd_o[key].dtype == sd_t[key].dtype, key
    ours.load_state_dict(sd_t, strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)


def test_gradients_reach_every_parameter():
    m = _module(dtype=torch.float32)
    x = torch.randn(2, 70, m.hidden_size)
    m(x).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_autocast_bf16_cpu():
    m = _module(dtype=torch.float32)
    x = torch.randn(2, 50, m.hidden_size)
    y32 = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    rel = (y.float() - y32).norm() / y32.norm()
    assert rel < 3e-2, rel
    y.float().square().mean().backward()
    assert m.A_log.grad is not None and m.A_log.grad.abs().max() > 0
    assert m.dt_bias.grad is not None and m.dt_bias.grad.abs().max() > 0


def test_backend_validation():
    with pytest.raises(ValueError):
        GatedDeltaNet(16, 2, 8, backend="cuda")
    m = GatedDeltaNet(16, 2, 8, backend="fla")
    with pytest.raises(ValueError):
        m(torch.randn(1, 4, 16))  # fla needs CUDA


def test_flops_per_token():
    dim, H, K, ev, W, C = 512, 4, 64, 2.0, 4, 64
    m = GatedDeltaNet(dim, H, K, expand_v=ev, conv_size=W)
    linear = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    V = int(K * ev)
    rec = H * (3 * (6 * C * K + 4 * C * V + 6 * K * V) + C * C)
    expected = 6 * linear + 6 * W * (2 * H * K + H * V) + rec
    assert gdn_flops_per_token(dim, H, K, ev, W) == expected
    assert isinstance(expected, int)


# --------------------------------------------------------------------------------------------- fla shim
def test_fla_workaround_noop_without_hopper():
    if torch.cuda.is_available() and any(
        torch.cuda.get_device_capability(i)[0] == 9 for i in range(torch.cuda.device_count())
    ):
        pytest.skip("a Hopper GPU is present")
    assert fla_compat.install_fla_hopper_workaround() is False


def test_fla_workaround_mechanism_simulated_hopper(monkeypatch):
    """On CPU, pretend to be an H100 with Triton 3.6: the stock call raises (#640), the patched one uses BK=32."""
    chunk_o = importlib.import_module("fla.ops.common.chunk_o")
    gdr_chunk = importlib.import_module("fla.ops.gated_delta_rule.chunk")

    seen = {}

    class FakeKernel:  # stands in for the Triton kernel: records the tiling it is launched with
        def __getitem__(self, grid):
            def launch(**kw):
                seen.update(BK=kw["BK"], BV=kw["BV"], hopper_during=chunk_o.IS_NVIDIA_HOPPER)
            return launch

    monkeypatch.setattr(chunk_o, "chunk_bwd_kernel_dqkwg", FakeKernel())
    monkeypatch.setattr(chunk_o, "IS_NVIDIA_HOPPER", True)
    monkeypatch.setattr(chunk_o, "TRITON_ABOVE_3_4_0", True)
    monkeypatch.setattr(chunk_o, "TRITON_ABOVE_3_7_1", False)
    fake_h100 = lambda arch="none", tensor_idx=0: arch in ("none", "hopper", "ampere", "ada")  # noqa: E731
    monkeypatch.setattr(chunk_o, "check_shared_mem", fake_h100)
    monkeypatch.setattr(gdr_chunk, "chunk_bwd_dqkwg", gdr_chunk.chunk_bwd_dqkwg)  # restored after the test
    sgla_chunk = importlib.import_module("fla.ops.simple_gla.chunk")
    monkeypatch.setattr(sgla_chunk, "chunk_bwd_dqkwg", sgla_chunk.chunk_bwd_dqkwg)
    monkeypatch.setattr(fla_compat, "_installed", False)
    monkeypatch.setattr(fla_compat, "_hopper_present", lambda: True)
    monkeypatch.setattr(fla_compat, "_triton_in_broken_range", lambda: True)

    B, T, H, K, V = 1, 64, 2, 64, 128
    args = dict(
        q=torch.zeros(B, T, H, K), k=torch.zeros(B, T, H, K), v=torch.zeros(B, T, H, V),
        w=torch.zeros(B, T, H, K), g=torch.zeros(B, T, H), h=torch.zeros(B, 1, H, K, V),
        dv=torch.zeros(B, T, H, V), do=torch.zeros(B, T, H, V), dh=torch.zeros(B, 1, H, K, V), scale=K ** -0.5,
    )
    with pytest.raises(RuntimeError, match="640"):
        gdr_chunk.chunk_bwd_dqkwg(**args)
    # without the guard the simulated H100 would pick CONST_TILING=128 -> BK=64 (the miscompiled tiling)
    assert fla_compat.install_fla_hopper_workaround() is True
    patched = gdr_chunk.chunk_bwd_dqkwg
    assert fla_compat.install_fla_hopper_workaround() is True and gdr_chunk.chunk_bwd_dqkwg is patched
    patched(**args)
    assert seen == {"BK": 32, "BV": 32, "hopper_during": False}
    assert getattr(sgla_chunk.chunk_bwd_dqkwg, fla_compat._MARK, False)  # Mamba2's simple-GLA backward too
    assert chunk_o.IS_NVIDIA_HOPPER is True and chunk_o.check_shared_mem is fake_h100  # restored after the call
