"""Every flavor, built small, with each of its technique switches flipped: the flip must change the
parameters (names, shapes or init values at the same seed) or, with the same weights, the outputs
(dropout switches in train mode under one seed; the rest in eval mode). A switch that a combination
makes a no-op (as learnable multipliers were under SimpleGPT on every projection) fails here."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from test_model import build, tiny

from neollm.model.args import FLAVORS, NeoLLMModelArgs
from neollm.model.params import DEPENDENT_FIELDS, technique_switches

DROPOUT_SWITCHES = {"dropout", "attention_dropout"}
OTHER_VALUE = {"simplegpt_scope": {"all": "mlp", "mlp": "all"}, "momentum_first": {"zero": "repeat", "repeat": "zero"}}


def flips(args: NeoLLMModelArgs) -> dict[str, object]:
    """switch -> its flipped value: the off value for the flavor's switches; the other choice for the
    settings of a switch that is on (momentum's t = 0, SimpleGPT's scope, ...)."""
    out = dict(technique_switches(args))
    off = NeoLLMModelArgs()
    for name in DEPENDENT_FIELDS:
        value = getattr(args, name)
        if name in OTHER_VALUE:
            out[name] = OTHER_VALUE[name][value]
        elif value != getattr(off, name):
            out[name] = getattr(off, name)
    # settings whose switch is off do nothing by design: only flip those of switches that are on
    needs = {"simplegpt_scope": args.simplegpt, "momentum_first": args.momentum_gamma > 0,
             "polynorm_exclusive_init": args.polynorm_exclusive, "routing_directions": args.directional_routing}
    return {k: v for k, v in out.items() if needs.get(k, True)}


CASES = [(flavor, name, value) for flavor, args in FLAVORS.items() for name, value in flips(args).items()]


def test_the_flips_cover_the_new_readings():
    names = {(flavor, name) for flavor, name, _ in CASES}
    assert {("neollm_135m", n) for n in ("simplegpt", "simplegpt_scope", "learnable_multipliers",
                                         "layernorm_scaling", "ffn_fan_ratio", "momentum_first")} <= names
    assert ("fanformer_92m", "dropout") in names and ("fanformer_92m", "attention_dropout") in names


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _outputs(model: torch.nn.Module, train: bool) -> torch.Tensor:
    model.train(train)
    tokens = torch.randint(0, model.tok_embeddings.num_embeddings, (2, 8), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(7)
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("flavor,name,value", CASES, ids=[f"{f}-{n}" for f, n, _ in CASES])
def test_flipping_a_switch_changes_the_model(flavor, name, value):
    pattern = FLAVORS[flavor].layer_pattern  # one tile of the pattern, at least 2 layers (LNS is 1 at layer 1)
    args = tiny(FLAVORS[flavor], n_layers=len(pattern) * (2 if len(pattern) == 1 else 1))
    flipped = dataclasses.replace(args, **{name: value})
    a, b = build(args).double(), build(flipped).double()
    sa, sb = _state(a), _state(b)
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        return  # other parameters
    if any(not torch.equal(sa[k], sb[k]) for k in sa):
        return  # other initial values at the same seed (e.g. an init setting)
    # same parameters: move them off their init (identity-at-init techniques act) and compare outputs
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    b.load_state_dict(a.state_dict())
    train = name in DROPOUT_SWITCHES
    diff = (_outputs(a, train) - _outputs(b, train)).abs().max().item()
    assert diff > 1e-6, f"{flavor}: flipping {name} to {value!r} changed neither parameters nor outputs"
