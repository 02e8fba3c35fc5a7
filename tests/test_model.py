"""The NeoLLM model on CPU: registration, shapes, init, causality, attention math, FLOPs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import neollm  # noqa: F401  (registers the spec)
from neollm.errors import ConfigError
from neollm.model.args import FLAVORS, NeoLLMModelArgs
from neollm.model.attention import Attention
from neollm.model.flops import training_flops_per_token
from neollm.model.model import NeoLLM
from neollm.model.rope import apply_rope, rope_cache

from conftest import rope_reference, rope_table_reference


def tiny(args: NeoLLMModelArgs, **changes) -> NeoLLMModelArgs:
    """Shrink a flavor while keeping its mixer pattern and head grouping."""
    base = dict(dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden_dim=96, vocab_size=97, max_seq_len=64,
                n_layers=len(args.layer_pattern) * 2, gdn_num_heads=2, gdn_head_dim=16,
                gdn_backend="torch")
    base.update(changes)
    return dataclasses.replace(args, **base)


def build(args: NeoLLMModelArgs, seed: int = 0) -> NeoLLM:
    """Build the way the trainer does: on meta, then to_empty + init_weights."""
    with torch.device("meta"):
        model = NeoLLM(args)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights()
    return model


def test_spec_is_registered_with_flavors():
    from torchtitan.protocols.train_spec import get_train_spec

    spec = get_train_spec("neollm")
    assert spec.model_cls is NeoLLM
    assert {"debug", "plain", "neollm_135m", "neollm_110m_hybrid", "fanformer_92m"} <= set(spec.model_args)


def test_flavor_shapes_follow_the_seeds():
    m135, hybrid = FLAVORS["neollm_135m"], FLAVORS["neollm_110m_hybrid"]
    assert (m135.dim, m135.n_layers, m135.n_heads, m135.n_kv_heads, m135.head_dim,
            m135.ffn_hidden_dim, m135.vocab_size) == (512, 12, 8, 4, 64, 1536, 64_402)
    # Gated DeltaNet in layers 1-3, 5-7, 9-11; full attention in 4, 8, 12 (1-indexed).
    full = [i + 1 for i, code in enumerate(hybrid.layer_types()) if code == "A"]
    assert full == [4, 8, 12]
    assert (hybrid.n_kv_heads, hybrid.ffn_hidden_dim) == (2, 1024)
    assert hybrid.vocab_size >= 151_669 and hybrid.vocab_size % 64 == 0


def test_plain_parameter_count_from_its_shape():
    with torch.device("meta"):
        model = NeoLLM(FLAVORS["plain"])
    embedding = model.tok_embeddings.weight.numel()
    assert embedding == 32_973_824  # seed 001's embedding, exactly
    d, kv, f = 512, 4 * 64, 1536
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    assert sum(p.numel() for p in model.parameters()) == embedding + 12 * per_layer + d


def test_flavor_parameter_counts():
    from neollm.model.params import count_parameters, technique_breakdown

    # (total, embedding): docs/techniques.md explains each against the seed cards.
    assert count_parameters(FLAVORS["neollm_135m"]) == (81_306_244, 32_973_824)
    assert count_parameters(FLAVORS["neollm_110m_hybrid"]) == (108_714_884, 77_660_160)
    assert count_parameters(FLAVORS["fanformer_92m"]) == (85_599_132, 37_748_736)
    added = technique_breakdown(FLAVORS["neollm_135m"])
    assert added["attention_output_gate"] == 12 * 512 * 512  # elementwise gate: D x H*d per layer
    assert added["fan_ratio"] == 12 * (512 * 64 + 512 * 384 + 384)  # W_p, W_pbar, bias
    # FFN FAN: one 512 -> 510 projection with bias; gate and up read 544 = 510 + 34 channels
    assert added["ffn_fan_ratio"] == 12 * (512 * 510 + 510 + 2 * 32 * 1536)
    assert added["gpas"] == 12 and added["mlp_type"] == 12 * 4


def test_plain_is_every_switch_off_and_seeds_switch_their_techniques_on():
    from neollm.model.args import SEED_000_TECHNIQUES, SEED_001_TECHNIQUES, SEED_002_TECHNIQUES
    from neollm.model.params import technique_switches

    assert technique_switches(FLAVORS["plain"]) == {}
    assert technique_switches(FLAVORS["debug"]) == {}
    for flavor, techniques in [("neollm_135m", SEED_001_TECHNIQUES),
                               ("neollm_110m_hybrid", SEED_000_TECHNIQUES),
                               ("fanformer_92m", SEED_002_TECHNIQUES)]:
        args = FLAVORS[flavor]
        for name, value in techniques.items():
            assert getattr(args, name) == value, (flavor, name)
        assert set(technique_switches(args)) <= set(techniques)


@pytest.mark.parametrize("flavor", sorted(FLAVORS))
def test_every_flavor_trains_a_step_at_tiny_size(flavor):
    args = tiny(FLAVORS[flavor])
    model = build(args)
    tokens = torch.randint(0, args.vocab_size, (2, 24))
    logits = model(tokens)
    assert logits.shape == (2, 24, args.vocab_size)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    assert abs(loss.item() - math.log(args.vocab_size)) < 0.5  # small init: near-uniform predictions
    loss.backward()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(5):
        if step == 1:
            # After one update every parameter is in play (SeeDNorm's alpha and a zero-initialised
            # CoLA factor get their first gradient only once their partner has moved).
            for name, param in model.named_parameters():
                assert param.grad is not None and torch.isfinite(param.grad).all(), name
                assert param.grad.abs().sum() > 0, f"no gradient reaches {name}"
        optimizer.step()
        optimizer.zero_grad()
        F.cross_entropy(model(tokens)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    after = F.cross_entropy(model(tokens)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    assert after.item() < loss.item() - 0.5


def test_tied_head_is_the_embedding():
    model = build(tiny(FLAVORS["debug"]))
    assert model.output is None
    assert model.head_weight() is model.tok_embeddings.weight


@pytest.mark.parametrize("pattern", ["A", "D", "DA"])
def test_causal_for_every_mixer(pattern):
    args = tiny(FLAVORS["debug"], layer_pattern=pattern, n_layers=2)
    model = build(args).double()
    tokens = torch.randint(0, args.vocab_size, (2, 40))
    t = 17
    changed = tokens.clone()
    changed[:, t + 1:] = torch.randint(0, args.vocab_size, (2, 40 - t - 1))
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-10)
    assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-4


def test_rope_table_and_rotation_match_the_definition():
    """rope.py against cos/sin(t * theta^(-2i/d)) written out here, for two thetas and head sizes:
    a wrong frequency exponent or pairing fails (the attention references use rope_reference too)."""
    for dim, theta in ((16, 10_000.0), (64, 500_000.0)):
        cache = rope_cache(dim, 40, theta).double()
        for t in (0, 1, 7, 39):
            for i in range(dim // 2):
                angle = t * theta ** (-2.0 * i / dim)
                assert cache[t, i].item() == pytest.approx(math.cos(angle), abs=2e-6)
                assert cache[t, dim // 2 + i].item() == pytest.approx(math.sin(angle), abs=2e-6)
        x = torch.randn(2, 40, 3, dim, dtype=torch.float64)
        torch.testing.assert_close(apply_rope(x, cache), rope_reference(x, theta), rtol=0, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    cache = rope_cache(16, 64, 10_000.0)
    gen = torch.Generator().manual_seed(0)  # its own draws: a near-zero score would fail the relative check
    q = torch.randn(1, 1, 1, 16, dtype=torch.float64, generator=gen)
    k = torch.randn(1, 1, 1, 16, dtype=torch.float64, generator=gen)

    def score(m: int, n: int) -> float:
        qm = apply_rope(q.expand(1, 64, 1, 16).contiguous(), cache)[0, m, 0]
        kn = apply_rope(k.expand(1, 64, 1, 16).contiguous(), cache)[0, n, 0]
        return float(qm @ kn)

    assert score(10, 3) == pytest.approx(score(40, 33), rel=1e-5)  # fp32 angle table
    assert score(5, 5) == pytest.approx(float(q.flatten() @ k.flatten()), rel=1e-6)


def test_attention_matches_explicit_softmax_matrices():
    args = tiny(FLAVORS["plain"], n_heads=4, n_kv_heads=2)
    torch.manual_seed(0)
    attention = Attention(args).double()
    for p in attention.parameters():
        nn.init.normal_(p, std=0.2)
    cache = rope_table_reference(args.head_dim, 32, args.rope_theta)
    x = torch.randn(2, 12, args.dim, dtype=torch.float64)
    out = attention(x, cache)

    q = rope_reference(attention.wq(x).view(2, 12, 4, 16), args.rope_theta)  # not the module's rope.py
    k = rope_reference(attention.wk(x).view(2, 12, 2, 16), args.rope_theta)
    v = attention.wv(x).view(2, 12, 2, 16)
    heads = []
    for h in range(4):
        g = h // 2  # query heads 0,1 share KV head 0; 2,3 share KV head 1
        scores = q[:, :, h] @ k[:, :, g].transpose(1, 2) / math.sqrt(16)
        mask = torch.ones(12, 12, dtype=torch.bool).triu(1)
        heads.append(scores.masked_fill(mask, float("-inf")).softmax(-1) @ v[:, :, g])
    expected = attention.wo(torch.cat(heads, dim=-1))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_flops_count_for_an_attention_model():
    args = FLAVORS["plain"]
    with torch.device("meta"):
        model = NeoLLM(args)
    d, kv, f, T, L, V = 512, 256, 1536, 512, 12, 64_402
    linear = L * (2 * d * d + 2 * d * kv + 3 * d * f)
    expected = 6 * linear + 6 * d * V + 12 * T * 64 * 8 * L
    assert training_flops_per_token(model, args, T) == expected


def test_flops_count_includes_deltanet_layers():
    from neollm.model.mixers.deltanet import gdn_flops_per_token

    from neollm.model.params import all_off

    args = all_off(FLAVORS["neollm_110m_hybrid"])
    with torch.device("meta"):
        model = NeoLLM(args)
    d, kv, f, T, V = 512, 128, 1024, 512, args.vocab_size
    attention_layers = 3 * (6 * (2 * d * d + 2 * d * kv) + 12 * T * 64 * 8)
    mlps = 12 * 6 * 3 * d * f
    gdn = gdn_flops_per_token(d, 4, 64, 2.0, 4)
    # each GDN layer costs at least 6 x its projection weights (q,k 256; v,g 512; o 512->512)
    assert gdn >= 6 * (2 * d * 256 + 3 * d * 512)
    expected = attention_layers + mlps + 9 * gdn + 6 * d * V
    assert training_flops_per_token(model, args, T) == expected


def test_flops_count_adds_lucid_preconditioner():
    plain = FLAVORS["plain"]
    lucid = dataclasses.replace(plain, lucid=True)
    with torch.device("meta"):
        a, b = NeoLLM(plain), NeoLLM(lucid)
    extra = training_flops_per_token(b, lucid, 512) - training_flops_per_token(a, plain, 512)
    assert extra == 12 * 9 * 512 * 64 * 4  # per layer: Gram matrix + triangular solve, x3 for backward


@pytest.mark.parametrize(
    "changes, fragment",
    [
        (dict(n_heads=6, n_kv_heads=4), "multiple of n_kv_heads"),
        (dict(layer_pattern="DDDAD"), "tile n_layers"),
        (dict(layer_pattern="DX"), "may only use"),
        (dict(n_layers=2, layer_pattern="DDDA"), "tile n_layers"),
        (dict(head_dim=15), "even"),
        (dict(gdn_backend="cuda"), "gdn_backend"),
        (dict(dim=0), "dim must be positive"),
    ],
)
def test_bad_model_args_raise_clear_errors(changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        dataclasses.replace(FLAVORS["plain"], **changes)


def test_sequence_longer_than_max_seq_len_is_refused():
    args = tiny(FLAVORS["debug"], max_seq_len=16)
    model = build(args)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_flops_per_token_match_torch_flop_counter():
    """neollm/model/flops.py against torch.utils.flop_counter.FlopCounterMode over one forward and
    backward of a tiny `plain` model (GQA, tied head). Convention: every matmul 2nkm forward, twice
    that backward; attention over the full T x T square (SDPA's math backend computes exactly that
    with bmm, which the counter sees; the causal kernels skip about half). The loss runs as plain
    logits + cross-entropy, so no recomputation is in the count."""
    import dataclasses

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from neollm.loss import LossSettings
    from neollm.model.flops import training_flops_per_token

    for layers, seq in ((2, 32), (1, 48)):
        args = dataclasses.replace(FLAVORS["plain"], n_layers=layers, vocab_size=256, max_seq_len=seq)
        torch.manual_seed(0)
        model = NeoLLM(args)
        model.init_weights()
        model.loss_settings = LossSettings(impl="logits")
        tokens = torch.randint(0, 256, (2, seq + 1))
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(tokens[:, :-1], tokens[:, 1:]).backward()
        counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
        assert set(counts) == {"aten.mm", "aten.bmm"}, counts  # projections + head; attention scores/mix
        assert counter.get_total_flops() == training_flops_per_token(model, args, seq) * 2 * seq


def test_embedding_init_std_sets_the_token_embeddings_scale():
    """embedding_init_std (SimpleGPT's N(0, 1) embeddings with an untied head); 0 keeps init_std."""
    def embedding_std(**changes):
        args = dataclasses.replace(FLAVORS["debug"], **changes)
        torch.manual_seed(0)
        model = NeoLLM(args)
        model.init_weights()
        return model.tok_embeddings.weight.std().item(), model.head_weight().std().item()

    assert embedding_std() == pytest.approx((0.02, 0.02), rel=0.05)
    emb, head = embedding_std(embedding_init_std=1.0, tie_embeddings=False)
    assert emb == pytest.approx(1.0, rel=0.05) and head == pytest.approx(0.02, rel=0.05)
    with pytest.raises(ConfigError, match="embedding_init_std must be >= 0"):
        dataclasses.replace(FLAVORS["debug"], embedding_init_std=-1.0)
