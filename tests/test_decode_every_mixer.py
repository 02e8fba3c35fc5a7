"""The mixer decode protocol (``new_state`` / ``step``, neollm/inference/cache.py) in float64 on CPU:
Attention.step at a tensor position equals it at an int position for every attention switch
combination the flavors use; per layer-pattern code, a tiny model's prefill + decode steps (dynamic
and static eager) equal the full forward and its state tensors keep their addresses."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from test_generate import CASES, perturbed
from test_model import tiny

from neollm.inference import StaticDecoder, forward_step, new_cache
from neollm.model.args import NeoLLMModelArgs

TOL = dict(rtol=1e-9, atol=1e-10)
ATTENTION_CASES = [name for name, args in CASES.items() if "A" in args.layer_pattern]


def _first_attention(model):
    return next(b.mixer for b in model.layers.values() if b.mixer_code == "A")


@pytest.mark.parametrize("name", ATTENTION_CASES)
def test_attention_step_tensor_position_equals_int_position(name):
    """The static step's indexing (index_copy_, masks over the whole buffer, torch.where on the
    position) gives the int-position step's outputs and states, after a prefill and from position 0."""
    model = perturbed(CASES[name])
    attn, rope = _first_attention(model), model.rope
    dim = model.model_args.dim
    x = torch.randn(2, 10, dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        full = attn(x, rope[:10])
        for prefill in (0, 4):
            by_int = attn.new_state(2, 12, torch.float64, "cpu")
            by_tensor = attn.new_state(2, 12, torch.float64, "cpu")
            outs_int, outs_tensor = [], []
            if prefill:
                outs_int.append(attn.step(x[:, :prefill], by_int, 0, rope))
                outs_tensor.append(attn.step(x[:, :prefill], by_tensor, 0, rope))
            for t in range(prefill, 10):
                outs_int.append(attn.step(x[:, t:t + 1], by_int, t, rope))
                outs_tensor.append(attn.step(x[:, t:t + 1], by_tensor, torch.tensor([t]), rope))
            torch.testing.assert_close(torch.cat(outs_tensor, 1), torch.cat(outs_int, 1), **TOL)
            torch.testing.assert_close(torch.cat(outs_int, 1), full, **TOL)
            for a, b in zip(by_tensor.tensors(), by_int.tensors()):
                torch.testing.assert_close(a, b, **TOL)
    with pytest.raises(ValueError, match="one token"):
        attn.step(x[:, :2], attn.new_state(2, 12, torch.float64, "cpu"), torch.tensor([0]), rope)


# Sizes that keep every mixer tiny (fields of mixers that a pattern does not use are ignored).
MIXER_SIZES = dict(gla_gate_low_rank_dim=8, mamba2_head_dim=16, mamba2_state_size=16,
                   rwkv_proj_low_rank_dim=4, rwkv_gate_low_rank_dim=8, rwkv_backend="torch")
STEP_CODES = ["A", "D", "G", "T", "M", "R", "L", "N"]  # every layer-pattern code (MIXERS + attention)


def _state_tensors_listed(state) -> bool:
    """Every tensor field of a state dataclass is in its tensors() (reset and address checks see it all)."""
    listed = {id(t) for t in state.tensors()}
    fields = [getattr(state, f.name) for f in dataclasses.fields(state)]
    return all(id(v) in listed for v in fields if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("code", STEP_CODES)
def test_tiny_model_of_one_mixer_decodes_like_the_full_forward(code):
    args = tiny(NeoLLMModelArgs(layer_pattern=code), n_layers=2, **MIXER_SIZES)
    model = perturbed(args)
    tokens = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(tokens)
    # dynamic: prefill 4, then 5 one-token steps
    cache = new_cache(model, 12)
    parts = [forward_step(model, tokens[:, :4], cache)]
    addresses = [t.data_ptr() for t in cache.tensors()]
    assert addresses and all(_state_tensors_listed(s) for s in cache.layers)
    parts += [forward_step(model, tokens[:, t:t + 1], cache) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(parts, 1), full, **TOL)
    assert [t.data_ptr() for t in cache.tensors()] == addresses
    # static eager: the same prefill through the decoder, then 5 static steps
    dec = StaticDecoder(model, batch=2, max_len=12, mode="eager")
    addresses = [t.data_ptr() for t in dec.cache.tensors()]
    static = [dec.prefill(tokens[:, :4])] + [dec.step(tokens[:, t]).clone() for t in range(4, 9)]
    torch.testing.assert_close(torch.stack(static, 1), full[:, 3:], **TOL)
    assert [t.data_ptr() for t in dec.cache.tensors()] == addresses
