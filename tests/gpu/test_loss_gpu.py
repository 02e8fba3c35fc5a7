"""GPU checks of the loss implementations (neollm/loss/) in bf16 against an fp64 reference.

cce (Cut Cross-Entropy's Triton kernels), fused (Triton softmax kernel) and logits (compiled whole-logits
CE) on CUDA, with z-loss and ignored tokens: loss and both gradients within bf16 rounding of the
fp64 logits + cross-entropy on the same bf16 inputs (relative RMS error over the whole tensor).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neollm.loss import IGNORE_INDEX, LossSettings, linear_cross_entropy_sum
from gpu_checks import GPU_ONLY, rel_err

pytestmark = GPU_ONLY


@pytest.mark.parametrize("impl", ["cce", "fused", "logits"])
def test_loss_impls_match_fp64_reference_on_cuda(impl):
    torch.manual_seed(0)
    n, d, vocab, z_loss = 2048, 256, 5003, 1e-3
    hidden = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    weight = (0.05 * torch.randn(vocab, d, device="cuda")).bfloat16()
    targets = torch.randint(0, vocab, (n,), device="cuda")
    targets[::7] = IGNORE_INDEX
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy_sum(h, w, targets, LossSettings(impl=impl, z_loss=z_loss))
    loss.backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logits = h64 @ w64.t()
    valid = targets != IGNORE_INDEX
    ref = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    ref = ref + z_loss * logits.logsumexp(-1)[valid].pow(2).sum()
    ref.backward()
    assert rel_err(loss.detach(), ref.detach()) < 1e-3
    assert rel_err(h.grad, h64.grad) < 2e-2
    assert rel_err(w.grad, w64.grad) < 2e-2
