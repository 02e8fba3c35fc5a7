"""LUCID's solve op (neollm/kernels/lucid.py): the reference's hand-written backward, the op's
registration, its place in a compiled attention graph, the implementation switch, and the Triton
kernels under the CPU interpreter (tests/lucid_kernel_interpreted.py, in a subprocess)."""

from __future__ import annotations

import dataclasses
import math
import os
import warnings

import pytest
import torch
from conftest import GraphRecorder, fresh_python, run_interpreted

from neollm.errors import ConfigError
from neollm.kernels import lucid
from neollm.model import attention_ops as ops
from neollm.model.args import FLAVORS
from neollm.model.attention import Attention
from neollm.model.rope import rope_cache


def _keys_values(b=2, h=3, t=37, d=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, 1, d, generator=g, dtype=dtype) + 0.3 * torch.randn(b, h, t, d, generator=g, dtype=dtype)
    v = torch.randn(b, h, t, d, generator=g, dtype=dtype)
    return ops.rms_normalize(k, 1e-6), v


def test_reference_backward_matches_autograd_through_the_inverse():
    """The backward the kernels implement (dV = P^-T dX, dS = -(dV X^T) * P strictly lower,
    dkr = (dS + dS^T) kr / sqrt(d)), in its PyTorch form, against autograd through an explicit
    inverse of the unit-lower P, fp64."""
    kr, v = _keys_values()
    kr, v = kr.detach().requires_grad_(), v.requires_grad_()
    t = kr.shape[-2]
    p = torch.exp(kr @ kr.mT / math.sqrt(kr.shape[-1]) - math.sqrt(kr.shape[-1])).tril(-1) + torch.eye(t, dtype=kr.dtype)
    x = torch.linalg.inv(p) @ v
    dx = torch.randn_like(x)
    want_k, want_v = torch.autograd.grad(x, (kr, v), dx)
    torch.testing.assert_close(lucid.solve_reference(kr.detach(), v.detach()), x.detach(), rtol=1e-10, atol=1e-12)
    dk, dv = lucid.solve_backward_reference(kr.detach(), x.detach(), dx)
    assert want_k.abs().max() > 1e-3
    torch.testing.assert_close(dv, want_v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dk, want_k, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_op_passes_opcheck(dtype):
    """torch.library.opcheck on the op (reference implementation): schema, fake tensors, autograd
    registration and AOT dispatch."""
    kr, v = _keys_values(dtype=dtype)
    torch.library.opcheck(lucid.lucid_solve_op, (kr.requires_grad_(), v.requires_grad_(), False, lucid.BLOCK_ROWS,
                                                 lucid.DIAGONAL, lucid.DOT_PRECISION))


def test_op_saves_the_keys_the_solution_and_the_inverses_only():
    """The keys, X and the diagonal inverses (none for the reference): P is never kept."""
    kr, v = _keys_values()
    kr, v = kr.detach().requires_grad_(), v.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        lucid.lucid_solve(kr, v, False)
    assert saved == [tuple(kr.shape), tuple(v.shape), (0,)]


def _lucid_attention() -> Attention:
    args = dataclasses.replace(FLAVORS["neollm_135m"], dim=32, n_heads=4, n_kv_heads=2, head_dim=16,
                               ffn_hidden_dim=48, vocab_size=61, max_seq_len=32, attention_dropout=0.0)
    assert args.lucid
    torch.manual_seed(0)
    return Attention(args)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_attention_with_lucid_compiles_to_one_graph_holding_the_op(backend):
    """neollm_135m's attention (LUCID and the other techniques on) under fullgraph compile: one
    graph, with the op in it, and the eager values and gradients."""
    torch._dynamo.reset()
    att = _lucid_attention()
    x = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(1))
    cache = rope_cache(16, 32, 10_000.0)
    recording = GraphRecorder(backend)

    out = torch.compile(att, backend=recording, fullgraph=True)(x, cache)
    grads = torch.autograd.grad(out.square().sum(), list(att.parameters()))
    assert len(recording.graphs) == 1
    targets = set(recording.targets())
    assert torch.ops.neollm.lucid_solve.default in targets
    out_e = att(x, cache)
    grads_e = torch.autograd.grad(out_e.square().sum(), list(att.parameters()))
    torch.testing.assert_close(out, out_e, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_impl_switch_is_validated_and_auto_takes_the_reference_off_cuda(monkeypatch):
    k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ConfigError, match="lucid_impl .* must be one of"):
        ops.lucid_values(k, v, 1e-6, impl="cuda")
    monkeypatch.setattr(ops, "LUCID_IMPL", "fast")
    with pytest.raises(ConfigError, match=r"NEOLLM_LUCID_IMPL\) must be one of"):
        ops.lucid_values(k, v, 1e-6)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="lucid_impl 'triton' cannot run: .*not CUDA"):
        ops.lucid_values(k, v, 1e-6, impl="triton")
    assert not ops.lucid_uses_kernel("auto", k, v)
    with pytest.raises(RuntimeError, match="Triton kernel cannot run here"):  # the op itself refuses too
        lucid.lucid_solve(k, v, True)


def test_impl_default_comes_from_the_environment():
    """NEOLLM_LUCID_IMPL (default "auto"), NEOLLM_LUCID_DOTS (default "tf32x3") and NEOLLM_LUCID_DIAGONAL
    (default "inverse") set the kernels' defaults for a whole run (read at import, in a fresh process)."""
    code = "from neollm.model import attention_ops as o; print(o.LUCID_IMPL)"
    assert fresh_python(code, NEOLLM_LUCID_IMPL="torch").strip() == "torch"
    if "NEOLLM_LUCID_IMPL" not in os.environ:
        assert ops.LUCID_IMPL == "auto"
    code = "from neollm.kernels import lucid as l; print(l.DOT_PRECISION)"
    assert fresh_python(code, NEOLLM_LUCID_DOTS="ieee").strip() == "ieee"
    if "NEOLLM_LUCID_DOTS" not in os.environ:
        assert lucid.DOT_PRECISION == "tf32x3"
    code = "from neollm.kernels import lucid as l; print(l.DIAGONAL)"
    assert fresh_python(code, NEOLLM_LUCID_DIAGONAL="substitute").strip() == "substitute"
    if "NEOLLM_LUCID_DIAGONAL" not in os.environ:
        assert lucid.DIAGONAL == "inverse"
    code = "from neollm.kernels import lucid as l; print(l.SOLVE)"
    assert fresh_python(code, NEOLLM_LUCID_SOLVE="lookback").strip() == "lookback"
    if "NEOLLM_LUCID_SOLVE" not in os.environ:
        assert lucid.SOLVE == "auto"


def test_bad_kernel_settings_name_their_variable(monkeypatch):
    """A wrong NEOLLM_LUCID_DOTS / NEOLLM_LUCID_DIAGONAL value is refused naming the variable."""
    monkeypatch.setattr(lucid, "DOT_PRECISION", "fp8")
    with pytest.raises(ConfigError,
                       match=r"NEOLLM_LUCID_DOTS\) must be one of \('ieee', 'tf32x3', 'tf32'\), got 'fp8'"):
        lucid._dots(None)
    monkeypatch.setattr(lucid, "DIAGONAL", "lu")
    with pytest.raises(ConfigError, match=r"NEOLLM_LUCID_DIAGONAL\) must be one of \('substitute', 'inverse'\)"):
        lucid._diagonal(None)
    monkeypatch.setattr(lucid, "SOLVE", "scan")
    with pytest.raises(ConfigError, match=r"NEOLLM_LUCID_SOLVE\) must be one of \('auto', 'walk', 'lookback'\)"):
        lucid._solve(None, True)
    with pytest.raises(ConfigError, match="lookback' solve applies inverted diagonal blocks: set NEOLLM_LUCID_DIAGONAL"):
        lucid._solve("lookback", False)
    assert lucid._solve("lookback", True) and not lucid._solve("walk", False)


def test_key_gradient_launch_is_its_own_and_validated():
    """The key gradient's launch comes from KEY_GRAD_* (not the substitutions' BLOCK_*), passes
    ``num_stages`` only when set (Triton's own default otherwise), and refuses tiles tl.dot cannot take."""
    pytest.importorskip("triton")
    default = dict(BR=128, BC=64, num_warps=8)  # the H100 sweep's best (BENCHMARKS.md, eighteenth session)
    assert lucid.KEY_GRAD_STAGES is None and lucid._key_grad_launch(None, None, None, None) == default
    assert (lucid.BLOCK_ROWS, lucid.BLOCK_COLS, lucid.NUM_WARPS) != (128, 64, 8)
    assert lucid._key_grad_launch(64, 32, 8, 2) == dict(BR=64, BC=32, num_warps=8, num_stages=2)
    kr, v = _keys_values(dtype=torch.float32)
    for bad, match in ((dict(block_rows=48), "block_rows must be a power of two >= 16"),
                       (dict(block_cols=8), "block_cols must be a power of two >= 16"),
                       (dict(num_warps=3), "num_warps must be a power of two"),
                       (dict(num_stages=0), "num_stages must be >= 1")):
        with pytest.raises(ValueError, match=match):
            lucid.key_grad(kr, v, v, **bad)


def test_key_gradient_falls_back_to_smaller_tiles_where_its_own_do_not_fit(monkeypatch):
    """A GPU whose shared memory cannot hold KEY_GRAD_*'s tiles runs the substitutions' smaller tiles (with a
    warning) rather than failing the step; a launch asked for explicitly (the bench's sweep) still raises."""
    pytest.importorskip("triton")
    from triton.runtime.errors import OutOfResources

    launches = []

    class Kernel:  # stands in for _key_grad_kernel: a GPU with 100 KB of shared memory a block
        def __getitem__(self, grid):
            def launch(*args, BR, BC, num_warps, **consts):
                launches.append((grid, BR, BC, num_warps))
                if BR * BC * num_warps > 32 * 64 * 4:
                    raise OutOfResources(160_000, 101_376, "shared memory")
            return launch

    monkeypatch.setattr(lucid, "_key_grad_kernel", Kernel())
    monkeypatch.setattr(lucid, "_KEY_GRAD_TOO_LARGE", set())
    kr, v = _keys_values(dtype=torch.float32)
    b, h, t, _ = kr.shape
    with pytest.warns(UserWarning, match="key gradient: .*shared memory.*smaller tiles 32 / 64 / 4 warps"):
        lucid.key_grad(kr, v, v)
    small = ((b * h, -(-t // 32)), 32, 64, 4)
    assert launches == [((b * h, -(-t // 128)), 128, 64, 8), small]
    launches.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the next calls go to the smaller tiles at once, without a warning
        lucid.key_grad(kr, v, v)
    assert launches == [small]
    with pytest.raises(OutOfResources):
        lucid.key_grad(kr, v, v, block_rows=128)


def test_auto_solve_looks_back_only_where_the_walks_leave_sms_idle(monkeypatch):
    """"auto" (the default) takes the look-back solve when the walk's programs (batch x KV heads x value
    splits) are no more than the device's SMs: an H100 (132) at batch 8, 16, 32 x 4 heads, not at 64."""
    props = type("Props", (), {"multi_processor_count": 132})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    cuda = torch.device("cuda", 0)
    assert [lucid._solve("auto", True, b * 4, cuda) for b in (8, 16, 32, 33, 34, 64)] == [True] * 4 + [False] * 2
    assert not lucid._solve("auto", False, 32, cuda)  # the substitution diagonal step has no look-back
    assert not lucid._solve("auto", True, 32, torch.device("cpu"))  # Triton's interpreter: the walk
    assert lucid._solve("lookback", True, 512, cuda) and not lucid._solve("walk", True, 32, cuda)


def test_triton_kernels_under_the_interpreter():
    """The kernels on the CPU (TRITON_INTERPRET=1): values and gradients vs fp64 within the
    reference's own error, fp32 / bf16 / fp16, ragged shapes; neollm_135m's attention layer with
    the kernels; opcheck with the kernels; injected errors fail the same checks."""
    import triton  # noqa: F401  (required: a broken install fails here, not skips)

    run_interpreted("lucid_kernel_interpreted.py", timeout=900)
