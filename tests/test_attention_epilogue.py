"""The attention epilogue op (neollm/kernels/attention_epilogue.py): the hand-written backward against
autograd, the op's registration and its place in a compiled graph, the switch, and the Triton kernels
under the CPU interpreter (tests/attention_epilogue_interpreted.py, in a subprocess). The reference's
formulas are checked against independent per-head loops in tests/test_attention_techniques.py."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import GraphRecorder, fresh_python, run_interpreted

from neollm.errors import ConfigError
from neollm.kernels import attention_epilogue as ep
from neollm.model.args import FLAVORS
from neollm.model.attention import Attention
from neollm.model.rope import rope_cache

D64 = torch.float64
EPS = 1e-6


def _inputs(gate: str, dtype=D64, seed: int = 0, b=2, t=5, h=4, hkv=2, d=16, k=3):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(b, t, h, d, generator=gen, dtype=dtype)
    v = torch.randn(b, t, hkv, d, generator=gen, dtype=dtype)
    v[0, 1] *= 1e-4  # a tiny value: XSA's eps matters
    u = F.normalize(torch.randn(h, k, d, generator=gen, dtype=dtype), dim=-1)
    z = torch.randn(b, t, h, k, generator=gen, dtype=dtype) * 2
    g = {"elementwise": torch.randn(b, t, h, d, generator=gen, dtype=dtype),
         "headwise": torch.randn(b, t, h, generator=gen, dtype=dtype), "none": None}[gate]
    return y, v, u, z, g


@pytest.mark.parametrize("gate, steps", [(gate, steps) for gate in ("elementwise", "headwise", "none")
                                         for steps in (("xsa", "routing"), ("xsa",), ("routing",), ())
                                         if steps or gate != "none"])  # (none, none): the identity
def test_backward_reference_matches_autograd_fp64(gate, steps):
    """The backward the kernel implements, in its PyTorch form, against autograd through the reference."""
    y, v, u, z, g = _inputs(gate)
    v, u, z = (v if "xsa" in steps else None), (u if "routing" in steps else None), (z if "routing" in steps else None)
    leaves = [x.requires_grad_() for x in (y, v, u, z, g) if x is not None]
    out = ep.epilogue_reference(y, v, u, z, g, EPS)
    dout = torch.randn_like(out)
    want = torch.autograd.grad(out, leaves, dout)
    got = [x for x in ep.backward_reference(y.detach(), *(None if x is None else x.detach() for x in (v, u, z, g)),
                                            dout, EPS) if x is not None]
    assert len(got) == len(want) and all(w.abs().max() > 1e-3 for w in want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gate", ["elementwise", "headwise"])
@pytest.mark.parametrize("dtype", [D64, torch.float32, torch.bfloat16])
def test_op_passes_opcheck(dtype, gate):
    """torch.library.opcheck on the op (reference implementation): schema, fake tensors, autograd
    registration and AOT dispatch."""
    y, v, u, z, g = _inputs(gate, dtype)
    args = [x.requires_grad_() for x in (y, v, u.float(), z.float(), g)]
    torch.library.opcheck(ep.epilogue_op, (*args, EPS, False))


def test_op_fake_gives_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y, g = torch.empty(2, 3, 8, 64, dtype=torch.bfloat16), torch.empty(2, 3, 8, 64, dtype=torch.bfloat16)
        v = torch.empty(2, 3, 4, 64, dtype=torch.bfloat16)
        u, z = torch.empty(8, 4, 64), torch.empty(2, 3, 8, 4)
        out = ep.epilogue_op(y, v, u, z, g, EPS, True)
        dy, dv, du, dz, dg = ep.epilogue_backward(y, v, u, z, g, out, EPS, True)
        (dy_only,) = ep.epilogue_backward(y, None, None, None, None, out, EPS, True)
    assert (out.shape, out.dtype) == ((2, 3, 8, 64), torch.bfloat16)
    assert (dy.dtype, dv.shape, dv.dtype, dg.dtype) == (torch.bfloat16, (2, 3, 4, 64), torch.bfloat16, torch.bfloat16)
    assert (du.shape, du.dtype, dz.shape, dz.dtype) == ((8, 4, 64), torch.float32, (2, 3, 8, 4), torch.float32)
    assert dy_only.shape == (2, 3, 8, 64)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_op_compiles_to_one_graph(backend):
    """A function calling the op (reference path) under fullgraph compile: one graph holding the op,
    and the eager values and gradients."""
    torch._dynamo.reset()
    recording = GraphRecorder(backend)

    def fn(y, v, u, z, g):
        return ep.epilogue_op(y, v, F.normalize(u, dim=-1), z, g, EPS, False) * 2

    leaves = [x.float().requires_grad_() for x in _inputs("elementwise", seed=2)]
    out = torch.compile(fn, backend=recording, fullgraph=True)(*leaves)
    got = torch.autograd.grad(out.square().sum(), leaves)
    assert len(recording.graphs) == 1
    targets = set(recording.targets())
    assert torch.ops.neollm.attention_epilogue.default in targets
    out_e = fn(*leaves)
    want = torch.autograd.grad(out_e.square().sum(), leaves)
    torch.testing.assert_close(out, out_e, rtol=1e-6, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _attention() -> tuple[Attention, torch.Tensor, torch.Tensor]:
    args = dataclasses.replace(FLAVORS["neollm_135m"], dim=64, n_heads=4, n_kv_heads=2, head_dim=16)
    assert args.xsa and args.directional_routing and args.attention_output_gate == "elementwise"
    torch.manual_seed(0)
    return Attention(args), torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(3)), rope_cache(16, 7, 1e4)


def test_attention_through_the_op_equals_the_default_path(monkeypatch):
    """neollm_135m's attention with the op (its reference implementation, as the kernels would be
    called) against the default unfused path: values and every parameter gradient, fp64."""
    attn, x, rope = _attention()
    attn = attn.double()
    x = x.double()

    def run():
        attn.zero_grad()
        out = attn(x, rope)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in attn.parameters()]

    want, want_grads = run()
    used = []
    monkeypatch.setattr(ep, "uses_kernel", lambda impl, *tensors: used.append(1) or True)
    monkeypatch.setattr(ep, "_require_kernel", lambda *tensors: None)
    monkeypatch.setattr(ep, "forward_kernel", ep.epilogue_reference)
    monkeypatch.setattr(ep, "backward_kernel", ep.backward_reference)
    got, got_grads = run()
    assert used
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_impl_switch_is_validated(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    y, v, u, z, g = _inputs("elementwise", torch.float32)
    with pytest.raises(ConfigError, match="must be one of"):
        ep.uses_kernel("cuda", y, v)
    with pytest.raises(ConfigError, match="'triton' cannot run: .*not CUDA"):
        ep.uses_kernel("triton", y, v)
    assert not ep.uses_kernel("auto", y, v) and not ep.uses_kernel("torch", y, v)
    assert not ep.uses_kernel("auto", y.double(), v.double())
    with pytest.raises(RuntimeError, match="Triton kernel cannot run here"):  # the op itself refuses too
        ep.epilogue_op(y, v, u, z, g, EPS, True)
    attn, x, rope = _attention()
    monkeypatch.setattr(ep, "EPILOGUE_IMPL", "triton")
    with pytest.raises(ConfigError, match="'triton' cannot run"):
        attn(x, rope)
    monkeypatch.setattr(ep, "EPILOGUE_IMPL", "auto")
    attn(x, rope)  # auto on the CPU: the unfused path
    assert ep.EPILOGUE_IMPL == "auto" and os.environ.get("NEOLLM_EPILOGUE_IMPL", "auto") in ep.EPILOGUE_IMPLS


def test_impl_default_is_auto_and_comes_from_the_environment():
    """"auto" unless NEOLLM_EPILOGUE_IMPL says otherwise (read at import; a fresh process)."""
    if "NEOLLM_EPILOGUE_IMPL" not in os.environ:
        assert ep.EPILOGUE_IMPL == "auto"
    code = "from neollm.kernels import attention_epilogue as e; print(e.EPILOGUE_IMPL)"
    assert fresh_python(code, NEOLLM_EPILOGUE_IMPL="torch").strip() == "torch"


def test_triton_kernels_under_the_interpreter():
    """The kernels on the CPU (TRITON_INTERPRET=1): values and gradients against the reference in
    fp32 and within the reference's own error against fp64 in fp32 / bf16 / fp16, with and without
    GQA, every gate kind, each step alone, d 16 / 24 / 64 and token counts off the block size;
    neollm_135m's attention with the kernels; opcheck with the kernels; injected errors fail."""
    import importlib

    importlib.import_module("triton")  # required: a broken install fails here, not skips

    run_interpreted("attention_epilogue_interpreted.py", timeout=600)
