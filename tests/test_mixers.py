"""CPU tests of the GLA (G), RetNet (T) and Mamba2 (M) mixers: chunked references, the modules' torch paths
against per-token recurrences written here from the papers' math, causality, gradients, init, fla state-dict
compatibility, the model with these layer codes, and FLOPs."""

from __future__ import annotations

import importlib

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from neollm.errors import ConfigError
from neollm.kernels.linear_attention import chunk_gla_ref, chunk_simple_gla_ref
from neollm.model.args import FLAVORS, NeoLLMModelArgs
from neollm.model.flops import training_flops_per_token
from neollm.model.mixers import MIXERS
from neollm.model.mixers.gla import GatedLinearAttention, gla_flops_per_token
from neollm.model.mixers.mamba2 import Mamba2, mamba2_flops_per_token
from neollm.model.mixers.retnet import MultiScaleRetention, retnet_flops_per_token
from neollm.model.model import NeoLLM

f64 = torch.float64


# --------------------------------------------------------------------------------------------- references
def _naive_gla(q, k, v, g, scale):
    """S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = scale S_t^T q_t; g [B,T,H,K] (or [B,T,H] broadcast)."""
    B, T, H, K = q.shape
    if g.dim() == 3:
        g = g[..., None].expand(B, T, H, K)
    S = torch.zeros(B, H, K, v.shape[-1], dtype=f64)
    out = torch.zeros(B, T, H, v.shape[-1], dtype=f64)
    for t in range(T):
        S = g[:, t].exp()[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        out[:, t] = scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S)
    return out, S


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("T,chunk", [(37, 8), (16, 16), (5, 64)])
def test_chunk_refs_match_recurrence(per_channel, T, chunk):
    gen = torch.Generator().manual_seed(T)
    B, H, K, V = 2, 3, 6, 5
    q, k = (torch.randn(B, T, H, K, generator=gen, dtype=f64) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen, dtype=f64)
    g = F.logsigmoid(2 * torch.randn(B, T, H, *((K,) if per_channel else ()), generator=gen, dtype=f64))
    fn = chunk_gla_ref if per_channel else chunk_simple_gla_ref
    o, s = fn(q, k, v, g, scale=0.3, chunk_size=chunk, output_final_state=True)
    o_ref, s_ref = _naive_gla(q, k, v, g, 0.3)
    torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(s, s_ref, atol=1e-10, rtol=0)


def test_chunk_refs_strong_decay_finite_and_match_fla_naive():
    naive = importlib.import_module("fla.ops.gla.naive")
    gen = torch.Generator().manual_seed(0)
    B, T, H, K, V = 1, 70, 2, 8, 4
    q, k = (torch.randn(B, T, H, K, generator=gen) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen)
    g = torch.full((B, T, H, K), -60.0, requires_grad=True)  # exp underflows inside a chunk: must mask first
    o, _ = chunk_gla_ref(q, k, v, g)
    o.sum().backward()
    assert torch.isfinite(o).all() and torch.isfinite(g.grad).all()
    g2 = F.logsigmoid(torch.randn(B, T, H, K, generator=gen))
    o_fla, s_fla = naive.naive_recurrent_gla(q, k, v, g2, output_final_state=True)
    o2, s2 = chunk_gla_ref(q, k, v, g2, output_final_state=True)
    torch.testing.assert_close(o2, o_fla, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(s2, s_fla, atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------------------------- modules
def _make(code: str, dtype=f64, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    if code == "G":
        m = GatedLinearAttention(24, num_heads=2, head_k_dim=8, head_v_dim=12, gate_low_rank_dim=4, backend="torch")
    elif code == "T":
        m = MultiScaleRetention(24, num_heads=3, head_k_dim=8, head_v_dim=6, backend="torch")
    else:
        m = Mamba2(16, head_dim=8, state_size=6, expand=2, conv_size=4, backend="torch")
    m.init_weights(init_std=0.2)  # larger than the default so every term matters numerically
    if code == "G":  # spread the forget gates (bias 0 would give every channel the same decay)
        nn.init.normal_(m.gk_proj[1].bias, std=2.0)
    return m.to(dtype)


def _silu(x):
    return x * torch.sigmoid(x)


def _norm_gate(o, gate, weight, eps):
    """Per-head RMSNorm with gain, times SiLU(gate) (fla's FusedRMSNormGated, swish)."""
    return o / torch.sqrt((o * o).mean(-1, keepdim=True) + eps) * weight * _silu(gate)


def _per_token_gla(m: GatedLinearAttention, x):
    B, T, _ = x.shape
    H, K, V = m.num_heads, m.head_k_dim, m.head_v_dim
    q = (x @ m.q_proj.weight.T).view(B, T, H, K)
    k = (x @ m.k_proj.weight.T).view(B, T, H, K)
    v = (x @ m.v_proj.weight.T).view(B, T, H, V)
    logits = x @ m.gk_proj[0].weight.T @ m.gk_proj[1].weight.T + m.gk_proj[1].bias
    decay = torch.sigmoid(logits).pow(1 / 16).view(B, T, H, K)  # exp(logsigmoid(z) / 16)
    gate = (x @ m.g_proj.weight.T).view(B, T, H, V)
    out = torch.zeros(B, T, H, V, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            S = torch.zeros(K, V, dtype=x.dtype)
            for t in range(T):
                S = decay[b, t, h][:, None] * S + torch.outer(k[b, t, h], v[b, t, h])
                o = S.T @ q[b, t, h] / math.sqrt(K)
                out[b, t, h] = _norm_gate(o, gate[b, t, h], m.g_norm_swish_gate.weight, m.norm_eps)
    return out.reshape(B, T, H * V) @ m.o_proj.weight.T


def _rotate(x, t):
    """Rotate-half RoPE (base 10000) of one vector x [K] at position t."""
    K = x.shape[-1]
    half = K // 2
    freq = 10_000.0 ** (-torch.arange(half, dtype=x.dtype) * 2 / K)
    cos, sin = torch.cos(t * freq), torch.sin(t * freq)
    return torch.cat([x[:half] * cos - x[half:] * sin, x[half:] * cos + x[:half] * sin])


def _per_token_retnet(m: MultiScaleRetention, x):
    B, T, _ = x.shape
    H, K, V = m.num_heads, m.head_k_dim, m.head_v_dim
    q = (x @ m.q_proj.weight.T).view(B, T, H, K)
    k = (x @ m.k_proj.weight.T).view(B, T, H, K)
    v = (x @ m.v_proj.weight.T).view(B, T, H, V)
    gate = (x @ m.g_proj.weight.T).view(B, T, H, V)
    out = torch.zeros(B, T, H, V, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            gamma = 1 - 2.0 ** (-5 - h)
            S = torch.zeros(K, V, dtype=x.dtype)
            for t in range(T):
                S = gamma * S + torch.outer(_rotate(k[b, t, h], t), v[b, t, h])
                o = S.T @ _rotate(q[b, t, h], t) / math.sqrt(K)
                out[b, t, h] = _norm_gate(o, gate[b, t, h], m.g_norm_swish_gate.weight, m.norm_eps)
    return out.reshape(B, T, H * V) @ m.o_proj.weight.T


def _per_token_mamba2(m: Mamba2, x):
    B, T, _ = x.shape
    I, H, P, N, W = m.intermediate_size, m.num_heads, m.head_dim, m.ssm_state_size, m.conv_kernel_size
    proj = x @ m.in_proj.weight.T
    z, xbc, dt_raw = proj[..., :I], proj[..., I:I + m.conv_dim], proj[..., I + m.conv_dim:]
    conv = torch.zeros_like(xbc) + m.conv1d.bias
    for t in range(T):
        for j in range(W):
            s = t - (W - 1) + j
            if s >= 0:
                conv[:, t] = conv[:, t] + m.conv1d.weight[:, 0, j] * xbc[:, s]
    conv = _silu(conv)
    xs, Bm, Cm = conv[..., :I].view(B, T, H, P), conv[..., I:I + N], conv[..., I + N:]
    dt = torch.log1p(torch.exp(dt_raw + m.dt_bias))  # softplus
    A = -torch.exp(m.A_log)
    y = torch.zeros(B, T, H, P, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            state = torch.zeros(N, P, dtype=x.dtype)
            for t in range(T):
                state = torch.exp(dt[b, t, h] * A[h]) * state + dt[b, t, h] * torch.outer(Bm[b, t], xs[b, t, h])
                y[b, t, h] = state.T @ Cm[b, t] + m.D[h] * xs[b, t, h]
    y = y.reshape(B, T, I) * _silu(z)
    y = y / torch.sqrt((y * y).mean(-1, keepdim=True) + m.norm_eps) * m.norm.weight
    return y @ m.out_proj.weight.T


_PER_TOKEN = {"G": _per_token_gla, "T": _per_token_retnet, "M": _per_token_mamba2}
CODES = ["G", "T", "M"]


@pytest.mark.parametrize("code", CODES)
def test_module_matches_per_token_recurrence(code):
    m = _make(code)
    x = torch.randn(2, 21, m.hidden_size, dtype=f64)
    m.chunk_size = 8  # several chunks and a ragged tail
    with torch.no_grad():
        y = m(x)
        y_ref = _PER_TOKEN[code](m, x)
    assert y.shape == x.shape and y.dtype == f64
    # fp64 throughout, except RetNet's RoPE table, which is fp32 as attention's (angles to ~1e-7)
    torch.testing.assert_close(y, y_ref, atol=1e-6 if code == "T" else 1e-10, rtol=0)
    assert y_ref.abs().max() > 1e-3  # the comparison is not between two near-zero tensors


@pytest.mark.parametrize("code", CODES)
def test_module_is_causal_and_chunking_invisible(code):
    m = _make(code)
    x = torch.randn(2, 70, m.hidden_size, dtype=f64)
    t = 33
    x2 = x.clone()
    x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
    with torch.no_grad():
        y, y2 = m(x), m(x2)
        m.chunk_size = 32
        y32 = m(x)
    torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], atol=1e-12, rtol=0)
    assert (y2[:, t + 1:] - y[:, t + 1:]).abs().max() > 1e-3
    torch.testing.assert_close(y32, y, atol=1e-11, rtol=0)


@pytest.mark.parametrize("code", CODES)
def test_gradients_reach_every_parameter(code):
    m = _make(code, dtype=torch.float32)
    m(torch.randn(2, 40, m.hidden_size)).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


@pytest.mark.parametrize("code", CODES)
def test_autocast_bf16_close_to_fp32(code):
    m = _make(code, dtype=torch.float32)
    m.init_weights(0.05)
    x = torch.randn(2, 30, m.hidden_size)
    y32 = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    assert (y.float() - y32).norm() / y32.norm() < 3e-2


@pytest.mark.parametrize("code", CODES)
def test_meta_construction_init_and_no_decay_flags(code):
    from neollm.optim.param_groups import decays

    args = dataclasses.replace(FLAVORS["debug"], layer_pattern=code + "A", gdn_backend="torch")
    with torch.device("meta"):
        m = MIXERS[code].build(args, 0)
    assert all(p.is_meta for p in m.parameters())
    m.to_empty(device="cpu")
    torch.manual_seed(0)
    m.init_weights(init_std=0.02, out_std=0.004)
    for name, p in m.named_parameters():
        assert torch.isfinite(p).all(), name
    out = m.o_proj if code != "M" else m.out_proj
    assert abs(out.weight.std().item() - 0.004) < 0.0008
    if code == "M":
        A = m.A_log.exp()
        assert ((A >= 1) & (A <= 16)).all()
        dt = F.softplus(m.dt_bias)
        assert ((dt >= 1e-3 * (1 - 1e-4)) & (dt <= 0.1 * (1 + 1e-4))).all()
        assert torch.equal(m.D, torch.ones_like(m.D))
        for p in (m.A_log, m.dt_bias, m.D):
            assert p._no_weight_decay and not decays(p)
        assert decays(m.in_proj.weight)
    if code == "G":
        assert torch.equal(m.gk_proj[1].bias, torch.zeros_like(m.gk_proj[1].bias))
    y = m(torch.randn(2, 10, args.dim))
    assert y.shape == (2, 10, args.dim) and torch.isfinite(y).all()


def _fla_layer(code: str, dim: int, args: NeoLLMModelArgs):
    layers = importlib.import_module("fla.layers")
    H, K = args.gdn_num_heads, args.gdn_head_dim
    V = int(K * args.gdn_expand_v)
    if code == "G":
        return layers.GatedLinearAttention(hidden_size=dim, expand_k=H * K / dim, expand_v=H * V / dim,
                                           num_heads=H, gate_low_rank_dim=args.gla_gate_low_rank_dim)
    if code == "T":
        return layers.MultiScaleRetention(hidden_size=dim, expand_k=H * K / dim, expand_v=H * V / dim,
                                          num_heads=H)
    return layers.Mamba2(hidden_size=dim, head_dim=args.mamba2_head_dim, state_size=args.mamba2_state_size,
                         expand=args.mamba2_expand, conv_kernel=args.gdn_conv_size, backend="triton")


@pytest.mark.parametrize("code", CODES)
def test_state_dict_matches_fla_layer(code):
    args = dataclasses.replace(FLAVORS["debug"], layer_pattern=code + "A")
    ours = MIXERS[code].build(args, 0)
    theirs = _fla_layer(code, args.dim, args)
    sd_o, sd_t = ours.state_dict(), theirs.state_dict()
    assert list(sd_o) == list(sd_t)
    for key in sd_t:
        assert sd_o[key].shape == sd_t[key].shape and sd_o[key].dtype == sd_t[key].dtype, key
    ours.load_state_dict(sd_t, strict=True)


def test_mamba2_torch_path_matches_fla_torch_forward():
    """fla's own pure-torch Mamba2 (its CPU fallback) on the same weights gives the same output."""
    args = dataclasses.replace(FLAVORS["debug"], layer_pattern="MA", mamba2_state_size=16, mamba2_head_dim=32)
    ours = MIXERS["M"].build(args, 0)
    ours.init_weights(init_std=0.2)
    ours = ours.double()
    theirs = _fla_layer("M", args.dim, args).double()
    theirs.load_state_dict(ours.state_dict())
    from fla.modules.norm.layernorm_gated import rms_norm_ref  # fla's torch twin of its Triton gated norm

    theirs.act = F.silu  # fla's SiLU is a Triton kernel too
    norm = theirs.norm
    norm.forward = lambda y, z: rms_norm_ref(y, norm.weight, None, z=z, eps=ours.norm_eps,
                                             group_size=norm.group_size, norm_before_gate=norm.norm_before_gate)
    x = torch.randn(2, 45, args.dim, dtype=f64)
    with torch.no_grad():
        y_fla, _, _ = theirs.torch_forward(x)
        y = ours(x)
    assert y_fla.abs().max() > 0.1
    torch.testing.assert_close(y, y_fla, atol=1e-5, rtol=1e-5)  # fla's scan upcasts to fp32 only, not fp64


def test_backend_errors():
    for cls, kw in ((GatedLinearAttention, dict(num_heads=2, head_k_dim=8, head_v_dim=8)),
                    (MultiScaleRetention, dict(num_heads=2, head_k_dim=8, head_v_dim=8)), (Mamba2, dict(head_dim=8))):
        with pytest.raises(ValueError, match="backend"):
            cls(16, backend="cuda", **kw)
        with pytest.raises(ValueError, match="CUDA"):
            cls(16, backend="fla", **kw)(torch.randn(1, 4, 16))


# --------------------------------------------------------------------------------------------- model
def _tiny(pattern: str) -> NeoLLMModelArgs:
    return dataclasses.replace(
        FLAVORS["debug"], dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12, ffn_hidden_dim=96,
        vocab_size=101, max_seq_len=64, layer_pattern=pattern, gdn_num_heads=2, gdn_head_dim=16,
        mamba2_head_dim=16, mamba2_state_size=16, gdn_backend="torch")


@pytest.mark.parametrize("pattern", ["GA", "TA", "MA"])
def test_model_trains_with_each_mixer(pattern):
    args = _tiny(pattern)
    with torch.device("meta"):
        model = NeoLLM(args)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights()
    tokens = torch.randint(0, args.vocab_size, (2, 40))
    loss = model(tokens, labels=tokens.roll(-1, 1))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    code = pattern[0]
    mixer = model.layers["0"].mixer
    assert type(mixer) is {"G": GatedLinearAttention, "T": MultiScaleRetention, "M": Mamba2}[code]
    for name, p in mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_flops_per_token_counts():
    dim, H, K, V, r, C = 512, 4, 64, 128, 16, 64
    rec = 3 * H * (2 * C * (K + V) + 4 * K * V)
    g = GatedLinearAttention(dim, H, K, V, gate_low_rank_dim=r)
    lin = sum(mod.weight.numel() for mod in g.modules() if isinstance(mod, nn.Linear))
    assert gla_flops_per_token(dim, H, K, V, r) == 6 * lin + rec
    t = MultiScaleRetention(dim, H, K, V)
    lin = sum(mod.weight.numel() for mod in t.modules() if isinstance(mod, nn.Linear))
    assert retnet_flops_per_token(dim, H, K, V) == 6 * lin + rec
    m = Mamba2(dim, head_dim=64, state_size=128, expand=2, conv_size=4)
    lin = m.in_proj.weight.numel() + m.out_proj.weight.numel()
    Hm = 16
    expected = 6 * lin + 6 * m.conv1d.weight.numel() + 3 * Hm * (2 * C * (128 + 64) + 4 * 128 * 64)
    assert mamba2_flops_per_token(dim, 64, 128, 2, 4) == expected
    # through the registry and the model's total: one mixer's count replaces what attention would cost
    for pattern in ("GA", "TA", "MA"):
        args = _tiny(pattern)
        with torch.device("meta"):
            model = NeoLLM(args)
        per_mixer = MIXERS[pattern[0]].flops_per_token(args, 64)
        assert per_mixer > 0
        attn_args = dataclasses.replace(args, layer_pattern="AA")
        with torch.device("meta"):
            attn_model = NeoLLM(attn_args)
        attn_layer = (training_flops_per_token(attn_model, attn_args, 64)
                      - training_flops_per_token(model, args, 64))
        attn_cost = 6 * sum(p.numel() for n, p in attn_model.layers["0"].mixer.named_parameters()
                            if p.dim() == 2) + 12 * 64 * args.head_dim * args.n_heads
        assert attn_layer == attn_cost - per_mixer


@pytest.mark.parametrize("change,match", [
    (dict(layer_pattern="MA", mamba2_head_dim=48), "mamba2_head_dim"),
    (dict(mamba2_state_size=0), "mamba2_state_size"),
    (dict(gla_gate_low_rank_dim=0), "gla_gate_low_rank_dim"),
    (dict(layer_pattern="TA", gdn_head_dim=15), "gdn_head_dim"),
])
def test_bad_mixer_settings_raise(change, match):
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(FLAVORS["debug"], **change)


def test_registry_lists_the_new_codes():
    assert {"G": "Gated Linear Attention", "M": "Mamba2"}.items() <= {c: s.name for c, s in MIXERS.items()}.items()
    assert MIXERS["T"].name.startswith("RetNet")
    assert all(MIXERS[c].cpu for c in CODES)
