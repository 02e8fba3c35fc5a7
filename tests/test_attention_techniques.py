"""Attention techniques (neollm/model/attention.py): each switch alone and all together.

Every check runs with GQA (H=4 query heads, Hkv=2 KV heads). The reference below is written
independently of neollm.model.attention_ops: explicit T x T masked softmax matrices per head, an
explicit inverse for LUCID, an explicit T x T affine matrix, per-token loops for momentum, torch's
own group_norm / rms_norm / layer_norm.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from neollm.errors import ConfigError
from neollm.model.args import FLAVORS, NeoLLMModelArgs
from neollm.model import attention_ops as ops
from neollm.model.attention import Attention
from neollm.model.attention_ops import lucid_preconditioner, lucid_values
from neollm.model.model import NeoLLM

from conftest import rope_reference, rope_table_reference

H, HKV, D_HEAD, DIM, K_DIRS = 4, 2, 8, 32, 3
B, T = 2, 12

ALL_ON = dict(seednorm_qk=True, qkv_norm=True, mea=True, momentum_gamma=0.1,
              affine_scaled_attention=True, lucid=True, xsa=True, directional_routing=True,
              attention_output_gate="elementwise", attention_dropout=0.1)
CONFIGS = {
    "plain": {},
    "seednorm_qk": dict(seednorm_qk=True),
    "qkv_norm": dict(qkv_norm=True),
    "seednorm_qk+qkv_norm": dict(seednorm_qk=True, qkv_norm=True),
    "mea": dict(mea=True),
    "momentum": dict(momentum_gamma=0.1),
    "momentum_zero": dict(momentum_gamma=0.1, momentum_first="zero"),
    "affine": dict(affine_scaled_attention=True),
    "lucid": dict(lucid=True),
    "xsa": dict(xsa=True),
    "routing": dict(directional_routing=True),
    "gate_elementwise": dict(attention_output_gate="elementwise"),
    "gate_headwise": dict(attention_output_gate="headwise"),
    "dropout": dict(attention_dropout=0.1),
    "all": ALL_ON,
}


def make_args(**changes) -> NeoLLMModelArgs:
    base = dict(dim=DIM, n_heads=H, n_kv_heads=HKV, head_dim=D_HEAD, ffn_hidden_dim=48,
                vocab_size=61, max_seq_len=32, n_layers=2, routing_directions=K_DIRS)
    base.update(changes)
    return dataclasses.replace(FLAVORS["plain"], **base)


def make_attention(seed: int = 0, perturb: bool = True, **changes) -> Attention:
    """float64 module after init_weights; with perturb, every parameter moves off its init so
    identity-at-init values (mixing = I, beta = 0, zero affine weights, ...) cannot hide bugs."""
    args = make_args(**changes)
    torch.manual_seed(seed)
    attention = Attention(args).double()
    attention.init_weights(args.init_std, args.init_std)
    if perturb:
        with torch.no_grad():
            for p in attention.parameters():
                p.add_(0.2 * torch.randn_like(p))
    return attention


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, DIM, dtype=torch.float64, generator=g)
    return x, rope_table_reference(D_HEAD, 32, 10_000.0)


def reference(att: Attention, x: torch.Tensor, cache: torch.Tensor, *, qk_plain_rms: bool = False,
              kv_transform=None) -> torch.Tensor:
    """Straightforward float64 attention with the module's switches and parameters.

    qk_plain_rms: RMS-normalise q and k without any gain instead of the module's QK norm.
    kv_transform: applied to k and v (per head) right after the projections instead of MEA.
    """
    eps = att.eps
    batch, seq_len, _ = x.shape
    g = H // HKV
    q = att.wq(x).view(batch, seq_len, H, D_HEAD)
    k = att.wk(x).view(batch, seq_len, HKV, D_HEAD)
    v = att.wv(x).view(batch, seq_len, HKV, D_HEAD)

    if kv_transform is not None:
        k, v = kv_transform(k), kv_transform(v)
    elif att.mea:
        def mea(t, mix, weight, bias):
            rows = [sum(mix[j, i] * t[:, :, i] for i in range(HKV)) for j in range(HKV)]
            mixed = torch.stack(rows, dim=2)
            flat = F.group_norm(mixed.reshape(batch * seq_len, HKV * D_HEAD), HKV,
                                weight.flatten(), bias.flatten(), eps)
            return flat.view(batch, seq_len, HKV, D_HEAD)
        k = mea(k, att.mea_k_mix, att.mea_k_weight, att.mea_k_bias)
        v = mea(v, att.mea_v_mix, att.mea_v_weight, att.mea_v_bias)

    def seednorm(t, gamma, alpha, beta):
        rms = (t.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        s = torch.tanh((t * beta).sum(-1, keepdim=True))
        return (s * alpha + gamma) * t / rms

    if qk_plain_rms:
        q, k = F.rms_norm(q, (D_HEAD,), None, eps), F.rms_norm(k, (D_HEAD,), None, eps)
    elif att.seednorm_qk:
        q = seednorm(q, att.q_seed_gamma, att.q_seed_alpha, att.q_seed_beta)
        k = seednorm(k, att.k_seed_gamma, att.k_seed_alpha, att.k_seed_beta)
    elif att.qkv_norm:
        q = F.rms_norm(q, (D_HEAD,), att.q_norm_weight, eps)
        k = F.rms_norm(k, (D_HEAD,), att.k_norm_weight, eps)
    if att.qkv_norm:
        v = F.rms_norm(v, (D_HEAD,), att.v_norm_weight, eps)

    q, k = rope_reference(q, 10_000.0), rope_reference(k, 10_000.0)  # not the module's rope.py
    gamma = att.momentum_gamma
    if gamma:
        def momentum(t):
            # x_{-1} = x_0 (first velocity zero) or 0 (the author's zero padding)
            rows = [(1 + gamma) * t[:, 0] if att.momentum_first == "zero" else t[:, 0]]
            for i in range(1, seq_len):
                rows.append(t[:, i] + gamma * (t[:, i] - t[:, i - 1]))
            return torch.stack(rows, dim=1)
        q, k = momentum(q), momentum(k)

    visible = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    count = torch.arange(1, seq_len + 1, dtype=torch.float64)
    heads = []
    for h in range(H):
        kv = h // g  # query heads 0,1 -> KV head 0; 2,3 -> KV head 1
        qh, kh, vh = q[:, :, h], k[:, :, kv], v[:, :, kv]
        scores = qh @ kh.transpose(1, 2) / math.sqrt(D_HEAD)
        weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)  # [B, T, T]
        values = vh
        if att.lucid:
            kr = kh / (kh.pow(2).mean(-1, keepdim=True) + eps).sqrt()
            p = torch.exp(kr @ kr.transpose(1, 2) / math.sqrt(D_HEAD) - math.sqrt(D_HEAD))
            p = p * visible
            # unit diagonal (up to eps) and entries <= 1: the module takes the diagonal as exactly 1
            diag = p.diagonal(dim1=1, dim2=2)
            assert (diag - 1).abs().max() < 1e-4 and p.max() <= 1 + 1e-12
            p = p - torch.diag_embed(diag) + torch.eye(seq_len, dtype=p.dtype)
            values = torch.linalg.inv(p) @ vh
        if att.affine:
            alpha = 1 + torch.tanh(att.affine_proj(x)[:, :, h] + att.affine_bias[h])  # [B, T]
            beta = (1 - alpha) / count
            weights = alpha[..., None] * weights + beta[..., None] * visible  # explicit T x T
        o = weights @ values
        if att.xsa:
            o = o - ((o * vh).sum(-1, keepdim=True) / (vh.pow(2).sum(-1, keepdim=True) + 1e-6)) * vh
        if att.routing:
            route = torch.sigmoid(att.router(x) + att.router_bias).view(batch, seq_len, H, K_DIRS)
            removed = torch.zeros_like(o)
            for j in range(K_DIRS):
                u = att.routing_directions[h, j]
                u = u / u.norm()
                removed = removed + route[:, :, h, j, None] * (o @ u)[..., None] * u
            o = o - removed
        if att.gate_kind == "elementwise":
            o = o * torch.sigmoid(att.gate_proj(x)).view(batch, seq_len, H, D_HEAD)[:, :, h]
        elif att.gate_kind == "headwise":
            o = o * torch.sigmoid(att.gate_proj(x))[:, :, h, None]
        heads.append(o)
    return att.wo(torch.cat(heads, dim=-1))


# ---- every configuration -------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_explicit_reference(name):
    att = make_attention(**CONFIGS[name]).eval()  # eval: no dropout (tested below)
    x, cache = inputs()
    with torch.no_grad():
        torch.testing.assert_close(att(x, cache), reference(att, x, cache), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_causal(name):
    att = make_attention(**CONFIGS[name]).train()  # train: dropout on where configured
    x, cache = inputs()
    t = 6
    changed = x.clone()
    changed[:, t + 1:] = torch.randn(B, T - t - 1, DIM, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(3)
        a = att(x, cache)
        torch.manual_seed(3)  # same dropout mask for both calls
        b = att(changed, cache)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-12)
    assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_reach_every_parameter(name):
    att = make_attention(**CONFIGS[name]).train()
    x, cache = inputs()
    x.requires_grad_(True)
    out = att(x, cache)
    (out * torch.randn_like(out)).sum().backward()
    for pname, p in att.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().max() > 0, f"no gradient reaches {pname}"
    assert x.grad.abs().max() > 0


# ---- documented init behaviour -------------------------------------------------------------
def same_weights_plain(att: Attention) -> Attention:
    plain = make_attention(perturb=False)
    plain.load_state_dict(att.state_dict(), strict=False)  # wq, wk, wv, wo
    return plain


def test_seednorm_at_init_is_gainless_rmsnorm():
    att = make_attention(perturb=False, seednorm_qk=True)
    assert (att.q_seed_beta == 0).all() and (att.k_seed_gamma == 1).all()
    x, cache = inputs()
    with torch.no_grad():
        torch.testing.assert_close(att(x, cache), reference(att, x, cache, qk_plain_rms=True),
                                   rtol=1e-10, atol=1e-12)
        # and once beta moves, it is no longer RMSNorm
        att.q_seed_beta.fill_(0.5)
        assert (att(x, cache) - reference(att, x, cache, qk_plain_rms=True)).abs().max() > 1e-6


def test_mea_at_init_is_per_head_groupnorm_of_plain_kv():
    att = make_attention(perturb=False, mea=True)
    assert torch.equal(att.mea_k_mix, torch.eye(HKV, dtype=torch.float64))
    plain = same_weights_plain(att)
    x, cache = inputs()

    def layer_norm_per_head(t):
        return F.layer_norm(t, (D_HEAD,), eps=att.eps)

    with torch.no_grad():
        torch.testing.assert_close(att(x, cache),
                                   reference(plain, x, cache, kv_transform=layer_norm_per_head),
                                   rtol=1e-10, atol=1e-12)


def test_mea_groupnorm_affine_takes_condas_adam_step():
    """MEA's GroupNorm affine is one flat vector per k and v ([Hkv * d], as nn.GroupNorm(Hkv, Hkv * d) holds
    it), so Conda, which projects 2-D parameters and scales their step by conda_scale, gives it the plain
    Adam step: after one step every gain and bias moved by the learning rate (first Adam step: lr * sign(g)).
    The head-mixing matrices stay 2-D (a linear map over heads): their step is the projected one."""
    from neollm.optim.conda import Conda

    att = make_attention(perturb=True, mea=True)  # float64
    x, rope = inputs()
    att(x, rope).square().mean().backward()
    names = ("mea_k_weight", "mea_k_bias", "mea_v_weight", "mea_v_bias")
    assert all(getattr(att, n).shape == (HKV * D_HEAD,) for n in names)
    before = {n: getattr(att, n).detach().clone() for n in (*names, "mea_k_mix")}
    lr = 1e-3
    Conda([getattr(att, n) for n in before], lr=lr, eps=1e-30, weight_decay=0.0, scale=0.25).step()
    for n in names:
        moved = (getattr(att, n).detach() - before[n]).abs()
        assert torch.allclose(moved, torch.full_like(moved, lr), rtol=1e-6), (n, moved.min(), moved.max())
    mix_moved = (att.mea_k_mix.detach() - before["mea_k_mix"]).abs()
    assert mix_moved.max() < 0.9 * lr  # projected and scaled by 0.25: not the plain Adam step


def test_affine_at_init_is_exactly_plain_attention():
    att = make_attention(perturb=False, affine_scaled_attention=True)
    plain = same_weights_plain(att)
    x, cache = inputs()
    with torch.no_grad():
        torch.testing.assert_close(att(x, cache), plain(x, cache), rtol=1e-12, atol=1e-14)


def test_routing_at_init_is_near_identity_and_exact_with_closed_router():
    att = make_attention(perturb=False, directional_routing=True)
    plain = same_weights_plain(att)
    x, cache = inputs()
    with torch.no_grad():
        route = torch.sigmoid(att.router(x) + att.router_bias)
        assert 0.05 < route.min() and route.max() < 0.3  # sigmoid(-2) = 0.12
        base, routed = plain(x, cache), att(x, cache)
        assert 0 < (routed - base).norm() / base.norm() < 0.3
        att.router_bias.fill_(-60.0)  # router closed: no suppression at all
        torch.testing.assert_close(att(x, cache), base, rtol=1e-12, atol=1e-14)


def test_output_gate_starts_near_half():
    att = make_attention(perturb=False, attention_output_gate="elementwise")
    x, _ = inputs()
    with torch.no_grad():
        gate = torch.sigmoid(att.gate_proj(x))
    assert gate.shape == (B, T, H * D_HEAD)
    assert abs(gate.mean().item() - 0.5) < 0.05 and 0.2 < gate.min() and gate.max() < 0.8


def test_lucid_preconditioner_is_unit_lower_triangular_and_bounded():
    k = 3.0 * torch.randn(B, HKV, T, D_HEAD, dtype=torch.float64)
    p = lucid_preconditioner(k, 1e-6)
    # diagonal exp(sqrt(d) * (ms / (ms + eps) - 1)): 1 up to the RMS eps (the solve uses exactly 1)
    ms = k.pow(2).mean(-1)
    expected = torch.exp(math.sqrt(D_HEAD) * (ms / (ms + 1e-6) - 1))
    torch.testing.assert_close(p.diagonal(dim1=-2, dim2=-1), expected, rtol=1e-12, atol=0)
    assert (expected - 1).abs().max() < 1e-4
    lower = torch.ones(T, T, dtype=torch.bool).tril()
    assert (p[..., ~lower] == 0).all() and (p[..., lower] > 0).all() and p.max() <= 1.0
    # identical keys give an all-ones lower triangle (the most correlated case stays finite)
    same = lucid_preconditioner(k[:, :, :1].expand(B, HKV, T, D_HEAD), 1e-6)
    torch.testing.assert_close(same, torch.ones(T, T, dtype=p.dtype).tril().expand_as(same),
                               rtol=0, atol=1e-5)


def test_lucid_preconditioner_stays_fp32_under_autocast():
    """Under bf16 autocast the key Gram matrix would be a bf16 GEMM: rounded near d, the exponent
    moves by up to ~0.03, which put X = P^-1 V 10% off on an H100 with correlated keys. It must equal the
    fp32 computation on the same (bf16) keys."""
    g = torch.Generator().manual_seed(3)
    shared = torch.randn(B, HKV, 1, 64, generator=g)
    k = (shared + 0.3 * torch.randn(B, HKV, T, 64, generator=g)).to(torch.bfloat16)
    v = torch.randn(B, HKV, T, 64, generator=g).to(torch.bfloat16)
    expected = lucid_preconditioner(k.float(), 1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p = lucid_preconditioner(k, 1e-6)
        x = lucid_values(k, v, 1e-6)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x, lucid_values(k.float(), v.float(), 1e-6).to(x.dtype), rtol=0, atol=0)


def _lucid_reference(k, v, eps):
    """X = P^-1 V through plain autograd, with an explicit inverse of the unit-lower P."""
    d = k.shape[-1]
    kr = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + eps)
    p = torch.exp(kr @ kr.transpose(-1, -2) / math.sqrt(d) - math.sqrt(d)).tril(-1)
    p = p + torch.eye(k.shape[-2], dtype=k.dtype)
    return torch.linalg.inv(p) @ v


def test_lucid_values_gradients_match_autograd_through_the_inverse():
    """lucid_values (the op's reference: P rebuilt from the keys in backward) against autograd
    through an explicit inverse, fp64: the values and the gradients to the keys and to the values."""
    from neollm.model.attention_ops import lucid_values

    gen = torch.Generator().manual_seed(3)
    k = (2.0 * torch.randn(B, HKV, T, D_HEAD, generator=gen, dtype=torch.float64)).requires_grad_()
    v = torch.randn(B, HKV, T, D_HEAD, generator=gen, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(B, HKV, T, D_HEAD, generator=gen, dtype=torch.float64)
    got = lucid_values(k, v, 1e-6)
    expected = _lucid_reference(k, v, 1e-6)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    got_k, got_v = torch.autograd.grad((got * upstream).sum(), (k, v))
    exp_k, exp_v = torch.autograd.grad((expected * upstream).sum(), (k, v))
    assert exp_k.abs().max() > 1e-3  # the keys' gradient is not trivially zero
    torch.testing.assert_close(got_v, exp_v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_k, exp_k, rtol=1e-10, atol=1e-12)


def test_lucid_values_frees_the_preconditioner_after_forward_and_rebuilds_it(monkeypatch):
    """Eager, the reference op: the [T x T] preconditioner built in forward is freed once forward
    returns (the op keeps only X and the keys for backward), and backward builds it again."""
    import gc

    from torch.multiprocessing.reductions import StorageWeakRef

    import neollm.kernels.lucid as lucid_kernels
    import neollm.model.attention_ops as ops

    built = []
    original = lucid_kernels.preconditioner

    def recording(kr):
        p = original(kr)
        built.append(StorageWeakRef(p.untyped_storage()))  # the memory, whatever aliases it
        return p

    monkeypatch.setattr(lucid_kernels, "preconditioner", recording)
    k = torch.randn(B, HKV, T, D_HEAD, requires_grad=True)
    v = torch.randn(B, HKV, T, D_HEAD, requires_grad=True)
    out = ops.lucid_values(k, v, 1e-6, impl="torch")
    gc.collect()
    assert len(built) == 1 and built[0].expired()  # kept by nobody after forward
    out.sum().backward()
    assert len(built) == 2  # rebuilt once, in backward
    assert k.grad is not None and v.grad is not None
    # the same probe sees a kept P: plain autograd through the solve holds on to it
    built.clear()
    p = recording(ops.rms_normalize(k, 1e-6))
    x = torch.linalg.solve_triangular(p, v, upper=False, unitriangular=True)
    del p
    gc.collect()
    assert not built[0].expired()
    del x


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_lucid_values_compiled_keeps_no_t_by_t_tensor_and_matches_eager(backend):
    """Under torch.compile too (whole graph): same values and gradients, and the compiled function
    keeps nothing [T x T] for backward (the op saves only X and the normalised keys)."""
    from neollm.model.attention_ops import lucid_values

    torch._dynamo.reset()
    k = torch.randn(B, HKV, T, D_HEAD, requires_grad=True)
    v = torch.randn(B, HKV, T, D_HEAD, requires_grad=True)
    compiled = torch.compile(lambda a, b: lucid_values(a, b, 1e-6), fullgraph=True, backend=backend)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out_c = compiled(k, v)
    assert shapes and not any(s[-2:] == (T, T) for s in shapes), shapes
    grads_c = torch.autograd.grad(out_c.square().sum(), (k, v))
    out_e = lucid_values(k, v, 1e-6)
    grads_e = torch.autograd.grad(out_e.square().sum(), (k, v))
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dropout_only_in_training():
    att = make_attention(attention_dropout=0.1)
    plain = make_attention()  # same seed, same weights, no dropout
    x, cache = inputs()
    with torch.no_grad():
        torch.testing.assert_close(att.eval()(x, cache), plain(x, cache), rtol=1e-12, atol=1e-14)
        torch.manual_seed(0)
        assert (att.train()(x, cache) - plain(x, cache)).abs().max() > 1e-3


def test_momentum_uses_only_the_previous_token():
    # q_hat_t = (1 + gamma) q_t - gamma q_{t-1}: the first token is unchanged, so one-token
    # outputs agree with plain attention of the same weights
    att = make_attention(momentum_gamma=0.1)
    plain = same_weights_plain(att)
    x, cache = inputs()
    with torch.no_grad():
        a, b = att(x[:, :1], cache), plain(x[:, :1], cache)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_momentum_first_position_is_zero_padded_or_repeated():
    # the author's kernel test: previous = F.pad(x[..., :-1, :], (0, 0, 1, 0)) along the sequence
    x = torch.randn(2, 7, 3, 4, dtype=torch.float64)
    padded = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    torch.testing.assert_close(ops.momentum_shift(x, 0.1, "zero"), x + 0.1 * (x - padded), rtol=0, atol=0)
    repeated = torch.cat([x[:, :1], x[:, :-1]], dim=1)
    torch.testing.assert_close(ops.momentum_shift(x, 0.1, "repeat"), x + 0.1 * (x - repeated), rtol=0, atol=0)
    assert not torch.equal(ops.momentum_shift(x, 0.1, "zero")[:, 0], ops.momentum_shift(x, 0.1, "repeat")[:, 0])
    torch.testing.assert_close(ops.momentum_shift(x, 0.1, "zero")[:, 1:], ops.momentum_shift(x, 0.1, "repeat")[:, 1:])


# ---- module-level properties ---------------------------------------------------------------
def test_parameter_counts_at_neollm_135m_sizes():
    base_args = FLAVORS["plain"]
    with torch.device("meta"):
        base = sum(p.numel() for p in Attention(base_args).parameters())
        extra = {name: sum(p.numel() for p in Attention(dataclasses.replace(base_args, **c))
                           .parameters()) - base
                 for name, c in CONFIGS.items()}
    assert extra == {
        "plain": 0, "seednorm_qk": 384, "qkv_norm": 192, "seednorm_qk+qkv_norm": 448,
        "mea": 1_056, "momentum": 0, "momentum_zero": 0, "affine": 4_104, "lucid": 0, "xsa": 0,
        "routing": 8 * 4 * 64 + 512 * 32 + 32, "gate_elementwise": 262_144,
        "gate_headwise": 4_096, "dropout": 0,
        "all": 448 + 1_056 + 4_104 + 18_464 + 262_144,
    }


def test_meta_build_inits_everything_and_marks_no_weight_decay():
    args = make_args(**ALL_ON, layer_pattern="A")
    with torch.device("meta"):
        model = NeoLLM(args)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights()
    att = model.layers["0"].mixer
    for name, p in att.named_parameters():
        assert torch.isfinite(p).all(), name
    flagged = {n for n, p in att.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert flagged == {
        "q_seed_gamma", "q_seed_alpha", "q_seed_beta", "k_seed_gamma", "k_seed_alpha",
        "k_seed_beta", "v_norm_weight", "mea_k_mix", "mea_v_mix", "mea_k_weight", "mea_k_bias",
        "mea_v_weight", "mea_v_bias", "affine_bias", "routing_directions", "router_bias",
    }
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    logits = model(tokens)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    assert abs(loss.item() - math.log(args.vocab_size)) < 0.5
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_all_on_compiles_fullgraph():
    torch._dynamo.reset()
    att = make_attention(**ALL_ON).float()
    x, cache = inputs()
    x, cache = x.float(), cache.float()
    compiled = torch.compile(att, backend="aot_eager", fullgraph=True)
    out = compiled(x, cache)  # training mode: dropout inside the graph
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in att.parameters())
    att.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, cache), att(x, cache), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "changes, fragment",
    [
        (dict(momentum_gamma=-0.1), "momentum_gamma"),
        (dict(momentum_gamma=float("nan")), "momentum_gamma"),
        (dict(routing_directions=0), "routing_directions"),
        (dict(attention_output_gate="sigmoid"), "attention_output_gate"),
        (dict(attention_dropout=1.0), "attention_dropout"),
    ],
)
def test_bad_attention_args_raise(changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        dataclasses.replace(FLAVORS["plain"], **changes)


def test_all_on_in_bfloat16_keeps_dtype_and_stays_finite():
    att = make_attention(**ALL_ON).to(torch.bfloat16).train()
    x, cache = inputs()
    out = att(x.to(torch.bfloat16), cache.float())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in att.parameters())
    reference_out = make_attention(**ALL_ON).eval()(x, inputs()[1])
    with torch.no_grad():
        low = att.eval()(x.to(torch.bfloat16), cache.float()).double()
    assert (low - reference_out).norm() / reference_out.norm() < 0.05


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sdpa_inputs_keep_the_fused_kernel_layout(name, monkeypatch):
    """Flash / memory-efficient SDPA need q, k, v of one dtype with a contiguous head dim;
    otherwise the GPU silently runs the T x T math fallback (what an einsum layout once caused)."""
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q, k, v))
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    att = make_attention(**CONFIGS[name]).float().eval()
    x, cache = inputs()
    with torch.no_grad():
        att(x.float(), cache.float())
    (q, k, v), = seen
    assert q.dtype == k.dtype == v.dtype
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1


def test_no_matmul_runs_over_the_head_or_direction_count():
    """MEA's head mixing and directional routing are multiply-adds over a few heads / directions.
    Written as einsums they became GEMMs with an inner or outer size of Hkv or K (4 at NeoLLM's
    size), which cuBLAS runs on slow unaligned kernels: 9.5 ms of a 113 ms step on an H200
    (BENCHMARKS.md). No matrix operand of a matmul in the attention's forward or backward may have
    a size below 4 (here Hkv = 2 and K = 3; every other size is >= 4). Vectors (SeeDNorm's GEMV
    against beta) are fine."""
    from torch.utils._python_dispatch import TorchDispatchMode

    matmuls = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
               torch.ops.aten.baddbmm.default, torch.ops.aten.mv.default, torch.ops.aten.dot.default}
    narrow = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in matmuls:
                shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
                if any(len(s) >= 2 and min(s[-2:]) < 4 for s in shapes):
                    narrow.append((str(func), shapes))
            return func(*args, **(kwargs or {}))

    att = make_attention(**ALL_ON).train()
    x, cache = inputs()
    x.requires_grad_(True)
    with Watch():
        att(x, cache).square().sum().backward()
    assert narrow == []
