"""CPU tests of the RWKV-6 ("R"), LSTM ("L") and Elman RNN ("N") mixers: references, causality, gradients, models."""

from __future__ import annotations

import importlib

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from neollm.kernels.rwkv6 import chunk_rwkv6_ref
from neollm.model.args import FLAVORS, ModelConfigError, NeoLLMModelArgs
from neollm.model.flops import training_flops_per_token
from neollm.model.mixers import MIXERS, build_mixer
from neollm.model.mixers.rnn import RecurrentMixer, rnn_flops_per_token, rnn_hidden_size, rnn_params
from neollm.model.mixers.rwkv6 import RWKV6, rwkv6_flops_per_token
from neollm.model.model import NeoLLM

D64 = torch.float64


def tiny_args(pattern: str, **changes) -> NeoLLMModelArgs:
    base = dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, ffn_hidden_dim=64, vocab_size=61,
                max_seq_len=48, layer_pattern=pattern, rwkv_proj_low_rank_dim=4, rwkv_gate_low_rank_dim=8,
                rwkv_backend="torch")
    base.update(changes)
    return dataclasses.replace(FLAVORS["debug"], **base)


def perturb(module: nn.Module, scale: float = 0.3, seed: int = 1) -> None:
    """Move every parameter off its init (zero mu / bonus / LoRA down-projection would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ---------------------------------------------------------------------------------------- RWKV-6 recurrence
def naive_wkv(r, k, v, w, u, h0=None):
    """Token loop of o_t = r_t^T (S + diag(u) k_t v_t^T), S <- diag(exp w_t) S + k_t v_t^T, [B, T, H, *]."""
    B, T, H, K = r.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=r.dtype) if h0 is None else h0.clone()
    outs = []
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", r[:, t], S + u[None, :, :, None] * kv))
        S = S * w[:, t].exp()[..., None] + kv
    return torch.stack(outs, 1), S


@pytest.mark.parametrize("T,chunk", [(37, 8), (16, 16), (5, 16)])
def test_wkv_chunk_matches_token_loop_fp64(T, chunk):
    B, H, K, V = 2, 3, 6, 5
    g = torch.Generator().manual_seed(T)
    r, k = (torch.randn(B, T, H, K, generator=g, dtype=D64, requires_grad=True) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g, dtype=D64, requires_grad=True)
    w = (-torch.exp(torch.randn(B, T, H, K, generator=g, dtype=D64))).requires_grad_(True)
    u = torch.randn(H, K, generator=g, dtype=D64, requires_grad=True)
    h0 = torch.randn(B, H, K, V, generator=g, dtype=D64, requires_grad=True)
    wo = torch.randn(B, T, H, V, generator=g, dtype=D64)
    ws = torch.randn(B, H, K, V, generator=g, dtype=D64)
    results = []
    for fn in (lambda: naive_wkv(r, k, v, w, u, h0),
               lambda: chunk_rwkv6_ref(r, k, v, w, u, initial_state=h0, output_final_state=True, chunk_size=chunk)):
        o, s = fn()
        grads = torch.autograd.grad((o * wo).sum() + (s * ws).sum(), (r, k, v, w, u, h0))
        results.append((o, s, grads))
    (o1, s1, g1), (o2, s2, g2) = results
    torch.testing.assert_close(o2, o1, atol=1e-10, rtol=0)
    torch.testing.assert_close(s2, s1, atol=1e-10, rtol=0)
    for name, a, b in zip("r k v w u h0".split(), g2, g1):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=lambda m, n=name: f"grad {n}: {m}")


def test_wkv_strong_decay_is_finite():
    g = torch.Generator().manual_seed(0)
    r, k = (torch.randn(1, 40, 2, 4, generator=g) for _ in range(2))
    v = torch.randn(1, 40, 2, 3, generator=g)
    w = torch.full((1, 40, 2, 4), -80.0, requires_grad=True)  # exp(sum) underflows inside a chunk
    u = torch.randn(2, 4, generator=g)
    o, _ = chunk_rwkv6_ref(r, k, v, w, u)
    o.sum().backward()
    assert torch.isfinite(o).all() and torch.isfinite(w.grad).all()
    torch.testing.assert_close(o, naive_wkv(r, k, v, w.detach(), u)[0], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ RWKV-6 layer
def naive_rwkv6_layer(m: RWKV6, x: torch.Tensor) -> torch.Tensor:
    """fla's RWKV6Attention forward written out token by token from the module's weights."""
    B, T, D = x.shape
    H, K, R = m.num_heads, m.head_k_dim, m.proj_low_rank_dim
    prev = torch.zeros(B, D, dtype=x.dtype)
    S = torch.zeros(B, H, K, K, dtype=x.dtype)
    W1, mu_x, W2 = m.x_proj[0].linear.weight, m.x_proj[0].mu, m.x_proj[2].weight
    lora = m.w_proj.linear.lora
    outs = []
    for t in range(T):
        xt = x[:, t]
        dx = prev - xt
        low = torch.tanh((xt + dx * mu_x) @ W1.T).view(B, 5, R)
        mixes = [low[:, i] @ W2.view(D, 5, R)[:, i].T + m.x_bias[i] for i in range(5)]
        r = (xt + dx * mixes[0]) @ m.r_proj.linear.weight.T
        w = torch.tanh((xt + dx * mixes[1]) @ lora[0].weight.T) @ lora[2].weight.T + lora[2].bias
        k = (xt + dx * mixes[2]) @ m.k_proj.linear.weight.T
        v = (xt + dx * mixes[3]) @ m.v_proj.linear.weight.T
        gate = (xt + dx * mixes[4]) @ m.g_proj.linear.weight.T
        r, w, k, v = (z.view(B, H, K) for z in (r, w, k, v))
        kv = k[..., None] * v[..., None, :]
        o = torch.einsum("bhk,bhkv->bhv", r, S + m.bonus[None, :, :, None] * kv)
        S = S * torch.exp(-torch.exp(w))[..., None] + kv
        o = F.group_norm(o.reshape(B, H * K), H, m.g_norm.weight, m.g_norm.bias, eps=m.norm_eps)
        outs.append((o * F.silu(gate)) @ m.o_proj.weight.T)
        prev = xt
    return torch.stack(outs, 1)


def make_rwkv(seed: int = 0) -> RWKV6:
    torch.manual_seed(seed)
    m = RWKV6(dim=24, num_heads=3, head_dim=8, proj_low_rank_dim=4, gate_low_rank_dim=6, backend="torch").double()
    perturb(m)
    return m


def test_rwkv6_matches_token_loop_fp64():
    m = make_rwkv()
    x = torch.randn(2, 21, 24, dtype=D64)  # 21: not a multiple of the torch path's chunk (16)
    out = m(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, naive_rwkv6_layer(m, x), atol=1e-10, rtol=1e-10)


def test_rwkv6_is_causal():
    m = make_rwkv()
    x = torch.randn(1, 20, 24, dtype=D64)
    y = m(x)
    x2 = x.clone()
    x2[:, 11] += torch.randn(24, dtype=D64)
    y2 = m(x2)
    torch.testing.assert_close(y2[:, :11], y[:, :11], atol=0, rtol=0)
    assert (y2[:, 11:] - y[:, 11:]).abs().amax(-1).min() > 1e-8  # the change reaches every later step


def test_rwkv6_gradients_reach_every_parameter():
    m = make_rwkv()
    m(torch.randn(2, 19, 24, dtype=D64)).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_rwkv6_state_dict_matches_fla_layer():
    fla_layers = importlib.import_module("fla.layers")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = fla_layers.RWKV6Attention(hidden_size=64, num_heads=4, expand_k=1.0, expand_v=1.0,
                                        proj_low_rank_dim=8, gate_low_rank_dim=16)
    ours = RWKV6(dim=64, num_heads=4, head_dim=16, proj_low_rank_dim=8, gate_low_rank_dim=16)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]


def test_rwkv6_init_follows_fla():
    m = RWKV6(dim=64, num_heads=4, head_dim=16, proj_low_rank_dim=8, gate_low_rank_dim=16)
    perturb(m)
    m.init_weights(init_std=0.02, out_std=0.005)
    for p in (m.x_proj[0].mu, m.x_bias, m.bonus, m.w_proj.linear.lora[0].weight, m.w_proj.linear.lora[2].bias,
              m.g_norm.bias):
        assert p.abs().max() == 0
    assert torch.equal(m.g_norm.weight, torch.ones(64))
    up = m.w_proj.linear.lora[2].weight  # [64, 16]: orthonormal columns times 0.1
    torch.testing.assert_close(up.T @ up, 0.01 * torch.eye(16), atol=1e-6, rtol=0)
    assert abs(m.o_proj.weight.std().item() - 0.005) < 0.001 and abs(m.r_proj.linear.weight.std().item() - 0.02) < 0.003
    for p in (m.x_bias, m.bonus):
        assert p._no_weight_decay


def test_rwkv6_fla_backend_needs_cuda():
    m = RWKV6(dim=16, num_heads=2, head_dim=8, backend="fla")
    with pytest.raises(ValueError, match="rwkv_backend='fla' needs a CUDA"):
        m(torch.randn(1, 4, 16))


def test_rwkv6_flops_count():
    a = FLAVORS["plain"]
    # 6 FLOPs per weight of the dense projections and both LoRAs, plus the chunk recurrence (C = 64)
    m = build_mixer("R", a, 0)
    weights = sum(p.numel() for n, p in m.named_parameters() if p.dim() == 2 and n not in ("x_bias", "bonus"))
    assert MIXERS["R"].flops_per_token(a, 512) == 6 * weights + 3 * 8 * (2 * 64 * 128 + 4 * 64 * 64)
    assert rwkv6_flops_per_token(512, 8, 64, 32, 64) == 10_027_008


# ------------------------------------------------------------------------------------------- LSTM / RNN
def naive_recurrent(m: RecurrentMixer, x: torch.Tensor) -> torch.Tensor:
    """Hand-written LSTM (gates i, f, g, o as torch orders them) / tanh RNN cell loop from the module's weights."""
    rnn = m.rnn
    B, T, _ = x.shape
    h = torch.zeros(B, m.hidden, dtype=x.dtype)
    c = torch.zeros_like(h)
    outs = []
    for t in range(T):
        pre = x[:, t] @ rnn.weight_ih_l0.T + rnn.bias_ih_l0 + h @ rnn.weight_hh_l0.T + rnn.bias_hh_l0
        if m.kind == "lstm":
            i, f, g, o = pre.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        else:
            h = torch.tanh(pre)
        outs.append(h @ m.o_proj.weight.T)
    return torch.stack(outs, 1)


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_recurrent_matches_cell_loop_and_is_causal(kind):
    torch.manual_seed(0)
    m = RecurrentMixer(kind, dim=12, hidden=10).double()
    perturb(m)
    x = torch.randn(2, 15, 12, dtype=D64)
    y = m(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, naive_recurrent(m, x), atol=1e-12, rtol=1e-12)
    x2 = x.clone()
    x2[:, 6] += 1.0
    y2 = m(x2)
    torch.testing.assert_close(y2[:, :6], y[:, :6], atol=0, rtol=0)
    assert (y2[:, 6:] - y[:, 6:]).abs().amax(-1).min() > 1e-10


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_recurrent_gradients_reach_every_parameter(kind):
    m = RecurrentMixer(kind, dim=12, hidden=10).double()
    m(torch.randn(2, 9, 12, dtype=D64)).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_recurrent_meta_to_empty_uses_the_new_weights(kind):
    with torch.device("meta"):
        m = RecurrentMixer(kind, dim=12, hidden=10)
    m.to_empty(device="cpu")
    torch.manual_seed(0)
    m.init_weights(init_std=0.02, out_std=0.01)
    # the flattened-weights list must point at the materialised parameters, not the meta ones
    assert all(a is b for a, b in zip(m.rnn._flat_weights, m.rnn.parameters()))
    bound = 10 ** -0.5
    assert all(p.abs().max() <= bound and p.abs().max() > bound / 2 for p in m.rnn.parameters())
    x = torch.randn(2, 7, 12)
    torch.testing.assert_close(m(x), naive_recurrent(m, x), atol=1e-5, rtol=1e-5)


def test_recurrent_hidden_size_matches_attention_params():
    a = FLAVORS["plain"]
    budget = a.dim * a.head_dim * 2 * (a.n_heads + a.n_kv_heads)  # wq, wk, wv, wo: 786,432
    for kind, expected in (("lstm", 224), ("rnn", 504)):
        h = rnn_hidden_size(kind, a)
        assert h == expected and h % 8 == 0
        assert rnn_params(kind, a.dim, h) <= budget < rnn_params(kind, a.dim, h + 8)
        m = build_mixer("L" if kind == "lstm" else "N", a, 0)
        assert sum(p.numel() for p in m.parameters()) == rnn_params(kind, a.dim, h)
        gates = 4 if kind == "lstm" else 1
        assert rnn_flops_per_token(kind, a.dim, h) == 6 * (gates * h * (a.dim + h) + a.dim * h)
    assert rnn_hidden_size("lstm", dataclasses.replace(a, rnn_hidden_dim=40)) == 40


# ----------------------------------------------------------------------------------------------- models
def build_model(args: NeoLLMModelArgs) -> NeoLLM:
    """As the trainer: meta, to_empty, init_weights (parameters first poisoned with NaN)."""
    with torch.device("meta"):
        model = NeoLLM(args)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    torch.manual_seed(0)
    model.init_weights()
    return model


@pytest.mark.parametrize("pattern", ["RA", "LA", "NA", "RLN"])
def test_tiny_model_trains_one_step(pattern):
    args = tiny_args(pattern, n_layers=len(pattern))
    model = build_model(args)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    tokens = torch.randint(0, args.vocab_size, (2, 24))
    loss = model(tokens, labels=torch.roll(tokens, -1, 1))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # FLOPs: the mixers' own counts replace the attention projections they stand in for
    mixers = sum(MIXERS[c].flops_per_token(args, 24) for c in args.layer_types() if c != "A")
    assert mixers > 0 and training_flops_per_token(model, args, 24) > mixers


@pytest.mark.parametrize("pattern", ["RA", "LA", "NA"])
def test_block_compiles_with_graph_breaks(pattern):
    from neollm.parallelize import compile_blocks

    args = tiny_args(pattern)
    model = build_model(args)
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    expected = model(tokens)
    compile_blocks(model, "aot_eager")
    out = model(tokens)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("change,setting", [
    (dict(rwkv_backend="cuda"), "rwkv_backend"),
    (dict(rwkv_proj_low_rank_dim=0), "rwkv_proj_low_rank_dim"),
    (dict(rwkv_gate_low_rank_dim=-1), "rwkv_gate_low_rank_dim"),
    (dict(rnn_hidden_dim=-8), "rnn_hidden_dim"),
])
def test_bad_settings_name_the_setting(change, setting):
    with pytest.raises(ModelConfigError, match=setting):
        tiny_args("RA", **change)


def test_codes_are_registered():
    assert {"R", "L", "N"} <= set(MIXERS) and all(MIXERS[c].cpu for c in "RLN")
    with pytest.raises(ModelConfigError, match="R \\(RWKV-6\\)"):
        tiny_args("X")


# ------------------------------------------------------------------------------------- FSDP2, two CPU ranks
def _make(name: str) -> nn.Module:
    if name == "rwkv":
        return RWKV6(dim=32, num_heads=2, head_dim=16, proj_low_rank_dim=4, gate_low_rank_dim=8, backend="torch")
    return RecurrentMixer(name, dim=32, hidden=16)


def _fsdp_worker(rank: int, world: int, init_file: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from gloo_ranks import gloo_rank

    with gloo_rank(rank, world, init_file):
        mesh = init_device_mesh("cpu", (world,))
        for name in ("rwkv", "lstm", "rnn"):
            with torch.device("meta"):
                m = _make(name)
            fully_shard(m, mesh=mesh)
            m.to_empty(device="cpu")
            torch.manual_seed(rank)  # different streams per rank: a matrix built per rank would not be orthogonal
            m.init_weights(0.02, 0.01)
            assert all(isinstance(p, DTensor) for p in m.parameters())
            full = {k: v.full_tensor() for k, v in m.state_dict().items()}
            if name == "rwkv":
                up = full["w_proj.linear.lora.2.weight"]
                torch.testing.assert_close(up.T @ up, 0.01 * torch.eye(8), atol=1e-6, rtol=0)
            ref = _make(name)
            ref.load_state_dict(full)
            x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(5))
            y = m(x)  # FSDP2 swaps gathered tensors into the module (cuDNN/ATen RNN weights included)
            torch.testing.assert_close(y, ref(x), atol=1e-6, rtol=1e-6)
            y.square().sum().backward()
            assert all(p.grad is not None for p in m.parameters())


def test_mixers_under_fsdp2_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)
