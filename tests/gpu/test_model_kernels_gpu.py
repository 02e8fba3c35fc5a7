"""Every technique kernel at once in a shrunk neollm_135m on the GPU (LUCID, PolyNorm GLU, q/k path,
attention epilogue: neollm/kernels/*), as tests/model_kernels_interpreted.py does on the CPU.

* fp32, eager: the loss and every parameter gradient (one vector) with the four switches "triton"
  against "torch" in fp64, within ``SLACK`` times the error of "torch" in fp32 (TF32 off).
* bf16 autocast, each block compiled with fullgraph as the trainer compiles them: one graph per
  block, the kernels' ops in it, and loss and gradients close to the eager references.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from conftest import GraphRecorder
from gpu_checks import GPU_ONLY, rel_err
from neollm.kernels import attention_epilogue, polynorm_glu, qk_path
from neollm.model import attention_ops

pytestmark = GPU_ONLY
SLACK, FLOOR = 3.0, 2e-7
SWITCHES = ((attention_ops, "LUCID_IMPL"), (polynorm_glu, "POLYNORM_IMPL"), (qk_path, "QK_PATH_IMPL"),
            (attention_epilogue, "EPILOGUE_IMPL"))
OPS = ("lucid_solve", "polynorm_glu", "qk_path", "attention_epilogue")


def _switches(monkeypatch, impl: str) -> None:
    for module, name in SWITCHES:
        monkeypatch.setattr(module, name, impl)


def _model():
    from neollm.model.args import FLAVORS
    from neollm.model.model import NeoLLM

    args = dataclasses.replace(FLAVORS["neollm_135m"], dim=128, n_heads=4, n_kv_heads=2, head_dim=32,
                               ffn_hidden_dim=384, vocab_size=256, max_seq_len=128, n_layers=2)
    torch.manual_seed(0)
    model = NeoLLM(args).cuda()
    model.init_weights()
    tokens = torch.randint(0, 256, (4, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    return model, tokens


def _loss_and_grads(model, tokens):
    model.zero_grad()
    logits = model(tokens)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach().double(), torch.cat([p.grad.flatten().double() for p in model.parameters()])


def test_every_kernel_at_once_matches_the_references_fp32(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model, tokens = _model()
    _switches(monkeypatch, "torch")
    want = _loss_and_grads(model.double(), tokens)
    ref = _loss_and_grads(model.float(), tokens)
    _switches(monkeypatch, "triton")
    got = _loss_and_grads(model, tokens)
    for what, x, r, w in zip(("loss", "gradients"), got, ref, want):
        err, ref_err = rel_err(x, w), rel_err(r, w)
        print(f"{what}: kernels {err:.2e}, reference {ref_err:.2e}")
        assert err <= SLACK * ref_err + FLOOR, f"{what}: kernels {err:.2e} vs reference {ref_err:.2e}"


def test_compiled_blocks_hold_every_kernel_in_one_graph(monkeypatch):
    model, tokens = _model()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _switches(monkeypatch, "torch")
        want = _loss_and_grads(model, tokens)
        _switches(monkeypatch, "triton")
        recording = GraphRecorder("inductor")

        torch._dynamo.reset()
        for layer_id, block in list(model.layers.named_children()):
            model.layers.register_module(layer_id, torch.compile(block, backend=recording, fullgraph=True))
        got = _loss_and_grads(model, tokens)
    assert len(recording.graphs) == 1, f"{len(recording.graphs)} graphs for two blocks of one kind"  # one reused
    targets = {str(t) for t in recording.targets()}
    for op in OPS:
        assert any(f"neollm.{op}" in t for t in targets), f"{op} is not in the compiled block"
    assert rel_err(got[0], want[0]) < 1e-2
    assert rel_err(got[1], want[1]) < 5e-2
