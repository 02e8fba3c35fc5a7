"""Projection, MLP and residual-stream techniques (linear.py, mlp.py, norms.py, fan.py, block.py) on CPU.

Each technique, and all of them together, is checked for: causality through a whole tiny "DA" model (float64),
equality with a straightforward re-implementation written here (explicit matmuls / loops from the formulas),
its documented init behaviour, and gradients reaching every parameter. The plain block is checked bit-for-bit
against the pre-technique block, and the all-on attention block under torch.compile(fullgraph=True).
"""

from __future__ import annotations

import importlib

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import neollm  # noqa: F401  (registers the spec)
from neollm.errors import ConfigError
from neollm.model.args import FLAVORS, NeoLLMModelArgs
from neollm.model.block import Block
from neollm.model.fan import FAN, fan_dims
from neollm.model.linear import CoLALinear, Linear, Projection, make_linear
from neollm.model.model import NeoLLM
from neollm.model.norms import GPAS, PolyNorm
from neollm.model.rope import apply_rope, rope_cache

D64 = torch.float64

TECHNIQUES: dict[str, dict] = {
    "polynorm": dict(mlp_type="polynorm"),
    "polynorm_exclusive": dict(mlp_type="polynorm", polynorm_exclusive=True),
    "learnable_multipliers": dict(learnable_multipliers=True),
    "simplegpt": dict(simplegpt=True),
    "cola": dict(cola_rank_ratio=0.25),
    "fan": dict(fan_ratio=0.125),
    "fan_on_gdn": dict(fan_ratio=0.125, fan_on_gdn=True),
    "lns": dict(layernorm_scaling=True),
    "gpas": dict(gpas=True),
    "hybrid_norm": dict(hybrid_norm=True),
    "gated_residual": dict(gated_residual=True),
    "dropout": dict(dropout=0.1),
    "all": dict(mlp_type="polynorm", polynorm_exclusive=True, learnable_multipliers=True, simplegpt=True,
                cola_rank_ratio=0.25, fan_ratio=0.125, fan_on_gdn=True, layernorm_scaling=True, gpas=True,
                hybrid_norm=True, gated_residual=True, dropout=0.1),
    # multipliers are dropped under simplegpt, so check them with every other switch too
    "all_but_simplegpt": dict(mlp_type="polynorm", learnable_multipliers=True, cola_rank_ratio=0.25,
                              fan_ratio=0.15, layernorm_scaling=True, gpas=True, hybrid_norm=True,
                              gated_residual=True, dropout=0.1),
}


def tiny(**changes) -> NeoLLMModelArgs:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden_dim=96, vocab_size=97,
                max_seq_len=64, layer_pattern="DA", gdn_num_heads=2, gdn_head_dim=16, gdn_backend="torch")
    base.update(changes)
    return dataclasses.replace(FLAVORS["debug"], **base)


def build(args: NeoLLMModelArgs, seed: int = 0) -> NeoLLM:
    """As the trainer: meta, to_empty, init_weights (every parameter first poisoned with NaN)."""
    with torch.device("meta"):
        model = NeoLLM(args)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights()
    return model


def perturb(module: nn.Module, scale: float = 0.1, seed: int = 1) -> None:
    """Move every parameter off its init (gates, multipliers, PolyNorm weights ... matter then)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def make_block(mixer: str, layer_id: int = 1, seed: int = 0, **changes) -> tuple[Block, NeoLLMModelArgs]:
    args = tiny(**changes)
    torch.manual_seed(seed)
    block = Block(layer_id, mixer, args)
    block.init_weights()
    return block.double(), args


# ---- straightforward references ---------------------------------------------------------------------------
def rms(v: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    out = v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps)
    return out if weight is None else out * weight


def gelu_erf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


def ref_proj(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """r ⊙ γ·RMSNorm(core(c ⊙ x)), core = x Wᵀ + b or GELU(x Aᵀ) Bᵀ + b, from the module's tensors."""
    col = norm = row = None
    core = m
    if isinstance(m, Projection):
        col, norm, row, core = m.col, m.norm, m.row, m.core
    if col is not None:
        x = x * col
    if isinstance(core, CoLALinear):
        y = gelu_erf(x @ core.A.weight.T) @ core.B.weight.T + core.B.bias
    else:
        y = x @ core.weight.T
        if core.bias is not None:
            y = y + core.bias
    if norm is not None:
        y = rms(y, norm.weight, norm.eps)
    if row is not None:
        y = y * row
    return y


def ref_polynorm(x: torch.Tensor, weight, bias, logits=None, eps: float = 1e-6) -> torch.Tensor:
    """PolyNorm row by row with Python scalars for the reductions."""
    flat = x.detach().reshape(-1, x.shape[-1])
    out = torch.empty_like(flat)
    n = flat.shape[-1]

    def norm(v):
        return v / math.sqrt(float((v * v).sum()) / n + eps)

    for i in range(flat.shape[0]):
        v = flat[i]
        x1, x2, x3 = norm(v), norm(v ** 2), norm(v ** 3)
        if logits is not None:
            a2, a3 = (1.0 / (1.0 + math.exp(-float(e))) for e in logits.detach())
            ref = max(float(x1 @ x1), 1e-6)
            x2 = norm(x2 - a2 * float(x2 @ x1) / ref * x1)
            x3 = norm(x3 - a3 * float(x3 @ x1) / ref * x1)
        w, b = weight.detach(), bias.detach()
        out[i] = float(w[0]) * x3 + float(w[1]) * x2 + float(w[2]) * x1 + float(b[0])
    return out.reshape(x.shape)


def ref_mlp(mlp: nn.Module, args: NeoLLMModelArgs, m: torch.Tensor) -> torch.Tensor:
    g = ref_proj(mlp.w1, m)
    if args.mlp_type == "polynorm":
        act = mlp.act
        g = ref_polynorm(g, act.weight, act.bias, act.exclusive_logits if args.polynorm_exclusive else None)
    else:
        g = g * torch.sigmoid(g)
    return ref_proj(mlp.w2, g * ref_proj(mlp.w3, m))


def ref_fan(fan: FAN, x: torch.Tensor) -> torch.Tensor:
    p = ref_proj(fan.wp, x)
    return torch.cat([torch.cos(p), torch.sin(p), ref_proj(fan.wpbar, x)], dim=-1)


def ref_block(block: Block, args: NeoLLMModelArgs, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Eval-mode block from the wiring diagram; the mixer core itself is used as a black box."""
    eps, layer = args.norm_eps, block.layer_id + 1
    attention = block.mixer_code == "A"
    s = 1.0 / math.sqrt(layer) if args.layernorm_scaling else 1.0
    shrink = (1.0 - F.silu(block.gpas.gate)) if args.gpas else 1.0  # GPAS forward value

    def gate(g):
        return torch.sigmoid(g.gate) if args.gated_residual else 1.0

    a = x if (args.simplegpt and attention) else rms(x, block.mixer_norm.weight, eps)
    a = a * s
    if args.fan_ratio and (attention or args.fan_on_gdn):
        a = ref_fan(block.fan, a)
    mixed = block.mixer(a, rope) if attention else block.mixer(a)
    h = (x + gate(block.mixer_gate) * mixed) * shrink
    m = (h if args.simplegpt else rms(h, block.mlp_norm.weight, eps)) * s
    f = gate(block.mlp_gate) * ref_mlp(block.mlp, args, m)
    if args.hybrid_norm:
        return rms(h * shrink + f, block.post_norm.weight, eps)
    return (h + f) * shrink


# ---- the plain block ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mixer", ["A", "D"])
def test_plain_block_is_the_prenorm_block_bit_for_bit(mixer):
    block, args = make_block(mixer)
    block = block.float()
    perturb(block)
    x = torch.randn(2, 11, args.dim)
    rope = rope_cache(args.head_dim, 64, args.rope_theta)
    out = block(x, rope)
    # the pre-technique code, op for op
    normed = block.mixer_norm(x)
    h = x + (block.mixer(normed, rope) if mixer == "A" else block.mixer(normed))
    hn = block.mlp_norm(h)
    expected = h + block.mlp.w2(F.silu(block.mlp.w1(hn)) * block.mlp.w3(hn))
    assert torch.equal(out, expected)
    # and a hand-written pre-norm block with explicit RMSNorm / SwiGLU maths
    xd, blockd = x.double(), block.double()
    a = rms(xd, blockd.mixer_norm.weight, args.norm_eps)
    h = xd + (blockd.mixer(a, rope) if mixer == "A" else blockd.mixer(a))
    m = rms(h, blockd.mlp_norm.weight, args.norm_eps)
    g = m @ blockd.mlp.w1.weight.T
    hand = h + ((g * torch.sigmoid(g)) * (m @ blockd.mlp.w3.weight.T)) @ blockd.mlp.w2.weight.T
    torch.testing.assert_close(blockd(xd, rope), hand, rtol=1e-12, atol=1e-12)


def test_plain_block_keeps_its_parameters():
    block, args = make_block("A")
    names = {n for n, _ in block.named_parameters() if not n.startswith("mixer.")}
    assert names == {"mixer_norm.weight", "mlp_norm.weight", "mlp.w1.weight", "mlp.w3.weight", "mlp.w2.weight"}
    assert all(type(m) is Linear for m in (block.mlp.w1, block.mlp.w2, block.mlp.w3))


# ---- every technique: reference, causality, gradients ------------------------------------------------------
@pytest.mark.parametrize("technique", sorted(TECHNIQUES))
@pytest.mark.parametrize("mixer", ["A", "D"])
def test_block_matches_reference(technique, mixer):
    block, args = make_block(mixer, layer_id=2, **TECHNIQUES[technique])
    perturb(block)
    block.eval()
    x = torch.randn(2, 9, args.dim, dtype=D64)
    rope = rope_cache(args.head_dim, 64, args.rope_theta).double()
    torch.testing.assert_close(block(x, rope), ref_block(block, args, x, rope), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("technique", sorted(TECHNIQUES))
def test_causal_through_a_whole_model(technique):
    args = tiny(**TECHNIQUES[technique])
    model = build(args).double().eval()
    perturb(model)
    tokens = torch.randint(0, args.vocab_size, (2, 24))
    t = 11
    changed = tokens.clone()
    changed[:, t + 1:] = (tokens[:, t + 1:] + 1 + torch.randint(0, args.vocab_size - 1, (2, 24 - t - 1))) \
        % args.vocab_size
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-10)
    assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-6


@pytest.mark.parametrize("technique", sorted(TECHNIQUES))
def test_gradients_reach_every_parameter(technique):
    args = tiny(**TECHNIQUES[technique])
    model = build(args)
    model.train()
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    logits = model(tokens)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(args.vocab_size)) < 1.0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("technique", sorted(TECHNIQUES))
def test_init_fills_and_flags_our_parameters(technique):
    """init_weights covers every parameter (build() poisons with NaN first); gains/scalars/biases are flagged."""
    model = build(tiny(**TECHNIQUES[technique]))
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{name} not initialised by init_weights"
    ours = [(n, p) for n, p in model.named_parameters()
            if n.startswith("layers.") and (".mixer." not in n or any(f".mixer.w{c}." in n for c in "qkvo"))]
    for name, p in ours:
        is_matrix = p.ndim == 2
        assert getattr(p, "_no_weight_decay", False) == (not is_matrix), name


# ---- unit references ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("exclusive", [False, True])
def test_polynorm_matches_its_formula_and_init(exclusive):
    act = PolyNorm(exclusive=exclusive)
    assert act.weight.tolist() == [torch.tensor(1 / 3).item()] * 3 and act.bias.tolist() == [0.0]
    if exclusive:  # the author's init: alpha = sigmoid(logit) = 1e-4 (starts as plain PolyNorm)
        torch.testing.assert_close(torch.sigmoid(act.exclusive_logits.double()),
                                   torch.full((2,), 1e-4, dtype=D64), rtol=1e-6, atol=0)
        assert PolyNorm(exclusive=True, exclusive_init=0.5).exclusive_logits.tolist() == [0.0, 0.0]
    act = act.double()
    perturb(act, scale=0.5)
    x = 2.0 * torch.randn(3, 5, 40, dtype=D64)
    expected = ref_polynorm(x, act.weight, act.bias, act.exclusive_logits if exclusive else None)
    torch.testing.assert_close(act(x), expected, rtol=1e-10, atol=1e-10)
    # fp32 maths on bf16 input: matches the fp64 result to bf16 precision
    xb = x.to(torch.bfloat16)
    got = act.to(torch.bfloat16)(xb)
    assert got.dtype == torch.bfloat16
    ref = ref_polynorm(xb.double(), act.weight.double(), act.bias.double(),
                       act.exclusive_logits.double() if exclusive else None)
    torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=2e-2)


def test_exclusive_polynorm_removes_the_linear_component():
    act = PolyNorm(exclusive=True).double()
    with torch.no_grad():
        act.exclusive_logits.fill_(40.0)  # alpha = 1: full removal
        act.weight.copy_(torch.tensor([1.0, 0.0, 0.0]))  # output = x3'
    x = torch.randn(4, 64, dtype=D64) + 0.3
    x3 = act(x)
    x1 = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    assert (x3 * x1).sum(-1).abs().max() < 1e-8  # orthogonal to the linear branch
    torch.testing.assert_close((x3 * x3).mean(-1), torch.ones(4, dtype=D64), rtol=1e-5, atol=1e-5)


def test_make_linear_roles_and_parameters():
    lm = tiny(learnable_multipliers=True)
    shapes = {role: make_linear(64, 96, lm, role=role) for role in
              ("q", "k", "v", "o", "gate", "up", "down", "fan_p", "fan_pbar", "attn_gate")}
    has = {r: (getattr(m, "row", None) is not None, getattr(m, "col", None) is not None) for r, m in shapes.items()}
    assert has == {"q": (False, False), "k": (False, False), "v": (False, False), "o": (True, True),
                   "gate": (True, False), "up": (False, False), "down": (True, True), "fan_p": (True, False),
                   "fan_pbar": (True, False), "attn_gate": (False, False)}
    assert type(shapes["q"]) is Linear  # untouched roles stay plain
    # SimpleNorm on every projection, but not where the attention's q/k(/v) norms take the slot
    sg = tiny(simplegpt=True)
    assert all(isinstance(make_linear(64, 32, sg, role=r), Projection) for r in ("q", "k", "v", "o", "up"))
    assert type(make_linear(64, 32, sg, role="attn_affine")) is Linear
    if hasattr(sg, "qkv_norm"):
        qkv = dataclasses.replace(sg, qkv_norm=True)
        assert [type(make_linear(64, 32, qkv, role=r)) is Linear for r in ("q", "k", "v", "o")] == \
            [True, True, True, False]
    # simplegpt supersedes the multipliers (γ is the row multiplier; W's scale is normalised away)
    both = tiny(simplegpt=True, learnable_multipliers=True)
    m = make_linear(64, 32, both, role="down")
    assert m.row is None and m.col is None and m.norm is not None
    # CoLA: rank int(in * ratio), A without bias, B with bias
    cola = make_linear(64, 96, tiny(cola_rank_ratio=0.25), role="q")
    assert isinstance(cola, CoLALinear) and cola.rank == 16
    assert cola.A.bias is None and cola.B.bias is not None
    assert sum(p.numel() for p in cola.parameters()) == 16 * (64 + 96) + 96


def test_projection_matches_explicit_matmuls_and_init():
    args = tiny(learnable_multipliers=True, simplegpt=False, cola_rank_ratio=0.25)
    for role in ("o", "down", "gate", "q"):
        m = make_linear(64, 48, args, role=role).double()
        m.init_weights(0.05)
        x = torch.randn(3, 7, 64, dtype=D64)
        core = m.core if isinstance(m, Projection) else m
        torch.testing.assert_close(m(x), core(x), rtol=0, atol=0)  # multipliers start at 1
        perturb(m, 0.3)
        torch.testing.assert_close(m(x), ref_proj(m, x), rtol=1e-12, atol=1e-12)
    sg = make_linear(64, 48, tiny(simplegpt=True), role="up", bias=True).double()
    sg.init_weights(0.05)
    y = sg(torch.randn(5, 64, dtype=D64))
    torch.testing.assert_close((y * y).mean(-1), torch.ones(5, dtype=D64), rtol=1e-4, atol=1e-4)  # γ = 1
    perturb(sg, 0.3)
    x = torch.randn(5, 64, dtype=D64)
    torch.testing.assert_close(sg(x), ref_proj(sg, x), rtol=1e-12, atol=1e-12)


def test_cola_init_matches_the_dense_output_scale():
    torch.manual_seed(0)
    std = 0.02
    cola = CoLALinear(512, 512, 128)
    cola.init_weights(std)
    x = torch.randn(4096, 512)  # unit-RMS input
    ratio = cola(x).std().item() / (std * math.sqrt(512))
    assert 0.9 < ratio < 1.1


def test_fan_features_and_widths():
    assert fan_dims(512, 0.125) == (64, 384) and fan_dims(512, 0.15) == (76, 360)
    args = tiny(fan_ratio=0.125)
    fan = FAN(64, args).double()
    fan.init_weights(0.3)
    perturb(fan)
    x = torch.randn(2, 5, 64, dtype=D64)
    out = fan(x)
    assert out.shape == (2, 5, 64)
    p = x @ fan.wp.weight.T
    expected = torch.cat([torch.cos(p), torch.sin(p), x @ fan.wpbar.weight.T + fan.wpbar.bias], dim=-1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[..., :8] ** 2 + out[..., 8:16] ** 2, torch.ones(2, 5, 8, dtype=D64))


def test_fan_feeds_attention_only_unless_fan_on_gdn():
    a, _ = make_block("A", fan_ratio=0.125)
    d, _ = make_block("D", fan_ratio=0.125)
    d2, _ = make_block("D", fan_ratio=0.125, fan_on_gdn=True)
    assert a.fan is not None and d.fan is None and d2.fan is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_lns_multiplies_as_the_python_constant_did(dtype):
    """The buffer's product rounds once, bit for bit the product with the Python float it replaced."""
    block = Block(5, "A", tiny(layernorm_scaling=True))
    block.init_weights()
    if dtype != torch.float32:
        block.to(dtype)  # a bf16 model keeps the constant in fp32; an fp64 one holds it in fp64
    assert block.lns.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    x = torch.randn(3, 7, tiny().dim).to(dtype)
    assert torch.equal(block._lns(x), x * (1.0 / math.sqrt(6)))


def test_lns_constants():
    args = dataclasses.replace(FLAVORS["plain"], layernorm_scaling=True)
    with torch.device("meta"):
        model = NeoLLM(args)
    model.to_empty(device="cpu")  # as the trainer builds it: the buffers hold garbage until init_weights
    model.init_weights()
    scales = [block.lns.item() for block in model.layers.values()]
    assert scales == pytest.approx([1.0 / math.sqrt(l) for l in range(1, 13)], rel=1e-7, abs=0)
    assert all(block.lns.dtype == torch.float32 for block in model.layers.values())
    assert not any(".lns" in name for name in model.state_dict())  # not saved: checkpoints unchanged
    assert scales[0] == 1.0 and abs(scales[-1] - 0.2887) < 1e-4
    # the constant multiplies both pre-norm outputs: at init (LNS only), layer 4's mixer sees RMSNorm(x)/2
    block, args = make_block("A", layer_id=3, layernorm_scaling=True)
    seen = []
    block.mixer.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0]))
    x = torch.randn(1, 6, args.dim, dtype=D64)
    block(x, rope_cache(args.head_dim, 64, args.rope_theta).double())
    torch.testing.assert_close(seen[0], rms(x, None, args.norm_eps) / 2)


def test_gpas_forward_value_and_gradients():
    gpas = GPAS().double()
    assert gpas.gate.tolist() == [0.0]
    h0 = torch.randn(3, 4, 8, dtype=D64)
    torch.testing.assert_close(gpas(h0), h0, rtol=0, atol=0)  # SiLU(0) = 0: identity at init
    with torch.no_grad():
        gpas.gate.fill_(0.7)
    h = h0.clone().requires_grad_(True)
    out = gpas(h)
    silu = 0.7 / (1.0 + math.exp(-0.7))
    torch.testing.assert_close(out, (1.0 - silu) * h0, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(h0)
    out.backward(grad)
    torch.testing.assert_close(h.grad, grad, rtol=0, atol=0)  # identity Jacobian w.r.t. h'
    sig = 1.0 / (1.0 + math.exp(-0.7))
    dsilu = sig * (1.0 + 0.7 * (1.0 - sig))
    torch.testing.assert_close(gpas.gate.grad, torch.tensor([-dsilu * float((grad * h0).sum())], dtype=D64))


def test_gpas_is_one_gate_per_layer_and_identity_at_init():
    block, args = make_block("A", gpas=True)
    plain, _ = make_block("A")
    plain.load_state_dict(block.state_dict(), strict=False)
    assert [n for n, _ in block.named_parameters() if "gpas" in n] == ["gpas.gate"]
    x = torch.randn(2, 5, args.dim, dtype=D64)
    rope = rope_cache(args.head_dim, 64, args.rope_theta).double()
    torch.testing.assert_close(block(x, rope), plain(x, rope), rtol=0, atol=0)


def test_gated_residual_starts_at_half_branches():
    block, args = make_block("A", gated_residual=True)
    assert block.mixer_gate.gate.abs().sum() == 0 and block.mlp_gate.gate.abs().sum() == 0
    x = torch.randn(2, 5, args.dim, dtype=D64)
    rope = rope_cache(args.head_dim, 64, args.rope_theta).double()
    h = x + 0.5 * block.mixer(block.mixer_norm(x), rope)
    expected = h + 0.5 * block.mlp(block.mlp_norm(h))
    torch.testing.assert_close(block(x, rope), expected, rtol=1e-12, atol=1e-12)


def test_hybrid_norm_output_is_unit_rms_at_init():
    block, args = make_block("D", hybrid_norm=True)
    x = 5.0 * torch.randn(2, 7, args.dim, dtype=D64)
    out = block(x, rope_cache(args.head_dim, 64, args.rope_theta).double())
    torch.testing.assert_close((out * out).mean(-1), torch.ones(2, 7, dtype=D64), rtol=1e-5, atol=1e-5)


def test_dropout_sites_and_eval_mode():
    block, args = make_block("A", dropout=0.3)
    plain, _ = make_block("A")
    plain.load_state_dict(block.state_dict())
    x = torch.randn(2, 6, args.dim, dtype=D64)
    rope = rope_cache(args.head_dim, 64, args.rope_theta).double()
    block.eval()
    torch.testing.assert_close(block(x, rope), plain(x, rope), rtol=0, atol=0)
    block.train()
    torch.manual_seed(5)
    out = block(x, rope)
    torch.manual_seed(5)  # same masks, drawn in the documented order: mixer out, MLP hidden, MLP out
    h = x + F.dropout(block.mixer(block.mixer_norm(x), rope), 0.3, True)
    m = block.mlp_norm(h)
    hidden = F.dropout(F.silu(block.mlp.w1(m)) * block.mlp.w3(m), 0.3, True)
    expected = h + F.dropout(block.mlp.w2(hidden), 0.3, True)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, plain(x, rope))


def test_simplegpt_drops_prenorms_except_for_gated_deltanet():
    a, _ = make_block("A", simplegpt=True)
    d, _ = make_block("D", simplegpt=True)
    assert isinstance(a.mixer_norm, nn.Identity) and isinstance(a.mlp_norm, nn.Identity)
    assert isinstance(d.mixer_norm, nn.RMSNorm) and isinstance(d.mlp_norm, nn.Identity)


def test_attention_projections_under_projection_techniques():
    """The attention's q/k/v/o through make_linear (CoLA + SimpleNorm, or CoLA + multipliers) vs explicit maths."""
    for changes in (dict(cola_rank_ratio=0.25, simplegpt=True), dict(cola_rank_ratio=0.25, learnable_multipliers=True)):
        block, args = make_block("A", **changes)
        perturb(block)
        att = block.mixer
        x = torch.randn(2, 10, args.dim, dtype=D64)
        cache = rope_cache(args.head_dim, 64, args.rope_theta).double()
        q = apply_rope(ref_proj(att.wq, x).view(2, 10, 4, 16), cache)
        k = apply_rope(ref_proj(att.wk, x).view(2, 10, 2, 16), cache)
        v = ref_proj(att.wv, x).view(2, 10, 2, 16)
        heads = []
        mask = torch.ones(10, 10, dtype=torch.bool).triu(1)
        for hd in range(4):
            scores = q[:, :, hd] @ k[:, :, hd // 2].transpose(1, 2) / 4.0
            heads.append(scores.masked_fill(mask, float("-inf")).softmax(-1) @ v[:, :, hd // 2])
        expected = ref_proj(att.wo, torch.cat(heads, dim=-1))
        torch.testing.assert_close(att(x, cache), expected, rtol=1e-10, atol=1e-10)


def test_compile_fullgraph_all_on_attention_block():
    block, args = make_block("A", **TECHNIQUES["all"])
    block = block.float()
    perturb(block)
    block.train()  # as the trainer compiles it: dropout active (aot_eager draws the same masks as eager)
    x = torch.randn(2, 8, args.dim)
    rope = rope_cache(args.head_dim, 64, args.rope_theta)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    torch.manual_seed(3)
    out = compiled(x, rope)
    torch.manual_seed(3)
    torch.testing.assert_close(out, block(x, rope), rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    assert all(p.grad is not None for p in block.parameters())


def test_all_on_gdn_block_runs_eagerly_in_training_mode():
    block, args = make_block("D", **TECHNIQUES["all"])
    block.train()
    x = torch.randn(2, 8, args.dim, dtype=D64, requires_grad=True)
    out = block(x, rope_cache(args.head_dim, 64, args.rope_theta).double())
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---- parameter counts at the seed sizes (the numbers the docstrings quote) --------------------------------
def layer_params(flavor: str, mixer: str, **changes) -> int:
    from neollm.model.params import all_off

    args = dataclasses.replace(all_off(FLAVORS[flavor]), **changes)  # the seed's shape, switches as given
    with torch.device("meta"):
        block = Block(3, mixer, args)
    return sum(p.numel() for p in block.parameters())


@pytest.mark.parametrize("flavor, mixer, changes, added", [
    ("neollm_135m", "A", dict(mlp_type="polynorm"), 4),
    ("neollm_135m", "A", dict(mlp_type="polynorm", polynorm_exclusive=True), 6),
    ("neollm_135m", "A", dict(learnable_multipliers=True), 2 * 512 + 512 + 1536 + 1536),
    ("neollm_110m_hybrid", "D", dict(learnable_multipliers=True), 512 + 1024 + 1024),
    ("neollm_135m", "A", dict(simplegpt=True, simplegpt_scope="all"),
     512 + 256 + 256 + 512 + 1536 + 1536 + 512 - 2 * 512),
    # the card's scope: gains on gate, up and down only, and the MLP's pre-norm dropped
    ("neollm_135m", "A", dict(simplegpt=True, simplegpt_scope="mlp"), 1536 + 1536 + 512 - 512),
    ("neollm_135m", "A", dict(fan_ratio=0.125), 512 * 64 + 512 * 384 + 384),
    ("neollm_135m", "A", dict(fan_ratio=0.15), 512 * 76 + 512 * 360 + 360),
    ("neollm_135m", "A", dict(gpas=True), 1),
    ("neollm_135m", "A", dict(hybrid_norm=True), 512),
    ("neollm_135m", "A", dict(gated_residual=True), 1024),
    ("neollm_135m", "A", dict(layernorm_scaling=True, dropout=0.1), 0),
    # CoLA r = in/4 on q,k,v,o (512->512/256) and gate, up (512->1536), down (1536->512)
    ("neollm_135m", "A", dict(cola_rank_ratio=0.25),
     (128 * (512 + 512) + 512) * 2 + (128 * (512 + 256) + 256) * 2 + (128 * (512 + 1536) + 1536) * 2
     + (384 * (1536 + 512) + 512) - (2 * 512 * 512 + 2 * 512 * 256 + 3 * 512 * 1536)),
])
def test_parameters_added_per_layer(flavor, mixer, changes, added):
    assert layer_params(flavor, mixer, **changes) - layer_params(flavor, mixer) == added


@pytest.mark.parametrize("changes, fragment", [
    (dict(mlp_type="gelu"), "mlp_type"),
    (dict(polynorm_exclusive=True), "polynorm_exclusive"),
    (dict(cola_rank_ratio=1.5), "cola_rank_ratio"),
    (dict(fan_ratio=0.5), "fan_ratio"),
    (dict(fan_on_gdn=True), "fan_on_gdn"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_technique_args_raise_clear_errors(changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        dataclasses.replace(FLAVORS["plain"], **changes)


def test_init_survives_float8_conversion():
    """torchao's float8 swap replaces our Linear (and its init_weights) by Float8Linear; init must still cover it."""
    torchao_float8 = importlib.import_module("torchao.float8")
    args = tiny(learnable_multipliers=True, fan_ratio=0.25, mlp_type="polynorm")
    with torch.device("meta"):
        block = Block(1, "A", args)
    for sub in (block.mlp, block.fan):
        torchao_float8.convert_to_float8_training(sub, config=torchao_float8.Float8LinearConfig(emulate=True))
    assert type(block.mlp.w3).__name__ == "Float8Linear" and type(block.mlp.w2.core).__name__ == "Float8Linear"
    block.to_empty(device="cpu")
    with torch.no_grad():
        for p in block.parameters():
            p.fill_(float("nan"))
        block.mlp.init_weights(0.02, 0.01)
        block.fan.init_weights(0.02)
    for name, p in list(block.mlp.named_parameters()) + list(block.fan.named_parameters()):
        assert torch.isfinite(p).all(), name
    assert block.fan.wpbar.core.bias._no_weight_decay
