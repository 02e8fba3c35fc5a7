"""neollm.inference: cached decoding equals the full forward (every flavor), sampling, loading, CLI."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import TOKENIZER_DIR, load_tool, require_prepared_assets, run_trainer
from test_model import build, tiny

from neollm.checkpoint import checkpoint_shapes, load_checkpoint, load_model, resolve_checkpoint
from neollm.inference import SamplingConfig, filter_logits, forward_step, generate, new_cache, sample_next
from neollm.model.model import build_model
from neollm.model.args import FLAVORS, NeoLLMModelArgs

ALL_ATTENTION = dict(
    seednorm_qk=True, qkv_norm=True, mea=True, momentum_gamma=0.3, affine_scaled_attention=True,
    lucid=True, xsa=True, directional_routing=True, routing_directions=3,
    attention_output_gate="elementwise",
)
EVERYTHING = dict(
    ALL_ATTENTION, attention_output_gate="headwise", mlp_type="polynorm", polynorm_exclusive=True,
    learnable_multipliers=True, simplegpt=True, cola_rank_ratio=0.25, fan_ratio=0.125, ffn_fan_ratio=0.0625,
    momentum_first="zero",
    fan_on_gdn=True, layernorm_scaling=True, gpas=True, hybrid_norm=True, gated_residual=True,
    dropout=0.1, attention_dropout=0.1,
)
CASES = {
    **{name: tiny(args) for name, args in FLAVORS.items()},
    "all_attention": tiny(NeoLLMModelArgs(layer_pattern="A", **ALL_ATTENTION)),
    "everything_hybrid": tiny(NeoLLMModelArgs(layer_pattern="DA", **EVERYTHING)),
    "gdn_only": tiny(NeoLLMModelArgs(layer_pattern="D")),
    "gelu_mlp": tiny(NeoLLMModelArgs(layer_pattern="DA", mlp_type="mlp", learnable_multipliers=True)),
    "moe": tiny(NeoLLMModelArgs(layer_pattern="DA", mlp_type="moe", moe_num_experts=4, moe_top_k=2)),
}


def perturbed(args: NeoLLMModelArgs, seed: int = 0) -> torch.nn.Module:
    """A float64 eval model whose zero/identity-initialised parts (affine logits, GPAS, gates,
    SeeDNorm beta, MEA mixing, ...) are moved off their init so every technique is active."""
    model = build(args, seed).double().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


@pytest.mark.parametrize("name", list(CASES))
def test_cached_decoding_matches_full_forward(name):
    args = CASES[name]
    model = perturbed(args)
    tokens = torch.randint(0, args.vocab_size, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens)
    cache = new_cache(model, 19)
    # prefill 5, a chunk of 3 at positions 5-7 (masked path), then 11 single-token steps
    parts = [forward_step(model, tokens[:, :5], cache), forward_step(model, tokens[:, 5:8], cache)]
    parts += [forward_step(model, tokens[:, t:t + 1], cache) for t in range(8, 19)]
    assert cache.pos == 19
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-9, atol=1e-10)


def test_long_prefill_crosses_gdn_chunks():
    """A prefill longer than the GDN chunk (64) carries the state across chunks, then decodes."""
    args = dataclasses.replace(CASES["neollm_110m_hybrid"], max_seq_len=96)
    model = perturbed(args)
    tokens = torch.randint(0, args.vocab_size, (1, 80), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(tokens)
    cache = new_cache(model)
    parts = [forward_step(model, tokens[:, :70], cache), forward_step(model, tokens[:, 70:76], cache)]
    parts += [forward_step(model, tokens[:, t:t + 1], cache) for t in range(76, 80)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-9, atol=1e-10)


def test_cache_limits_and_eval_mode():
    model = perturbed(CASES["debug"])
    cache = new_cache(model, 4)
    forward_step(model, torch.zeros(1, 4, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="max_len"):
        forward_step(model, torch.zeros(1, 1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        new_cache(model, model.model_args.max_seq_len + 1)
    model.train()
    with pytest.raises(ValueError, match="eval"):
        forward_step(model, torch.zeros(1, 1, dtype=torch.long), new_cache(model))


# ---- sampling -------------------------------------------------------------------------------
def test_filter_logits_top_k_top_p_penalty_min_length():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    finite = lambda cfg, **kw: torch.isfinite(filter_logits(logits, cfg, **kw)).sum().item()  # noqa: E731
    assert finite(SamplingConfig(top_k=3)) == 3
    assert finite(SamplingConfig(top_p=0.7)) == 2
    assert finite(SamplingConfig(top_p=0.81)) == 3
    assert finite(SamplingConfig(top_p=0.1)) == 1  # the most likely token always stays
    assert finite(SamplingConfig(top_k=3, top_p=0.6)) == 2
    cfg = SamplingConfig(eos_id=0, min_length=2)
    assert filter_logits(logits, cfg, n_generated=1)[0, 0] == float("-inf")
    assert torch.isfinite(filter_logits(logits, cfg, n_generated=2)[0, 0])
    pen = filter_logits(torch.tensor([[2.0, -2.0, 1.0]]), SamplingConfig(repetition_penalty=2.0),
                        seen=torch.tensor([[0, 1]]))
    torch.testing.assert_close(pen, torch.tensor([[1.0, -4.0, 1.0]]))


def test_samples_stay_inside_top_k_and_top_p():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 3
    gen = torch.Generator().manual_seed(1)
    top3 = logits.topk(3, dim=-1).indices
    ids = sample_next(logits, SamplingConfig(top_k=3, temperature=2.0), gen)
    assert (top3 == ids[:, None]).any(-1).all()
    probs = logits.softmax(-1)
    ids = sample_next(logits, SamplingConfig(top_p=0.5), gen)
    before = (probs * (probs > probs.gather(1, ids[:, None]))).sum(-1)  # mass of likelier tokens
    assert (before < 0.5).all()


@pytest.fixture(scope="module")
def small_model():
    return build(dataclasses.replace(CASES["debug"], max_seq_len=48)).eval()


def test_seed_determinism_and_top_k_one_is_greedy(small_model):
    prompts = [[1, 2, 3], [4, 5, 6]]
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.5, seed=7)
    first = generate(small_model, prompts, cfg)
    assert first == generate(small_model, prompts, cfg)
    assert first != generate(small_model, prompts, cfg, seed=8)
    assert all(len(row) == 10 for row in first)
    greedy = generate(small_model, prompts, max_new_tokens=10, temperature=0)
    assert generate(small_model, prompts, max_new_tokens=10, top_k=1, seed=3) == greedy
    # cached and uncached decoding pick the same tokens
    assert generate(small_model, prompts, max_new_tokens=10, temperature=0, use_cache=False) == greedy


def test_min_length_and_eos_stop(small_model):
    prompt = [[5, 6, 7]]
    eos = generate(small_model, prompt, max_new_tokens=1, temperature=0)[0][0]
    assert generate(small_model, prompt, max_new_tokens=8, temperature=0, eos_id=eos) == [[eos]]
    out = generate(small_model, prompt, max_new_tokens=8, temperature=0, eos_id=eos, min_length=3)[0]
    assert eos not in out[:3] and (len(out) == 8 or out[-1] == eos) and eos not in out[3:-1]
    sampled = generate(small_model, prompt * 4, max_new_tokens=6, temperature=5.0, seed=0,
                       eos_id=eos, min_length=6)
    assert all(eos not in row and len(row) == 6 for row in sampled)


def test_batched_prompts_of_different_lengths(small_model):
    prompts = [[1, 2, 3, 4, 5], [9, 8], [7, 7, 7, 7, 7], [3]]
    batched = generate(small_model, prompts, max_new_tokens=6, temperature=0)
    assert batched == [generate(small_model, [p], max_new_tokens=6, temperature=0)[0] for p in prompts]
    with pytest.raises(ValueError, match="context"):
        generate(small_model, [[1] * 40], max_new_tokens=9)


# ---- loading --------------------------------------------------------------------------------
def test_state_dict_file_roundtrip(tmp_path):
    args = CASES["neollm_110m_hybrid"]
    model = perturbed(args).float()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt", args)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="does not fit"):
        load_model(tmp_path / "model.pt", CASES["plain"])


def test_checkpoints_with_meas_older_affine_layout_still_load(tmp_path):
    """MEA's GroupNorm gains and biases were [Hkv, d] until they became flat [Hkv * d] vectors: a state-dict
    file or DCP checkpoint in the older layout loads (same values); any other shape change is still refused."""
    import torch.distributed.checkpoint as dcp

    args = dataclasses.replace(CASES["neollm_135m"], mea=True)
    model = perturbed(args).float()
    hkv, d = args.n_kv_heads, args.head_dim
    old = {k: v.view(hkv, d) if k.rsplit(".", 1)[-1].startswith("mea_") and not k.endswith("_mix") else v
           for k, v in model.state_dict().items()}
    assert sum(v.shape == (hkv, d) for v in old.values()) == 4 * args.n_layers
    torch.save(old, tmp_path / "old.pt")
    dcp.save({f"model.{k}": v.clone() for k, v in old.items()}, checkpoint_id=str(tmp_path / "step-1"))
    for source in (tmp_path / "old.pt", tmp_path / "step-1"):
        loaded = load_model(source, args)
        for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), (source.name, k)
    old["layers.0.mixer.mea_k_weight"] = old["layers.0.mixer.mea_k_weight"][:, :-1]  # not a reshape
    torch.save(old, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not fit.*mea_k_weight"):
        load_model(tmp_path / "bad.pt", args)


@pytest.mark.slow
def test_dcp_checkpoint_from_a_real_run(tmp_path, capsys):
    """One tiny trainer run (debug config, 1 step): load its DCP checkpoint, decode, run the CLI."""
    require_prepared_assets()
    dump = tmp_path / "run"
    result = run_trainer("--training.steps", "1", "--checkpoint.interval", "1",
                         "--job.dump_folder", str(dump))
    assert result.returncode == 0, result.stdout[-3000:]
    step = resolve_checkpoint(dump)
    assert step == dump / "checkpoint" / "step-1"
    assert checkpoint_shapes(step)["tok_embeddings.weight"][0] == FLAVORS["debug"].vocab_size

    model = load_model(dump, "debug", max_seq_len=128)
    fresh = build_model("debug", max_seq_len=128)
    import torch.distributed.checkpoint as dcp

    emb = {"tok_embeddings.weight": torch.empty_like(fresh.tok_embeddings.weight)}
    dcp.load(emb, checkpoint_id=str(step))
    assert torch.equal(model.tok_embeddings.weight, emb["tok_embeddings.weight"])
    assert not torch.equal(model.layers["0"].mixer.q_proj.weight, fresh.layers["0"].mixer.q_proj.weight)
    with pytest.raises(ValueError, match="does not fit"):
        load_checkpoint(build_model("debug", dim=64, n_heads=2, n_kv_heads=1), step)

    tokens = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
    cache = new_cache(model, 12)
    cached = torch.cat([forward_step(model, tokens[:, :4], cache)]
                       + [forward_step(model, tokens[:, t:t + 1], cache) for t in range(4, 12)], dim=1)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)

    cli = load_tool("generate")
    assert cli.main([
        "--checkpoint", str(dump), "--flavor", "debug", "--tokenizer", str(TOKENIZER_DIR),
        "--prompt", "The history of", "--prompt", "A", "--max-new-tokens", "5", "--temperature", "0.8",
        "--top-k", "20", "--top-p", "0.9", "--seed", "1", "--min-length", "2",
        "--repetition-penalty", "1.1", "--device", "cpu", "--max-seq-len", "128",
    ]) == 0
    out, err = capsys.readouterr()
    assert out.count("The history of") == 1 and "tokens/s" in err
