"""FFN options (mlp_type "mlp" and "moe") on CPU: formulas written out here, the load-balancing loss by hand,
gradients, the loss the model returns with labels, training steps, torch.compile and meta-device init."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import neollm  # noqa: F401  (registers the spec)
from neollm.errors import ConfigError
from neollm.loss import IGNORE_INDEX
from neollm.model.args import FLAVORS, NeoLLMModelArgs
from neollm.model.block import Block
from neollm.model.flops import training_flops_per_token
from neollm.model.mlp import MLP, GeluMLP, build_mlp
from neollm.model.model import NeoLLM
from neollm.model.moe import MoE, load_balancing_loss
from neollm.model.params import count_parameters, flavor_report, moe_inactive_parameters
from neollm.model.rope import rope_cache

D64 = torch.float64


def tiny(**changes) -> NeoLLMModelArgs:
    return dataclasses.replace(FLAVORS["debug"], vocab_size=96, max_seq_len=32, **changes)


def moe_args(**changes) -> NeoLLMModelArgs:
    return tiny(**{"mlp_type": "moe", "moe_num_experts": 4, "moe_top_k": 2, **changes})


def built(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    module.init_weights(0.02, 0.01)
    return module.double()


def gelu_erf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


# ---- mlp_type "mlp" --------------------------------------------------------------------------------------
def test_gelu_mlp_is_the_two_layer_formula():
    args = tiny(mlp_type="mlp")
    mlp = built(build_mlp(args))
    assert isinstance(mlp, GeluMLP)
    assert {n for n, _ in mlp.named_parameters()} == {"w1.weight", "w2.weight"}
    assert mlp.w1.weight.shape == (args.ffn_hidden_dim, args.dim)
    x = torch.randn(2, 5, args.dim, dtype=D64)
    expected = gelu_erf(x @ mlp.w1.weight.T) @ mlp.w2.weight.T
    torch.testing.assert_close(mlp(x), expected, rtol=1e-12, atol=1e-12)
    assert mlp.w2.weight.std().item() == pytest.approx(0.01, rel=0.1)


def test_gelu_mlp_takes_projection_techniques():
    args = tiny(mlp_type="mlp", learnable_multipliers=True)
    mlp = built(build_mlp(args))
    # the up projection feeds GELU: row multiplier (as the GLU's gate); down: row and column
    assert mlp.w1.row is not None and mlp.w1.col is None
    assert mlp.w2.row is not None and mlp.w2.col is not None
    with torch.no_grad():
        mlp.w1.row.uniform_(0.5, 1.5)
        mlp.w2.col.uniform_(0.5, 1.5)
        mlp.w2.row.uniform_(0.5, 1.5)
    x = torch.randn(3, args.dim, dtype=D64)
    hidden = gelu_erf((x @ mlp.w1.core.weight.T) * mlp.w1.row)
    expected = ((hidden * mlp.w2.col) @ mlp.w2.core.weight.T) * mlp.w2.row
    torch.testing.assert_close(mlp(x), expected, rtol=1e-12, atol=1e-12)
    cola = build_mlp(tiny(mlp_type="mlp", cola_rank_ratio=0.25))
    assert type(cola.w1).__name__ == "CoLALinear"


def test_gelu_mlp_parameter_count_and_matched_hidden_size():
    glu = count_parameters(tiny())[0]
    mlp = count_parameters(tiny(mlp_type="mlp", ffn_hidden_dim=384 * 3 // 2))[0]
    assert glu == mlp  # 2 * dim * 1.5H == 3 * dim * H
    args = tiny(mlp_type="mlp")
    layers = args.n_layers * (3 - 2) * args.dim * args.ffn_hidden_dim
    assert count_parameters(tiny())[0] - count_parameters(args)[0] == layers


# ---- mlp_type "moe": module ------------------------------------------------------------------------------
def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per token: softmax router, top-k, renormalise (k > 1), weighted sum of the chosen SwiGLU experts."""
    out = torch.zeros_like(x)
    e = moe.experts
    for t in range(x.shape[0]):
        p = torch.softmax(x[t] @ moe.router.weight.T, dim=-1)
        chosen = sorted(range(p.numel()), key=lambda i: -p[i].item())[: moe.top_k]
        total = sum(p[i] for i in chosen) if moe.top_k > 1 else 1.0
        for i in chosen:
            h = F.silu(e.w1[i] @ x[t]) * (e.w3[i] @ x[t])
            out[t] += (p[i] / total) * (e.w2[i] @ h)
    return out


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_moe_matches_a_per_token_loop(top_k):
    args = moe_args(moe_top_k=top_k)
    moe = built(MoE(args))
    with torch.no_grad():  # larger router weights so the choices are clear-cut and varied
        moe.router.weight.normal_(0.0, 0.5)
    x = torch.randn(3, 7, args.dim, dtype=D64)
    out, aux = moe(x)
    expected = naive_moe(moe, x.reshape(-1, args.dim)).reshape(x.shape)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    assert moe.hidden_dim == args.ffn_hidden_dim // top_k
    assert aux.ndim == 0 and aux.item() > 0


def test_load_balancing_loss_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.7, 0.2, 0.1]])
    idx = probs.topk(2, dim=-1).indices  # slots: {0,1}, {1,2}, {2,0 or 1}, {0,1}
    idx[2] = torch.tensor([2, 0])
    # slot counts: expert0 = 3, expert1 = 3, expert2 = 2 over 8 slots
    f = [3 / 8, 3 / 8, 2 / 8]
    mean_p = [1.5 / 4, 1.3 / 4, 1.2 / 4]
    expected = 3 * sum(a * b for a, b in zip(f, mean_p))
    assert load_balancing_loss(probs, idx).item() == pytest.approx(expected, rel=1e-6)
    # top-1 reduces to Switch's fraction of tokens
    idx1 = probs.argmax(-1, keepdim=True)  # experts 0, 1, 2, 0
    switch = 3 * ((2 / 4) * (1.5 / 4) + (1 / 4) * (1.3 / 4) + (1 / 4) * (1.2 / 4))
    assert load_balancing_loss(probs, idx1).item() == pytest.approx(switch, rel=1e-6)


def test_load_balancing_loss_is_one_when_routing_is_uniform_and_larger_when_collapsed():
    args = moe_args()
    moe = built(MoE(args))
    with torch.no_grad():
        moe.router.weight.zero_()  # p = 1/E for every token
    n, e, k = 8, args.moe_num_experts, args.moe_top_k
    uniform = torch.full((n, e), 1.0 / e)
    balanced = (torch.arange(n * k) % e).reshape(n, k)
    assert load_balancing_loss(uniform, balanced).item() == pytest.approx(1.0, abs=1e-7)
    _, aux = moe(torch.randn(n, args.dim, dtype=D64))  # zero router: any choice, mean p = 1/E
    assert aux.item() == pytest.approx(1.0, abs=1e-12)
    collapsed = torch.tensor([[0.9, 0.1 - 2e-3, 1e-3, 1e-3]]).expand(n, e)
    assert load_balancing_loss(collapsed, collapsed.topk(k).indices).item() > 1.9


def test_moe_gradients_reach_router_and_every_used_expert():
    args = moe_args(moe_num_experts=6, moe_top_k=2)
    moe = built(MoE(args))
    with torch.no_grad():
        moe.router.weight.normal_(0.0, 0.5)
    x = torch.randn(40, args.dim, dtype=D64)
    out, aux = moe(x)
    (out.square().sum() + aux).backward()
    used = moe.route(x)[1].unique().tolist()
    assert len(used) >= 3
    assert moe.router.weight.grad.abs().sum() > 0
    for name in ("w1", "w2", "w3"):
        grad = getattr(moe.experts, name).grad
        for i in range(args.moe_num_experts):
            assert (grad[i].abs().sum() > 0) == (i in used), (name, i)
    # the auxiliary loss alone trains the router
    moe.zero_grad()
    moe(x)[1].backward()
    assert moe.router.weight.grad.abs().sum() > 0


# ---- mlp_type "moe": in the model ------------------------------------------------------------------------
def build(args: NeoLLMModelArgs, seed: int = 0) -> NeoLLM:
    torch.manual_seed(seed)
    model = NeoLLM(args)
    model.init_weights()
    return model


def test_model_loss_includes_the_auxiliary_term():
    args = moe_args(moe_aux_loss_coef=0.05)
    model = build(args)
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    labels = torch.randint(0, args.vocab_size, (2, 16))
    labels[0, :5] = IGNORE_INDEX
    loss = model(tokens, labels)
    # by hand: CE sum from the logits, aux from each layer's MoE on that layer's input
    logits = model(tokens)
    ce_sum = F.cross_entropy(logits.reshape(-1, args.vocab_size).float(), labels.reshape(-1), reduction="sum")
    h, aux_total = model.tok_embeddings(tokens), 0.0
    for block in model.layers.values():
        h, aux = block(h, model.rope, return_aux=True)
        aux_total = aux_total + aux
    n_valid = 32 - 5
    torch.testing.assert_close(loss, ce_sum + 0.05 * aux_total * n_valid, rtol=1e-5, atol=1e-5)
    assert model.last_moe_aux_loss.item() == pytest.approx(aux_total.item(), rel=1e-6)
    assert aux_total.item() >= args.n_layers * 0.99  # about 1 per layer at init
    from neollm.monitor import technique_scalars

    logged = technique_scalars(model)["techniques/moe_aux_loss/sum_over_layers"]
    assert logged == pytest.approx(aux_total.item(), rel=1e-6)
    # eval mode (validation): cross-entropy only, comparable with dense models
    model.eval()
    torch.testing.assert_close(model(tokens, labels), ce_sum, rtol=1e-5, atol=1e-5)
    model.train()
    # coefficient 0: plain CE sum
    no_aux = dataclasses.replace(args, moe_aux_loss_coef=0.0)
    model0 = NeoLLM(no_aux)
    model0.load_state_dict(model.state_dict())
    torch.testing.assert_close(model0(tokens, labels), ce_sum, rtol=1e-5, atol=1e-5)


def test_tiny_moe_model_trains_on_cpu():
    args = moe_args()
    model = build(args)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, args.vocab_size, (4, 24))
    labels = torch.roll(tokens, -1, dims=1)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model(tokens, labels) / labels.numel()
        loss.backward()
        assert model.layers["1"].mlp.router.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.5, losses


def test_moe_block_under_torch_compile_and_checkpointing():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    args = moe_args()
    torch.manual_seed(0)
    block = Block(1, "A", args)
    block.init_weights()
    with torch.no_grad():
        block.mlp.router.weight.normal_(0.0, 0.5)
    rope = rope_cache(args.head_dim, 16, args.rope_theta)
    x = torch.randn(2, 16, args.dim, requires_grad=True)
    ref_out, ref_aux = block(x, rope, return_aux=True)
    (ref_out.sum() + ref_aux).backward()
    ref_grads = [p.grad.clone() for p in block.parameters()]

    wrapped = torch.compile(checkpoint_wrapper(block), backend="aot_eager")
    block.zero_grad()
    out, aux = wrapped(x, rope, return_aux=True)
    (out.sum() + aux).backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux, ref_aux, rtol=1e-5, atol=1e-6)
    for p, g in zip(block.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(wrapped(x, rope), ref_out, rtol=1e-5, atol=1e-5)  # plain call: output only


def test_meta_build_then_to_empty_and_init():
    args = moe_args()
    with torch.device("meta"):
        model = NeoLLM(args)
    model.to_empty(device="cpu")
    model.init_weights(buffer_device=torch.device("cpu"))
    experts = model.layers["0"].mlp.experts
    assert torch.isfinite(experts.w1).all() and experts.w1.std().item() == pytest.approx(0.02, rel=0.05)
    assert experts.w2.std().item() == pytest.approx(0.02 / math.sqrt(2 * args.n_layers), rel=0.05)
    tokens = torch.randint(0, args.vocab_size, (1, 8))
    assert torch.isfinite(model(tokens, tokens)).all()


def test_moe_parameters_and_active_flops():
    dense = tiny()
    args = moe_args(moe_num_experts=4, moe_top_k=2)
    e, k, d, h = 4, 2, args.dim, args.ffn_hidden_dim // 2
    per_layer_moe = e * 3 * d * h + d * e
    per_layer_dense = 3 * d * args.ffn_hidden_dim
    assert count_parameters(args)[0] - count_parameters(dense)[0] == args.n_layers * (per_layer_moe - per_layer_dense)
    assert moe_inactive_parameters(args) == args.n_layers * (e - k) * 3 * d * h
    with torch.device("meta"):
        flops_dense = training_flops_per_token(NeoLLM(dense), dense, 32)
        flops_moe = training_flops_per_token(NeoLLM(args), args, 32)
    # active experts hold the dense FFN's weights; the router adds dim * E per layer
    assert flops_moe - flops_dense == 6 * args.n_layers * d * e
    assert "active per token" in flavor_report_for(args)


def flavor_report_for(args: NeoLLMModelArgs) -> str:
    FLAVORS["_moe_test"] = args
    try:
        return flavor_report("_moe_test")
    finally:
        del FLAVORS["_moe_test"]


@pytest.mark.parametrize("changes, fragment", [
    (dict(mlp_type="moe", moe_num_experts=1, moe_top_k=1), "moe_num_experts"),
    (dict(mlp_type="moe", moe_num_experts=4, moe_top_k=5), "moe_top_k"),
    (dict(mlp_type="moe", moe_top_k=0), "moe_top_k"),
    (dict(mlp_type="moe", moe_hidden_dim=-1), "moe_hidden_dim"),
    (dict(mlp_type="moe", moe_aux_loss_coef=-0.1), "moe_aux_loss_coef"),
    (dict(mlp_type="moe", simplegpt=True), "simplegpt"),
    (dict(mlp_type="moe", cola_rank_ratio=0.25), "cola_rank_ratio"),
    (dict(mlp_type="mlp", polynorm_exclusive=True), "polynorm_exclusive"),
    (dict(mlp_type="relu"), "mlp_type"),
])
def test_bad_ffn_args_raise_clear_errors(changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        dataclasses.replace(FLAVORS["plain"], **changes)


def test_glu_default_is_unchanged():
    assert type(build_mlp(tiny())) is MLP and type(build_mlp(tiny(mlp_type="polynorm"))) is MLP


# ---- the NeoLLM author's MLP graph (FAN inside the FFN) ------------------------------------
def test_ffn_fan_sizes_follow_the_authors_profile():
    from neollm.model.fan import ffn_fan_dims

    assert ffn_fan_dims(512, 0.0625) == (544, 34)  # FAN 512 -> 510, [cos 34 | sin 34 | 476]
    mlp = MLP(dataclasses.replace(FLAVORS["plain"], mlp_type="polynorm", ffn_fan_ratio=0.0625))
    assert tuple(mlp.fan.proj.weight.shape) == (510, 512) and tuple(mlp.fan.proj.bias.shape) == (510,)
    assert tuple(mlp.w1.weight.shape) == (1536, 544) and tuple(mlp.w3.weight.shape) == (1536, 544)


def test_mlp_with_ffn_fan_and_multipliers_is_the_authors_graph():
    """simplegpt off: X -> FAN (bias) -> [cos|sin|pass] -> gate * r_gate -> exclusive PolyNorm, * up,
    * c_down -> down * r_down, written out here from ml-cross-entropy's mlp/reference.py reading."""
    from test_block_techniques import ref_polynorm

    args = tiny(mlp_type="polynorm", polynorm_exclusive=True, learnable_multipliers=True, ffn_fan_ratio=0.0625)
    mlp = built(MLP(args))
    assert mlp.act.exclusive_logits.detach().sigmoid().allclose(torch.full((2,), 1e-4, dtype=D64))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in mlp.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=D64))
    x = torch.randn(2, 5, args.dim, generator=gen, dtype=D64)
    width, periodic = mlp.fan.out_dim, mlp.fan.p_dim
    assert (width, periodic) == (args.dim + int(args.dim * 0.0625), int(width * 0.0625))
    proj = x @ mlp.fan.proj.weight.T + mlp.fan.proj.bias
    fan = torch.cat([proj[..., :periodic].cos(), proj[..., :periodic].sin(), proj[..., periodic:]], -1)
    gate = (fan @ mlp.w1.core.weight.T) * mlp.w1.row
    up = fan @ mlp.w3.weight.T
    act = ref_polynorm(gate, mlp.act.weight, mlp.act.bias, mlp.act.exclusive_logits)
    expected = ((act * up * mlp.w2.col) @ mlp.w2.core.weight.T) * mlp.w2.row
    torch.testing.assert_close(mlp(x), expected, rtol=1e-10, atol=1e-10)
    assert mlp.w3.__class__.__name__ == "Linear"  # no multiplier on up (the author's graph has none)


@pytest.mark.parametrize("scope,ffn_fan", [("all", 0.0), ("all", 0.0625), ("mlp", 0.0), ("mlp", 0.0625)])
def test_simplegpt_scope_places_simplenorm_multipliers_and_pre_norms(scope, ffn_fan):
    args = tiny(layer_pattern="A", simplegpt=True, simplegpt_scope=scope, learnable_multipliers=True,
                ffn_fan_ratio=ffn_fan, mlp_type="polynorm")
    block = Block(0, "A", args)
    simple = lambda m: getattr(m, "norm", None) is not None  # noqa: E731
    assert all(simple(m) for m in (block.mlp.w1, block.mlp.w3, block.mlp.w2))  # the FFN's, in both scopes
    assert all(getattr(m, "row", None) is None for m in (block.mlp.w1, block.mlp.w2))  # gamma is the row scale
    attention = (block.mixer.wq, block.mixer.wk, block.mixer.wv, block.mixer.wo)
    assert all(simple(m) for m in attention) == (scope == "all")
    assert (block.mixer.wo.row is not None) == (scope == "mlp")  # multipliers act where no SimpleNorm is
    assert isinstance(block.mixer_norm, torch.nn.RMSNorm) == (scope == "mlp")
    assert isinstance(block.mlp_norm, torch.nn.RMSNorm) == (ffn_fan > 0)  # kept in front of the FFN FAN
    if ffn_fan:
        assert type(block.mlp.fan.proj).__name__ == "Linear"  # no SimpleNorm, no multipliers (author's)
