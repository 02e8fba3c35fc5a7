"""GPU checks of cached decoding: fla's recurrent/chunk kernels with a carried state vs the full forward.

Not run in this repository's CPU CI (written without GPU access; run with `pytest -m gpu tests/gpu`).
fp32 with TF32 inside fla's Triton dots: relative RMS error tolerance 5e-3, as tests/gpu/test_gdn_gpu.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_model import build, tiny  # noqa: E402

from neollm.generate import forward_step, generate, new_cache  # noqa: E402
from neollm.model.args import FLAVORS  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("kernels", ["fla", "torch"])
def test_cached_decoding_on_cuda(kernels):
    args = tiny(FLAVORS["neollm_110m_hybrid"], gdn_backend="auto", max_seq_len=160)
    model = build(args).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    tokens = torch.randint(0, args.vocab_size, (2, 150), device="cuda")
    with torch.no_grad():
        full = model(tokens)  # fla chunk kernels (backend auto on CUDA)
    cache = new_cache(model, 150, gdn_kernels=kernels)
    parts = [forward_step(model, tokens[:, :130], cache)]  # prefill over more than one 64-chunk
    parts += [forward_step(model, tokens[:, t:t + 1], cache) for t in range(130, 150)]
    assert rel_err(torch.cat(parts, dim=1), full) < 5e-3
    out = generate(model, [[1, 2, 3]], max_new_tokens=8, temperature=0, gdn_kernels=kernels)
    assert len(out[0]) == 8
