"""[compile] mode and scope (neollm.parallelize.compile_model_for_training), on the CPU."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from neollm.model.args import FLAVORS
from neollm.model.model import NeoLLM

ARGS = dataclasses.replace(FLAVORS["neollm_135m"], dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                           head_dim=16, ffn_hidden_dim=96, vocab_size=128, max_seq_len=32,
                           attention_dropout=0.0, dropout=0.0)


def _loss_and_grads(compile_config=None):
    from neollm.parallelize import compile_model_for_training

    torch.manual_seed(0)
    model = NeoLLM(ARGS)
    model.init_weights()
    model.double()
    if compile_config is not None:
        compile_model_for_training(model, compile_config)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    loss = model(tokens, tokens)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_whole_model_compile_matches_eager_and_keeps_parameter_names():
    torch._dynamo.reset()
    loss_ref, grads_ref = _loss_and_grads()
    loss, grads = _loss_and_grads(SimpleNamespace(backend="aot_eager", mode="default", scope="model"))
    torch.testing.assert_close(loss, loss_ref, rtol=1e-11, atol=0)
    assert grads.keys() == grads_ref.keys() and len(grads) > 20  # no "_orig_mod." in the names
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("scope", ["blocks", "model"])
@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune-no-cudagraphs"])
def test_mode_and_scope_reach_torch_compile(monkeypatch, scope, mode):
    from neollm.parallelize import compile_model_for_training

    calls = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: calls.append(kw) or module)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append(kw))
    model = NeoLLM(dataclasses.replace(ARGS, n_layers=3))
    compile_model_for_training(model, SimpleNamespace(backend="inductor", mode=mode, scope=scope))
    assert len(calls) == (3 if scope == "blocks" else 1)
    assert all(kw["mode"] == mode and kw["backend"] == "inductor" for kw in calls)


def test_bad_settings_are_refused():
    from neollm.errors import ConfigError
    from neollm.parallelize import compile_settings

    assert compile_settings(SimpleNamespace(mode="default", scope="blocks")) == (None, "blocks")
    with pytest.raises(ConfigError, match="mode 'fast' is unknown"):
        compile_settings(SimpleNamespace(mode="fast", scope="blocks"))
    with pytest.raises(ConfigError, match="needs the model unsharded"):
        compile_settings(SimpleNamespace(mode="default", scope="model"), fsdp=True)


def test_preflight_refuses_whole_model_compile_with_fsdp(monkeypatch, capsys):
    from conftest import REPO, require_prepared_assets

    from neollm import preflight

    require_prepared_assets()
    monkeypatch.chdir(REPO)
    args = ["--job.config_file", "train_configs/debug.toml", "--compile.enable", "--compile.scope", "model"]
    assert preflight.main(["--world-size", "2", *args]) == 2
    assert "needs the model unsharded" in capsys.readouterr().err
    assert preflight.main(["--world-size", "1", *args, "--compile.mode", "reduce-overhead"]) == 0


@pytest.mark.parametrize("flavor, graphs", [("neollm_135m", 1), ("neollm_110m_hybrid", 2), ("plain", 1)])
def test_blocks_of_one_kind_share_one_compiled_graph(flavor, graphs):
    """Per-block compile traces one graph per kind of block (attention; Gated DeltaNet), not one per
    layer: the first step's compile time depends on it. LNS's per-layer constant used to give layer 0 a
    graph of its own (a Python float that dynamo guarded on)."""
    from torch._dynamo.utils import counters

    from neollm.parallelize import compile_blocks

    args = dataclasses.replace(FLAVORS[flavor], dim=64, n_heads=4, n_kv_heads=2, head_dim=16,
                               ffn_hidden_dim=96, vocab_size=128, max_seq_len=32)
    assert args.n_layers == 12
    torch._dynamo.reset()
    counters.clear()
    model = NeoLLM(args)
    model.init_weights()
    compile_blocks(model, "eager")
    tokens = torch.randint(0, args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    model(tokens, tokens).backward()
    assert counters["stats"]["unique_graphs"] == graphs


def test_gradients_zeroed_in_place_accumulate_like_fresh_ones():
    """neollm.train.zero_grads_in_place (the trainer's zeroing under CUDA graphs): gradients are created
    once as zeros and then zeroed in place, never replaced, so autograd accumulates into tensors the
    parameters own; two micro-batches give the same gradients as with set_to_none zeroing."""
    from neollm.train import zero_grads_in_place

    torch.manual_seed(0)
    model = NeoLLM(ARGS)
    model.init_weights()
    model.double()
    frozen = model.tok_embeddings.weight
    batches = [torch.randint(0, ARGS.vocab_size, (2, 32), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]

    def step():
        for tokens in batches:
            model(tokens, tokens).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad(set_to_none=True)
    reference = step()
    zero_grads_in_place(model.parameters())
    owned = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and not g.any() for g in owned.values())
    first = step()
    zero_grads_in_place(model.parameters())
    second = step()
    for name, grad in reference.items():
        torch.testing.assert_close(first[name], grad, rtol=1e-12, atol=1e-14, msg=name)
        torch.testing.assert_close(second[name], grad, rtol=1e-12, atol=1e-14, msg=name)
        assert dict(model.named_parameters())[name].grad is owned[name], name  # never replaced
    frozen.requires_grad_(False)
    frozen.grad = None
    zero_grads_in_place(model.parameters())
    assert frozen.grad is None  # frozen parameters get no gradient


def test_foreach_accumulation_equals_autograd_accumulation():
    """neollm.train.accumulate_grads (the one-process trainer's micro-batch sum): gradients from
    autograd.grad added by one foreach add equal autograd's own accumulation over two micro-batches,
    both from dropped and from in-place-zeroed gradients; a parameter the loss does not reach keeps
    no gradient, and in-place gradients stay the tensors the parameters own."""
    from neollm.train import accumulate_grads, zero_grads_in_place

    torch.manual_seed(0)
    model = NeoLLM(ARGS)
    model.init_weights()
    model.double()
    unused = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    model.register_parameter("unused", unused)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = [torch.randint(0, ARGS.vocab_size, (2, 32), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]

    model.zero_grad(set_to_none=True)
    for tokens in batches:
        model(tokens, tokens).backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert "unused" not in reference

    for zero in ("drop", "in place"):
        if zero == "drop":
            model.zero_grad(set_to_none=True)
        else:
            zero_grads_in_place(params)
        owned = {n: p.grad for n, p in model.named_parameters()}
        for tokens in batches:
            accumulate_grads(params, torch.autograd.grad(model(tokens, tokens), params, allow_unused=True))
        got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert set(got) == set(reference) | ({"unused"} if zero == "in place" else set()), zero
        for name, grad in reference.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-12, atol=1e-14, msg=f"{zero}: {name}")
            if zero == "in place":
                assert got[name] is owned[name], name
        if zero == "in place":
            assert not unused.grad.any()


def test_foreach_accumulation_copies_a_first_gradient_laid_out_unlike_its_parameter():
    """The gradient of ``p.sum()`` is an expanded view (stride 0): taken as ``.grad`` it could not be
    added into in place, so accumulate_grads copies it, as autograd's accumulation does."""
    from neollm.train import accumulate_grads, same_layout

    p = torch.nn.Parameter(torch.ones(3, 4))
    for _ in range(2):
        accumulate_grads([p], torch.autograd.grad(p.sum(), [p]))
    assert p.grad.stride() == p.stride()
    assert torch.equal(p.grad, torch.full((3, 4), 2.0))
    # strides of length-1 dimensions do not count; a transposed layout does
    assert same_layout(torch.empty(4, 1).t(), torch.empty(1, 4))
    assert not same_layout(torch.empty(4, 3).t(), torch.empty(3, 4))
