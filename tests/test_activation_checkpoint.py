"""Activation checkpointing (``[activation_checkpoint] mode``) on NeoLLM blocks, eager and compiled.

torchtitan's ``apply_ac`` wraps each block; NeoLLM's LUCID runs its solve as a custom op with its
own backward (neollm/kernels/lucid.py; here its PyTorch reference, fp64 on the CPU), which the
checkpoints save or recompute like any other op. Every mode must give the loss and the gradients of the run without checkpointing. In
fp64: in fp32 this stack of techniques amplifies rounding, so compiled and eager gradients already
differ by ~0.5% of their largest entry (fp64: 5e-12).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torchtitan.config import ActivationCheckpoint

from neollm.model.args import FLAVORS
from neollm.model.model import NeoLLM
from neollm.parallelize import checkpoint_blocks, compile_blocks

ARGS = dataclasses.replace(FLAVORS["neollm_135m"], dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                           head_dim=16, ffn_hidden_dim=96, vocab_size=128, max_seq_len=32,
                           attention_dropout=0.0, dropout=0.0)
MODES = {
    "full": ActivationCheckpoint(mode="full"),
    "selective layer": ActivationCheckpoint(mode="selective", selective_ac_option="1"),
    "selective op": ActivationCheckpoint(mode="selective", selective_ac_option="op"),
}


def _loss_and_grads(ac: ActivationCheckpoint | None, compiled: bool):
    torch.manual_seed(0)
    model = NeoLLM(ARGS)
    model.init_weights()
    model.double()
    if ac is not None:
        checkpoint_blocks(model, ac, compiled)  # as the trainer applies it, NeoLLM's save list included
        assert any("_checkpoint_wrapped_module" in name for name, _ in model.named_modules())
    if compiled:
        compile_blocks(model, "inductor")
    tokens = torch.randint(0, ARGS.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    loss = model(tokens, tokens)
    loss.backward()
    clean = lambda n: n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")  # noqa: E731
    return loss.detach(), {clean(n): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def eager_reference():
    """Loss and gradients without checkpointing and without the compiler."""
    return _loss_and_grads(None, False)


@pytest.mark.parametrize(
    "mode, compiled",
    # every mode eager and compiled, but for (none, eager): that is the reference itself
    [(mode, compiled) for compiled in (False, True) for mode in ("none", *MODES) if mode != "none" or compiled],
    ids=lambda value: {False: "eager", True: "compiled"}.get(value, value) if isinstance(value, bool) else value,
)
def test_activation_checkpoint_modes_match_eager_without_checkpointing(mode, compiled, eager_reference):
    """Every mode, eager or compiled, against the eager run without checkpointing (so a compile
    problem that checkpointing shares is caught too)."""
    assert ARGS.lucid and ARGS.mea and ARGS.simplegpt  # seed 001's techniques, LUCID's custom op
    loss_ref, grads_ref = eager_reference
    torch._dynamo.reset()
    loss, grads = _loss_and_grads(MODES.get(mode), compiled)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-11, atol=0)
    assert grads.keys() == grads_ref.keys() and len(grads) > 20
    for name, grad in grads.items():
        scale = grads_ref[name].abs().max().item()
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-8, atol=1e-9 * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("mode, solves", [("selective op", 2), ("full", 4)])
def test_selective_op_checkpointing_keeps_lucid_solves_output(mode, solves, monkeypatch):
    """Selective-op AC saves LUCID's solve (on NeoLLM's save list): one solve per layer per step, as
    without checkpointing; full AC recomputes it in backward (two per layer), which shows the count
    sees a recompute."""
    from neollm.kernels import lucid

    calls = []
    solve = lucid.solve_reference
    monkeypatch.setattr(lucid, "solve_reference", lambda kr, v: calls.append(1) or solve(kr, v))
    _loss_and_grads(MODES[mode], compiled=False)
    assert len(calls) == solves == 2 * ARGS.n_layers // (2 if mode == "selective op" else 1)


@pytest.mark.parametrize("mode, passes", [("selective op", 2), ("full", 4)])
def test_selective_op_checkpointing_keeps_the_fused_polynorm_output(mode, passes, monkeypatch):
    """Selective-op AC saves the fused PolyNorm GLU op's output (on NeoLLM's save list): one forward
    pass per layer per step, as without checkpointing; full AC reruns it in backward (two per layer).
    The op runs here with its PyTorch reference in place of the Triton kernels (CPU)."""
    from neollm.kernels import polynorm_glu

    calls = []
    forward = polynorm_glu.forward_reference
    monkeypatch.setattr(polynorm_glu, "uses_kernel", lambda impl, g, u: True)
    monkeypatch.setattr(polynorm_glu, "_require_kernel", lambda g, u: None)
    monkeypatch.setattr(polynorm_glu, "forward_kernel", lambda *a: calls.append(1) or forward(*a))
    monkeypatch.setattr(polynorm_glu, "backward_kernel", polynorm_glu.backward_reference)
    _loss_and_grads(MODES[mode], compiled=False)
    assert ARGS.mlp_type == "polynorm"
    assert len(calls) == passes == 2 * ARGS.n_layers // (2 if mode == "selective op" else 1)


@pytest.mark.parametrize("mode, passes", [("selective op", 2), ("full", 4)])
def test_selective_op_checkpointing_keeps_the_fused_epilogue_output(mode, passes, monkeypatch):
    """The same for the fused attention epilogue (XSA, routing, gate): one forward pass per layer per
    step under selective-op AC, two under full AC. The op runs its PyTorch reference in place of the
    Triton kernels (CPU)."""
    from neollm.kernels import attention_epilogue as ep

    calls = []
    forward = ep.epilogue_reference
    monkeypatch.setattr(ep, "uses_kernel", lambda impl, *tensors: True)
    monkeypatch.setattr(ep, "_require_kernel", lambda *tensors: None)
    monkeypatch.setattr(ep, "forward_kernel", lambda *a: calls.append(1) or forward(*a))
    monkeypatch.setattr(ep, "backward_kernel", ep.backward_reference)
    _loss_and_grads(MODES[mode], compiled=False)
    assert ARGS.xsa and ARGS.directional_routing and ARGS.attention_output_gate != "none"
    assert len(calls) == passes == 2 * ARGS.n_layers // (2 if mode == "selective op" else 1)


@pytest.mark.parametrize("mode, passes", [("selective op", 4), ("full", 8)])
def test_selective_op_checkpointing_keeps_the_fused_qk_path_output(mode, passes, monkeypatch):
    """Selective-op AC saves the fused q/k path op's output (on NeoLLM's save list): one forward pass
    for q and one for k per layer per step, as without checkpointing; full AC reruns them in backward.
    The op runs here with its PyTorch reference in place of the Triton kernels (CPU)."""
    from neollm.kernels import qk_path

    calls = []
    forward = qk_path.forward_reference
    monkeypatch.setattr(qk_path, "uses_kernel", lambda impl, x: True)
    monkeypatch.setattr(qk_path, "_require_kernel", lambda x: None)
    monkeypatch.setattr(qk_path, "forward_kernel", lambda *a: calls.append(1) or forward(*a))
    monkeypatch.setattr(qk_path, "backward_kernel", qk_path.backward_reference)
    _loss_and_grads(MODES[mode], compiled=False)
    assert ARGS.seednorm_qk and ARGS.momentum_gamma > 0
    assert len(calls) == passes == 4 * ARGS.n_layers // (2 if mode == "selective op" else 1)
