"""GPU checks of cached decoding: fla's recurrent/chunk kernels with a carried state vs the full forward,
and the static decoder's CUDA-graph and compile modes vs the dynamic step.

Skipped in the CPU CI (run with `pytest -m gpu tests/gpu`). All 7 pass on an H100 (2026-11-26, torch 2.11,
Triton 3.6, fla 0.6.0; 94 s, most of it inductor compiling the `compile` cases).
fp32 with TF32 inside fla's Triton dots: relative RMS error tolerance 5e-3, as tests/gpu/test_gdn_gpu.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_model import build, tiny  # noqa: E402

from neollm.inference import DecoderPool, StaticDecoder, forward_step, generate, new_cache  # noqa: E402
from neollm.model.args import FLAVORS  # noqa: E402
from gpu_checks import GPU_ONLY, rel_err  # noqa: E402

pytestmark = GPU_ONLY


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
    cache = new_cache(model, 150, kernels=kernels)
    parts = [forward_step(model, tokens[:, :130], cache)]  # prefill over more than one 64-chunk
    parts += [forward_step(model, tokens[:, t:t + 1], cache) for t in range(130, 150)]
    assert rel_err(torch.cat(parts, dim=1), full) < 5e-3
    out = generate(model, [[1, 2, 3]], max_new_tokens=8, temperature=0, kernels=kernels)
    assert len(out[0]) == 8


STATIC_FLAVORS = {
    "neollm_135m": tiny(FLAVORS["neollm_135m"], max_seq_len=96),  # LUCID, momentum, affine, GQA
    "hybrid_fla": tiny(FLAVORS["neollm_110m_hybrid"], gdn_backend="auto", max_seq_len=96),  # fla GDN
}


def _perturbed_cuda(args):
    model = build(args).cuda().eval()
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, device="cuda", dtype=p.dtype))
    return model


@pytest.mark.parametrize("mode", ["cuda_graph", "compile"])
@pytest.mark.parametrize("flavor", list(STATIC_FLAVORS))
def test_static_decoder_on_cuda(flavor, mode):
    """Teacher-forced: the replayed graph's logits equal the dynamic step's (fp32; the masked
    full-buffer attention and LUCID sum in another order), the cache keeps its addresses; then
    generate() in this mode picks the dynamic path's greedy tokens, reusing a pooled decoder."""
    args = STATIC_FLAVORS[flavor]
    model = _perturbed_cuda(args)
    tokens = torch.randint(0, args.vocab_size, (2, 40), device="cuda")
    dec = StaticDecoder(model, batch=2, max_len=48, mode=mode)
    addresses = [t.data_ptr() for t in dec.cache.tensors()]
    cache = new_cache(model, 48)
    static = [dec.prefill(tokens[:, :20])]
    dynamic = [forward_step(model, tokens[:, :20], cache)[:, -1]]
    for t in range(20, 40):
        static.append(dec.step(tokens[:, t]).clone())
        dynamic.append(forward_step(model, tokens[:, t:t + 1], cache)[:, -1])
    assert rel_err(torch.stack(static), torch.stack(dynamic)) < 1e-4
    assert [t.data_ptr() for t in dec.cache.tensors()] == addresses
    assert dec.pos.item() == 40

    prompts = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]  # one length group: one more capture / compilation
    greedy = generate(model, prompts, max_new_tokens=16, temperature=0, decode_mode="dynamic")
    pool = DecoderPool()
    for _ in range(2):  # the second call replays the pooled graphs
        assert generate(model, prompts, max_new_tokens=16, temperature=0, decode_mode=mode,
                        decoders=pool) == greedy
    assert len(pool) == 1
    sampled = generate(model, prompts, max_new_tokens=16, temperature=1.0, seed=3, decode_mode="dynamic")
    assert generate(model, prompts, max_new_tokens=16, temperature=1.0, seed=3, decode_mode=mode,
                    decoders=pool) == sampled


def test_auto_mode_is_cuda_graph_on_cuda():
    model = _perturbed_cuda(STATIC_FLAVORS["neollm_135m"])
    greedy = generate(model, [[1, 2, 3]], max_new_tokens=8, temperature=0, decode_mode="dynamic")
    pool = DecoderPool()
    assert generate(model, [[1, 2, 3]], max_new_tokens=8, temperature=0, decoders=pool) == greedy
    assert next(iter(pool._entries.values()))._graph is not None
