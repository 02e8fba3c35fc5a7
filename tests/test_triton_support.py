"""neollm/kernels/triton_support.py: where the technique kernels may run and how a switch resolves."""

from __future__ import annotations

import pytest
import torch

from neollm.errors import ConfigError
from neollm.kernels import triton_support as ts


def test_auto_takes_the_kernels_on_ampere_or_later_only(monkeypatch):
    """"auto" (the switches' default) runs the kernels on a CUDA device from Ampere on (bf16 and the TF32
    products need it); on an older GPU it keeps the reference, and "triton" there says why."""
    if not ts.TRITON_INSTALLED:
        pytest.skip("Triton is not installed")
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    reason = ts.unavailable_reason(cuda, (torch.bfloat16,))
    assert reason == "Tesla V100 is older than Ampere (compute capability < 8.0)"
    assert not ts.resolve_impl("auto", reason, True, "switch", "NEOLLM_X_IMPL")
    with pytest.raises(ConfigError, match="NEOLLM_X_IMPL 'triton' cannot run: Tesla V100 is older than Ampere"):
        ts.resolve_impl("triton", reason, True, "switch", "NEOLLM_X_IMPL")
    for capability in ((8, 0), (9, 0), (12, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert ts.unavailable_reason(cuda, (torch.bfloat16, torch.float32)) is None
        assert ts.resolve_impl("auto", None, True, "switch", "NEOLLM_X_IMPL")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert ts.unavailable_reason(cuda, (torch.bfloat16,), need_ampere=False) is None  # the fused loss on a V100
    assert "fp32/bf16/fp16" in ts.unavailable_reason(cuda, (torch.float64,))
    assert not ts.resolve_impl("auto", None, False, "switch", "NEOLLM_X_IMPL")  # CPU tensors: the reference
    with pytest.raises(ConfigError, match="must be one of"):
        ts.resolve_impl("fast", None, True, "switch", "NEOLLM_X_IMPL")


def test_the_device_check_compiles_without_a_graph_break(monkeypatch):
    """The switches resolve inside compiled blocks (fullgraph): the GPU-generation check is a constant."""
    if not ts.TRITON_INSTALLED:
        pytest.skip("Triton is not installed")
    # Opaque to dynamo, so that only the constant-result wrapper keeps the check out of the graph: without
    # it these calls break the graph and fullgraph=True fails.
    monkeypatch.setattr(torch.cuda, "get_device_name", torch._dynamo.disable(lambda device=None: "Tesla T4"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", torch._dynamo.disable(lambda device=None: (7, 5)))

    def f(x):
        return x + 1 if ts.unavailable_reason(torch.device("cuda", 0), (x.dtype,)) is None else x - 1

    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(2)), -torch.ones(2))


def test_the_fused_loss_asks_for_no_ampere(monkeypatch):
    """The fused loss kernel keeps serving GPUs older than Ampere: it asks without the technique kernels'
    Ampere requirement."""
    loss_kernel = pytest.importorskip("neollm.loss.kernel")
    seen = {}

    def spy(device, dtypes, need_ampere=True):
        seen["need_ampere"] = need_ampere
        return None

    monkeypatch.setattr(loss_kernel, "unavailable_reason", spy)
    assert loss_kernel.available(torch.zeros(2, 3))
    assert seen == {"need_ampere": False}
