"""The static-shape decode step (neollm.inference.step.static_step) and its runner
(neollm.inference.decoder) on CPU:
equal to the dynamic step and the full forward (every flavor, float64), in-place cache writes,
generate() in "eager" mode, and torch.compile without recompiles. The CUDA graph runs are in
tests/gpu/test_generate_gpu.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from test_generate import CASES, perturbed
from test_model import build, tiny

from neollm.inference import DecoderPool, SamplingConfig, StaticDecoder, forward_step, generate, new_cache
from neollm.model.args import NeoLLMModelArgs


def _tokens(args: NeoLLMModelArgs, batch: int, length: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, args.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CASES))
def test_static_step_matches_dynamic_and_full_forward(name):
    args = CASES[name]
    model = perturbed(args)
    tokens = _tokens(args, 2, 14)
    with torch.no_grad():
        full = model(tokens)
    dec = StaticDecoder(model, batch=2, max_len=16, mode="eager")
    addresses = [t.data_ptr() for t in dec.cache.tensors()]
    dyn = new_cache(model, 16)
    # prefill 5 (the dynamic step, into the decoder's cache), then 9 static steps
    first = dec.prefill(tokens[:, :5])
    dynamic = [forward_step(model, tokens[:, :5], dyn)[:, -1]]
    static = [first]
    for t in range(5, 14):
        static.append(dec.step(tokens[:, t]).clone())
        dynamic.append(forward_step(model, tokens[:, t:t + 1], dyn)[:, -1])
    assert dec.cache.pos == 14 and dec.pos.tolist() == [14]
    static, dynamic = torch.stack(static, 1), torch.stack(dynamic, 1)
    torch.testing.assert_close(static, dynamic, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(static, full[:, 4:], rtol=1e-9, atol=1e-10)
    # every cache write was in place: the same buffers (what a captured graph reads and writes)
    assert [t.data_ptr() for t in dec.cache.tensors()] == addresses
    # reused for a new sequence, static from position 0 (no prefill): momentum's first row etc.
    dec.reset()
    again = torch.stack([dec.step(tokens[:, t]).clone() for t in range(6)], 1)
    torch.testing.assert_close(again, full[:, :6], rtol=1e-9, atol=1e-10)
    assert [t.data_ptr() for t in dec.cache.tensors()] == addresses


def test_generate_eager_mode_matches_dynamic():
    model = perturbed(dataclasses.replace(CASES["everything_hybrid"], max_seq_len=48))
    prompts = [[1, 2, 3, 4], [9, 8], [7, 7, 7, 7], [3]]  # three groups of prompt lengths
    greedy = generate(model, prompts, max_new_tokens=8, temperature=0, decode_mode="dynamic")
    assert generate(model, prompts, max_new_tokens=8, temperature=0, decode_mode="eager") == greedy
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.3, top_k=20, top_p=0.9, seed=5,
                         repetition_penalty=1.2)
    sampled = generate(model, prompts, cfg, decode_mode="dynamic")
    pool = DecoderPool()
    assert generate(model, prompts, cfg, decode_mode="eager", decoders=pool) == sampled
    assert len(pool) == 3
    reused = [pool.get(model, 2, 12, "eager")]  # the [1,2,3,4] / [7,7,7,7] group: batch 2, 4 + 8 positions
    assert generate(model, prompts, cfg, decode_mode="eager", decoders=pool) == sampled
    assert pool.get(model, 2, 12, "eager") is reused[0] and len(pool) == 3
    # auto on CPU is the dynamic path
    assert generate(model, prompts, cfg) == sampled


def test_compiled_static_step_does_not_recompile():
    """torch.compile (aot_eager: cheap on CPU) of the static step: one compilation for every
    position (the position is a tensor), same logits as the eager step."""
    args = dataclasses.replace(CASES["everything_hybrid"], n_layers=2)  # one GDN, one attention layer
    model = perturbed(args)
    tokens = _tokens(args, 2, 9)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    eager = StaticDecoder(model, 2, 12, mode="eager")
    compiled = StaticDecoder(model, 2, 12, mode="compile", compile_backend=counter)
    torch.testing.assert_close(compiled.prefill(tokens[:, :3]), eager.prefill(tokens[:, :3]), rtol=0, atol=0)
    frames = None
    for t in range(3, 9):  # 6 positions
        torch.testing.assert_close(compiled.step(tokens[:, t]), eager.step(tokens[:, t]),
                                   rtol=1e-12, atol=1e-12)
        frames = counter.frame_count if frames is None else frames
    # compiled at the first step only, as one graph: no graph break, hence no host sync or
    # Python branch on a tensor value in the step (with the torch GDN step; fla's is a break)
    assert frames == 1 and counter.frame_count == 1


def test_refusals():
    model = perturbed(CASES["debug"])
    with pytest.raises(ValueError, match="CUDA"):
        StaticDecoder(model, 1, 8, mode="cuda_graph")
    with pytest.raises(ValueError, match="mode"):
        StaticDecoder(model, 1, 8, mode="dynamic")
    with pytest.raises(ValueError, match="max_seq_len"):
        StaticDecoder(model, 1, model.model_args.max_seq_len + 1)
    dec = StaticDecoder(model, 1, 4)
    with pytest.raises(ValueError, match="batch"):
        dec.prefill(torch.zeros(2, 2, dtype=torch.long))
    dec.prefill(torch.zeros(1, 2, dtype=torch.long))
    dec.step(torch.zeros(1, dtype=torch.long))
    dec.step(torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="max_len"):
        dec.step(torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="decode_mode"):
        generate(model, [[1]], max_new_tokens=2, decode_mode="graph")
    with pytest.raises(ValueError, match="use_cache"):
        generate(model, [[1]], max_new_tokens=2, decode_mode="eager", use_cache=False)
    with pytest.raises(ValueError, match="CUDA"):
        generate(model, [[1]], max_new_tokens=2, decode_mode="cuda_graph")
    with pytest.raises(ValueError, match="context"):
        generate(model, [[1] * 60], max_new_tokens=9, decode_mode="eager")
    stepless = build(tiny(NeoLLMModelArgs(layer_pattern="DA"))).eval()
    stepless.layers["0"].mixer.step = None  # a mixer without a decode step
    with pytest.raises(ValueError, match="use_cache=False"):
        StaticDecoder(stepless, 1, 8)
    model.train()
    with pytest.raises(ValueError, match="eval"):
        StaticDecoder(model, 1, 8)
