"""The fused q/k path op (neollm/kernels/qk_path.py): the reference against the attention's own path,
the hand-written backward against autograd, the op's registration and its place in a compiled graph,
the attention's switch, and the Triton kernels under the CPU interpreter (tests/qk_path_interpreted.py,
in a subprocess)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from conftest import GraphRecorder, fresh_python, run_interpreted

from neollm.errors import ConfigError
from neollm.kernels import qk_path as qp
from neollm.model import attention_ops as ops
from neollm.model.args import FLAVORS
from neollm.model.attention import Attention
from neollm.model.rope import rope_cache

D64 = torch.float64
EPS = 1e-6
MOMENTA = [(0.1, "zero"), (0.1, "repeat"), (0.0, "zero")]


def _attention(dtype=torch.float32, **changes) -> Attention:
    """neollm_135m's attention (SeeDNorm on q/k, zero-started momentum, MEA, LUCID, ...) at a small
    width, H 8 / Hkv 4, every parameter moved off its init (beta = 0 would hide the tanh term)."""
    args = dataclasses.replace(FLAVORS["neollm_135m"], dim=64, n_heads=8, n_kv_heads=4, head_dim=16,
                               max_seq_len=64, attention_dropout=0.0, **changes)
    assert args.seednorm_qk and not args.qkv_norm
    torch.manual_seed(0)
    att = Attention(args)
    with torch.no_grad():
        for p in att.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return att.to(dtype)


def _params(att: Attention, which: str):
    return tuple(getattr(att, f"{which}_seed_{name}") for name in ("gamma", "alpha", "beta"))


def _problem(shape, dtype=torch.float32, seed=0):
    """x (rows of different scales), fp32 gamma, alpha, beta away from init, the RoPE table, dy."""
    gen = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = (torch.randn(*shape, generator=gen) * torch.exp(torch.randn(*shape[:-1], 1, generator=gen))).to(dtype)
    gamma, alpha = 1 + 0.2 * torch.randn(2, d, generator=gen)
    beta = 0.3 * torch.randn(d, generator=gen)
    dy = torch.randn(*shape, generator=gen).to(dtype)
    return x, gamma, alpha, beta, rope_cache(d, 64, 10_000.0), dy


@pytest.mark.parametrize("momentum_gamma, momentum_first", MOMENTA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_attentions_path_bit_for_bit(dtype, momentum_gamma, momentum_first, monkeypatch):
    """The q and k that SDPA receives on the default path equal the reference's on the same
    projections, and so do their gradients to the projection and SeeDNorm parameters."""
    att = _attention(dtype, momentum_gamma=momentum_gamma, momentum_first=momentum_first)
    x = torch.randn(2, 11, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    rope = rope_cache(16, 64, 10_000.0)
    seen = []
    attend = ops.causal_attention
    monkeypatch.setattr(ops, "causal_attention", lambda q, k, *a: seen.append((q, k)) or attend(q, k, *a))
    att(x, rope)
    (q_model, k_model), = seen
    q_raw, k_raw, _ = att.qkv(x, norm_qk=False)
    for raw, model, which in ((q_raw, q_model, "q"), (k_raw, k_model, "k")):
        ref = qp.qk_path_reference(raw, *_params(att, which), rope, att.eps, momentum_gamma, momentum_first)
        assert ref.dtype == dtype and torch.equal(ref, model.transpose(1, 2))
        leaves = [*_params(att, which), *getattr(att, f"w{which}").parameters()]
        dy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        want = torch.autograd.grad(model.transpose(1, 2), leaves, dy, retain_graph=True)
        for a, b in zip(torch.autograd.grad(ref, leaves, dy), want):
            assert torch.equal(a, b)


@pytest.mark.parametrize("seq_len", [1, 9])
@pytest.mark.parametrize("momentum_gamma, momentum_first", MOMENTA)
def test_backward_reference_matches_autograd_fp64(momentum_gamma, momentum_first, seq_len):
    """The backward the kernel implements, in its PyTorch form, against autograd through the reference
    in fp64: x, gamma, alpha, beta, including t = 0 (and T = 1, where t = 0 is also the last token)."""
    x, gamma, alpha, beta, rope, dy = (t.double() for t in _problem((2, seq_len, 3, 16), seed=2))
    out, stats = qp.forward_reference(x, gamma, alpha, beta, rope, EPS, momentum_gamma, momentum_first)
    assert stats.shape == (2 * seq_len * 3, qp.N_STATS) and stats.dtype == D64
    leaves = [t.clone().requires_grad_() for t in (x, gamma, alpha, beta)]
    ref = qp.qk_path_reference(*leaves, rope, EPS, momentum_gamma, momentum_first)
    torch.testing.assert_close(out, ref.detach(), rtol=0, atol=0)
    want = torch.autograd.grad(ref, leaves, dy)
    dx, dparams = qp.backward_reference(x, gamma, alpha, beta, rope, stats, dy, momentum_gamma, momentum_first)
    assert all(w.abs().max() > 1e-3 for w in want)
    for a, b in zip((dx, *dparams), want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dx[:, 0], want[0][:, 0], rtol=1e-10, atol=1e-12)  # the boundary row alone


@pytest.mark.parametrize("momentum_gamma, momentum_first", MOMENTA)
@pytest.mark.parametrize("dtype", [D64, torch.float32, torch.bfloat16])
def test_op_passes_opcheck(dtype, momentum_gamma, momentum_first):
    """torch.library.opcheck on the op (reference implementation): schema, fake tensors, autograd
    registration and AOT dispatch."""
    x, gamma, alpha, beta, rope, _ = _problem((2, 5, 3, 16), dtype, seed=3)
    args = [t.requires_grad_() for t in (x, gamma, alpha, beta)]
    torch.library.opcheck(qp.qk_path_op, (*args, rope, EPS, momentum_gamma, momentum_first, False))


def test_op_fake_gives_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 7, 3, 16, dtype=torch.bfloat16)
        p, rope = torch.empty(16), torch.empty(64, 16)
        out, stats = qp.qk_path_op(x, p, p, p, rope, EPS, 0.1, "zero", True)
        dx, dp = qp.qk_path_backward(x, p, p, p, rope, stats, out, 0.1, "zero", True)
    assert (out.shape, out.dtype) == ((4, 7, 3, 16), torch.bfloat16)
    assert (stats.shape, stats.dtype) == ((84, qp.N_STATS), torch.float32)
    assert (dx.shape, dx.dtype) == ((4, 7, 3, 16), torch.bfloat16)
    assert (dp.shape, dp.dtype) == ((qp.N_PARAM_GRADS, 16), torch.float32)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_op_compiles_to_one_graph(backend):
    """A function calling the op (reference path) under fullgraph compile: one graph holding the op,
    and the eager values and gradients."""
    torch._dynamo.reset()
    x, gamma, alpha, beta, rope, _ = _problem((2, 9, 3, 16), seed=4)
    leaves = [t.requires_grad_() for t in (x, gamma, alpha, beta)]
    recording = GraphRecorder(backend)

    def fn(x, gamma, alpha, beta):
        return qp.qk_path_op(x, gamma, alpha, beta, rope, EPS, 0.1, "zero", False)[0] * 2

    out = torch.compile(fn, backend=recording, fullgraph=True)(*leaves)
    got = torch.autograd.grad(out.square().sum(), leaves)
    assert len(recording.graphs) == 1 and torch.ops.neollm.qk_path.default in recording.targets()
    out_e = fn(*leaves)
    want = torch.autograd.grad(out_e.square().sum(), leaves)
    torch.testing.assert_close(out, out_e, rtol=1e-6, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture
def kernels_as_reference(monkeypatch):
    """The switch resolving to the kernels on the CPU, with the op's references in their place."""
    monkeypatch.setattr(qp, "uses_kernel", lambda impl, x: True)
    monkeypatch.setattr(qp, "_require_kernel", lambda x: None)
    monkeypatch.setattr(qp, "forward_kernel", qp.forward_reference)
    monkeypatch.setattr(qp, "backward_kernel", qp.backward_reference)


def test_attention_takes_the_op_in_one_compiled_graph(kernels_as_reference):
    """With the switch on, neollm_135m's attention compiled with fullgraph holds the op twice (q, k) and
    gives the uncompiled module's output and gradients; the unfused path's output within rounding."""
    torch._dynamo.reset()
    att = _attention()
    x = torch.randn(2, 11, 64, generator=torch.Generator().manual_seed(5))
    rope = rope_cache(16, 64, 10_000.0)
    recording = GraphRecorder("aot_eager")
    out = torch.compile(att, backend=recording, fullgraph=True)(x, rope)
    grads = torch.autograd.grad(out.square().sum(), list(att.parameters()))
    assert len(recording.graphs) == 1 and recording.targets().count(torch.ops.neollm.qk_path.default) == 2
    out_e = att(x, rope)
    grads_e = torch.autograd.grad(out_e.square().sum(), list(att.parameters()))
    torch.testing.assert_close(out, out_e, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_attention_with_the_switch_unset_runs_the_unfused_path():
    """The default ("auto") takes the op only on CUDA: on the CPU the attention is the unfused path."""
    assert qp.QK_PATH_IMPL == os.environ.get("NEOLLM_QK_PATH_IMPL", "auto")
    if "NEOLLM_QK_PATH_IMPL" not in os.environ:
        assert qp.QK_PATH_IMPL == "auto"
        assert not _attention().fuses_qk(torch.randn(1, 2, 64))


def test_impl_switch_is_validated_and_decoding_stays_unfused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 3, 4, 16)
    with pytest.raises(ConfigError, match="must be one of"):
        qp.uses_kernel("cuda", x)
    with pytest.raises(ConfigError, match="'triton' cannot run: .*not CUDA"):
        qp.uses_kernel("triton", x)
    assert not qp.uses_kernel("auto", x) and not qp.uses_kernel("torch", x)
    assert not qp.uses_kernel("auto", x.double())
    p = torch.ones(16)
    with pytest.raises(RuntimeError, match="Triton kernel cannot run here"):  # the op itself refuses too
        qp.qk_path_op(x, p, p, p, rope_cache(16, 8, 10_000.0), EPS, 0.1, "zero", True)
    att = _attention()
    rope = rope_cache(16, 64, 10_000.0)
    monkeypatch.setattr(qp, "QK_PATH_IMPL", "triton")
    with pytest.raises(ConfigError, match="'triton' cannot run"):  # forward asks for the kernels
        att(torch.randn(1, 4, 64), rope)
    state = att.new_state(1, 8, torch.float32, "cpu")
    att.step(torch.randn(1, 4, 64), state, 0, rope)  # decoding: the unfused steps, the switch not consulted
    monkeypatch.setattr(att, "seednorm_qk", False)
    assert not att.fuses_qk(torch.randn(1, 4, 64))  # without SeeDNorm on q/k the switch is not consulted


def test_impl_default_comes_from_the_environment():
    """NEOLLM_QK_PATH_IMPL sets the default for a whole run (read at import, in a fresh process)."""
    code = "from neollm.kernels import qk_path as q; print(q.QK_PATH_IMPL)"
    assert fresh_python(code, NEOLLM_QK_PATH_IMPL="auto").strip() == "auto"


def test_triton_kernels_under_the_interpreter():
    """The kernels on the CPU (TRITON_INTERPRET=1): values and gradients against the reference in fp32
    and within the reference's own error against fp64 in fp32 / bf16 / fp16, several shapes (T not a
    multiple of the token block, H 8 / Hkv 4, d 64 and 16), both momentum starts and none; the saved
    statistics; neollm_135m's attention with the kernels, eager and compiled; opcheck with the
    kernels; injected errors fail the same checks."""
    import importlib

    importlib.import_module("triton")  # required: a broken install fails here, not skips

    run_interpreted("qk_path_interpreted.py", timeout=600)
