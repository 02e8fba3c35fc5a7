"""A whole neollm_135m (shrunk) forward and backward with every technique kernel on, under Triton's CPU
interpreter: LUCID's solve, the PolyNorm GLU, the q/k path and the attention epilogue
(neollm/kernels/*). Each kernel has its own checks (tests/*_interpreted.py); this one checks that they
compose: the loss and every parameter gradient (one vector) with all four switches "triton" in fp32,
against all four "torch" in fp64, within ``SLACK`` times the error of all four "torch" in fp32, plus
``FLOOR``. Run by tests/test_model_kernels.py in a subprocess with TRITON_INTERPRET=1; prints "ok".
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch
import torch.nn.functional as F

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from neollm.kernels import attention_epilogue, lucid, polynorm_glu, qk_path  # noqa: E402
from neollm.model import attention_ops  # noqa: E402
from neollm.model.args import FLAVORS  # noqa: E402
from neollm.model.model import NeoLLM  # noqa: E402

SLACK, FLOOR = 3.0, 2e-7
SWITCHES = ((attention_ops, "LUCID_IMPL"), (polynorm_glu, "POLYNORM_IMPL"), (qk_path, "QK_PATH_IMPL"),
            (attention_epilogue, "EPILOGUE_IMPL"))
KERNELS = ((lucid, "solve_kernel_keeping_inverses"), (polynorm_glu, "forward_kernel"), (qk_path, "forward_kernel"),
           (attention_epilogue, "forward_kernel"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def set_switches(impl: str) -> None:
    for module, name in SWITCHES:
        setattr(module, name, impl)


def main() -> None:
    args = dataclasses.replace(FLAVORS["neollm_135m"], dim=64, n_heads=4, n_kv_heads=2, head_dim=16,
                               ffn_hidden_dim=96, vocab_size=97, max_seq_len=64, n_layers=2)
    assert args.lucid and args.mlp_type == "polynorm" and args.seednorm_qk and args.xsa and args.dropout == 0
    torch.manual_seed(0)
    model = NeoLLM(args)
    model.init_weights()
    tokens = torch.randint(0, args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))

    def run(impl: str, dtype: torch.dtype):
        set_switches(impl)
        net = model.to(dtype)
        net.zero_grad()
        logits = net(tokens)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).double(), tokens[:, 1:].flatten())
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten().double() for p in net.parameters()])

    calls = {}
    originals = [getattr(module, name) for module, name in KERNELS]
    for (module, name), original in zip(KERNELS, originals):
        setattr(module, name, lambda *a, _n=module.__name__, _f=original, **kw: calls.setdefault(_n, []).append(1)
                or _f(*a, **kw))
    try:
        want, ref = run("torch", torch.float64), run("torch", torch.float32)
        assert not calls, f"the reference runs called kernels: {sorted(calls)}"
        got = run("triton", torch.float32)
    finally:
        set_switches("torch")
        for (module, name), original in zip(KERNELS, originals):
            setattr(module, name, original)
    assert len(calls) == len(KERNELS), f"kernels that ran: {sorted(calls)}"
    for what, x, r, w in zip(("loss", "gradients"), got, ref, want):
        err, ref_err = rel_err(x, w), rel_err(r, w)
        print(f"{what}: kernels {err:.2e}, reference {ref_err:.2e}")
        assert err <= SLACK * ref_err + FLOOR, f"{what}: kernels {err:.2e} vs reference {ref_err:.2e}"


if __name__ == "__main__":
    main()
    print("ok")
    sys.exit(0)
