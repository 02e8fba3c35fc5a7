"""NeoLLM's optimizers (AdEMAMix, Conda, grouped AdamW) and LR schedule, on the CPU.

* each optimizer against a plain single-tensor reference written here from the papers' /
  authors' code, step by step (float64), warm-ups and basis refreshes included;
* weight-decay parameter groups;
* optimizer + scheduler state through a DCP checkpoint, continuing identically;
* 2 ranks (gloo, FSDP2 ``fully_shard``, uneven and empty row shards) == 1 process;
* the schedule against its closed form;
* one short run of the real trainer with AdEMAMix (marked slow).
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import torch.nn as nn
from torchtitan.components.lr_scheduler import build_lr_schedulers

from neollm.optim import AdEMAMix, Conda, build_neollm_lr_schedulers, build_neollm_optimizers
from neollm.optim.param_groups import build_param_groups

DT = torch.float64


# ----------------------------------------------------------------------------- references


def _f(beta: float) -> float:
    return math.log(0.5) / math.log(beta + 1e-8) - 1


def ref_ademamix(p, grads, lrs, betas, alpha, t_alpha, t_beta3, eps, wd):
    """Official AdEMAMix (apple/ml-ademamix pytorch/ademamix.py) for one tensor."""
    b1, b2, b3_final = betas
    p = p.clone()
    m1, m2, v = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        a = alpha * t / t_alpha if t_alpha and t < t_alpha else alpha
        if t_beta3 and t < t_beta3:
            x = t / t_beta3
            b3 = 0.5 ** (1 / ((1 - x) * _f(b1) + x * _f(b3_final) + 1))
        else:
            b3 = b3_final
        m1 = b1 * m1 + (1 - b1) * g
        m2 = b3 * m2 + (1 - b3) * g
        v = b2 * v + (1 - b2) * g * g
        u = (m1 / (1 - b1**t) + a * m2) / (v.sqrt() / math.sqrt(1 - b2**t) + eps) + wd * p
        p = p - lr * u
    return p


def ref_conda(p, grads, lrs, betas, eps, wd, gap, scale):
    """The author's Conda_optimizer.py for one tensor ('std' projection, bias correction on)."""
    b1, b2 = betas
    p = p.clone()
    m, v, basis = torch.zeros_like(p), torch.zeros_like(p), None
    right = p.ndim == 2 and p.shape[0] >= p.shape[1]
    for k, (g, lr) in enumerate(zip(grads, lrs)):  # k: steps done before this one
        m = b1 * m + (1 - b1) * g
        if p.ndim == 2:
            if basis is None or k % gap == 0:
                U, _, Vh = torch.linalg.svd(m.float(), full_matrices=False)  # float32, as the author
                basis = (Vh if right else U).to(p.dtype)
            g_p, m_p = (g @ basis.T, m @ basis.T) if right else (basis.T @ g, basis.T @ m)
            v = b2 * v + (1 - b2) * g_p * g_p
            n = m_p / (v.sqrt() + eps)
            n = (n @ basis if right else basis @ n) * scale
        else:
            v = b2 * v + (1 - b2) * g * g
            n = m / (v.sqrt() + eps)
        t = k + 1
        p = p - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * n
        p = p - lr * wd * p
    return p


def ref_conda_latest(p, grads, lrs, betas, eps, wd, gap, scale):
    """The author's latest Conda_optimizer.py (939adb0, default switches; dd20c2e's step) for one tensor:
    m and v bias-corrected themselves, U for rows <= cols, cautious weight decay before the step."""
    b1, b2 = betas
    p = p.clone()
    m, v, basis = torch.zeros_like(p), torch.zeros_like(p), None
    right = p.ndim == 2 and p.shape[0] > p.shape[1]
    for k, (g, lr) in enumerate(zip(grads, lrs)):
        m = b1 * m + (1 - b1) * g
        if p.ndim == 2:
            if basis is None or k % gap == 0:
                U, _, Vh = torch.linalg.svd(m.float(), full_matrices=False)
                basis = (Vh if right else U).to(p.dtype)
            g_p, m_p = (g @ basis.T, m @ basis.T) if right else (basis.T @ g, basis.T @ m)
        else:
            g_p, m_p = g, m
        v = b2 * v + (1 - b2) * g_p * g_p
        t = k + 1
        n = (m_p / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        if p.ndim == 2:
            n = (n @ basis if right else basis @ n) * scale
        p = p - lr * wd * p * ((n * p) >= 0)
        p = p - lr * n
    return p


# ----------------------------------------------------------------------------- helpers

# shapes: right-type matrix, left-type matrix, 1-D, 3-D
SHAPES = [(7, 4), (3, 6), (5,), (2, 3, 2), (7, 4), (3, 6), (4, 4)]  # repeated shapes: batched projections


def _run_single(opt_factory, steps=10):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=DT) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=DT) for s in SHAPES] for _ in range(steps)]
    lrs = [1e-2 * (1 + 0.1 * i) for i in range(steps)]  # the LR changes each step, as a scheduler does
    params = [nn.Parameter(x.clone()) for x in init]
    opt = opt_factory(params)
    for i in range(steps):
        for p, g in zip(params, grads[i]):
            p.grad = g.clone()
        for group in opt.param_groups:
            group["lr"] = lrs[i]
        opt.step()
    return init, grads, lrs, params


@pytest.mark.parametrize("foreach", [True, False])
def test_ademamix_matches_reference(foreach):
    hp = dict(betas=(0.9, 0.999, 0.999), alpha=5.0, t_alpha=6, t_beta3=4, eps=1e-8, wd=0.1)
    init, grads, lrs, params = _run_single(lambda ps: AdEMAMix(
        ps, lr=1.0, betas=hp["betas"], alpha=hp["alpha"], t_alpha=hp["t_alpha"], t_beta3=hp["t_beta3"],
        eps=hp["eps"], weight_decay=hp["wd"], foreach=foreach))
    for i, p in enumerate(params):
        ref = ref_ademamix(init[i], [g[i] for g in grads], lrs, **hp)
        torch.testing.assert_close(p.detach(), ref, rtol=1e-12, atol=1e-13)
        assert not torch.equal(p.detach(), init[i])


def test_ademamix_beta1_zero_and_no_warmup():
    hp = dict(betas=(0.0, 0.99, 0.9999), alpha=2.0, t_alpha=0, t_beta3=0, eps=1e-8, wd=0.0)
    init, grads, lrs, params = _run_single(lambda ps: AdEMAMix(
        ps, lr=1.0, betas=hp["betas"], alpha=hp["alpha"], eps=hp["eps"], weight_decay=0.0), steps=4)
    for i, p in enumerate(params):
        ref = ref_ademamix(init[i], [g[i] for g in grads], lrs, **hp)
        torch.testing.assert_close(p.detach(), ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("foreach", [True, False])
def test_conda_matches_reference(foreach):
    hp = dict(betas=(0.9, 0.999), eps=1e-8, wd=0.1, gap=3, scale=0.25)  # basis refreshed at steps 1, 4, 7, 10
    init, grads, lrs, params = _run_single(lambda ps: Conda(
        ps, lr=1.0, betas=hp["betas"], eps=hp["eps"], weight_decay=hp["wd"], update_proj_gap=hp["gap"],
        scale=hp["scale"], foreach=foreach))
    for i, p in enumerate(params):
        ref = ref_conda(init[i], [g[i] for g in grads], lrs, **hp)
        torch.testing.assert_close(p.detach(), ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("eps", [1e-8, 1e-2])  # a large eps shows where the bias correction acts
def test_conda_latest_version_matches_reference(foreach, eps):
    hp = dict(betas=(0.9, 0.999), eps=eps, wd=0.1, gap=3, scale=0.25)
    init, grads, lrs, params = _run_single(lambda ps: Conda(
        ps, lr=1.0, betas=hp["betas"], eps=hp["eps"], weight_decay=hp["wd"], update_proj_gap=hp["gap"],
        scale=hp["scale"], foreach=foreach, version="2026-04-16"))
    for i, p in enumerate(params):
        ref = ref_conda_latest(init[i], [g[i] for g in grads], lrs, **hp)
        torch.testing.assert_close(p.detach(), ref, rtol=1e-12, atol=1e-13)
        # and not the first version's step (the two differ on every shape here)
        first = ref_conda(init[i], [g[i] for g in grads], lrs, **hp)
        assert (p.detach() - first).abs().max() > 1e-6, SHAPES[i]


@pytest.mark.parametrize("cls", [AdEMAMix, Conda])
@pytest.mark.parametrize("setting, words", [
    ({"lr": -1e-3}, "invalid learning rate -0.001"),
    ({"eps": -1e-8}, "invalid eps"),
    ({"betas": (0.9, 1.0, 0.999)}, r"invalid beta2 1.0 \(must be in \[0, 1\)\)"),
    ({"weight_decay": -0.1}, "invalid weight_decay -0.1"),
])
def test_optimizers_refuse_out_of_range_settings_by_name(cls, setting, words):
    if cls is Conda and "betas" in setting:
        setting = {"betas": setting["betas"][:2]}
    with pytest.raises(ValueError, match=f"^{cls.__name__}: {words}"):
        cls([nn.Parameter(torch.zeros(2, 2))], **setting)


def test_conda_rejects_an_unknown_version():
    from neollm.errors import ConfigError

    with pytest.raises(ValueError, match="2026-04-16"):
        Conda([nn.Parameter(torch.zeros(2, 2))], version="latest")
    with pytest.raises(ConfigError, match="conda_version"):
        build_neollm_optimizers([Small()], _config("Conda", conda_version="2027"), parallel_dims=None)


@pytest.mark.parametrize("foreach", [True, False])
def test_conda_tf32_products_are_set_around_the_projections_only(monkeypatch, foreach):
    """precision="tf32": the projections run with cuBLAS's fp32 matmuls in TF32, the SVD that builds the
    basis in IEEE, and the caller's setting is back after the step (compiled model code guards on it).
    On a CPU the flag changes no arithmetic: the step equals the IEEE one bit for bit."""
    import neollm.optim.conda as conda

    matmul = torch.backends.cuda.matmul
    seen = {"svd": set(), "projection": set()}
    svd, local, batched = torch.linalg.svd, conda.Conda._direction_local, conda.Conda._batched_directions

    def spy_svd(*args, **kwargs):
        seen["svd"].add(matmul.fp32_precision)
        return svd(*args, **kwargs)

    def spy_local(*args, **kwargs):
        seen["projection"].add(matmul.fp32_precision)
        return local(*args, **kwargs)

    def spy_batched(*args, **kwargs):
        seen["projection"].add(matmul.fp32_precision)
        return batched(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy_svd)
    monkeypatch.setattr(conda.Conda, "_direction_local", staticmethod(spy_local))
    monkeypatch.setattr(conda.Conda, "_batched_directions", staticmethod(spy_batched))
    before, matmul.fp32_precision = matmul.fp32_precision, "none"
    results = {}
    try:
        for precision in ("ieee", "tf32"):
            seen["svd"].clear(), seen["projection"].clear()
            init, _, _, params = _run_single(lambda ps: Conda(ps, lr=1.0, update_proj_gap=3, foreach=foreach,
                                                              precision=precision), steps=4)
            assert seen == {"svd": {"ieee"}, "projection": {precision}}
            assert matmul.fp32_precision == "none"
            results[precision] = [p.detach() for p in params]
    finally:
        matmul.fp32_precision = before
    for a, b in zip(*results.values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="ieee, tf32"):
        Conda([nn.Parameter(torch.zeros(2, 2))], precision="bf16")


@pytest.mark.parametrize("key, attribute, value, default, bad, choices", [
    ("conda_precision", "precision", "tf32", "ieee", "tf16", "ieee, tf32"),
    ("conda_basis", "basis", "svd-cpu", "svd", "qr", "svd, svd-batched, svd-cpu"),
])
def test_conda_setting_reaches_the_optimizer_from_the_config(key, attribute, value, default, bad, choices):
    from neollm.errors import ConfigError

    optimizers = build_neollm_optimizers([Small()], _config("Conda", **{key: value}), parallel_dims=None)
    assert {getattr(opt, attribute) for opt in optimizers.optimizers} == {value}
    defaults = build_neollm_optimizers([Small()], _config("Conda"), parallel_dims=None)
    assert {getattr(opt, attribute) for opt in defaults.optimizers} == {default}
    with pytest.raises(ConfigError, match=f"{key} '{bad}' is unknown: choose one of {choices}"):
        build_neollm_optimizers([Small()], _config("Conda", **{key: bad}), parallel_dims=None)
    import neollm  # noqa: F401  (registers the config's NeoLLM sections)
    from neollm.config_check import check_ranges, parse_config

    job = parse_config(["--job.config_file", "train_configs/debug.toml", "--optimizer.name", "Conda",
                        f"--optimizer.{key}", bad])
    with pytest.raises(ConfigError, match=f"{key} '{bad}' is unknown: choose one of {choices}"):
        check_ranges(job)


@pytest.mark.parametrize("basis", ["svd-batched", "svd-cpu"])
def test_conda_basis_methods_take_the_reference_steps(basis):
    """Every way of running the basis refresh's SVDs gives the reference's parameters (bases refreshed
    every other step; tall, wide and square matrices, two of one shape for the batched SVD, a vector),
    on the batched and the per-tensor step; the bases are their own tensors (not views of a stack, which
    a checkpoint would write whole), and each sign of a singular vector cancels in the update."""
    shapes = [(12, 5), (12, 5), (5, 12), (6, 6), (7,)]

    def run(method: str, foreach: bool) -> tuple[list[torch.Tensor], Conda]:
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(s)) for s in shapes]
        opt = Conda(params, lr=1e-2, update_proj_gap=2, foreach=foreach, basis=method)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        return [p.detach().clone() for p in params], opt

    for foreach in (True, False):
        reference, _ = run("svd", foreach)
        got, opt = run(basis, foreach)
        for a, b in zip(got, reference):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        projectors = [opt.state[p]["projector"] for group in opt.param_groups for p in group["params"]
                      if p.ndim == 2]
        assert len(projectors) == 4 and all(t._base is None for t in projectors)
    flipped = Conda([nn.Parameter(torch.zeros(3, 3))])  # a sign flip of one basis vector: the same direction
    g, m, v = torch.randn(3, 3), torch.randn(3, 3), torch.rand(3, 3)
    basis_a = torch.linalg.qr(torch.randn(3, 3))[0].T.contiguous()
    basis_b = basis_a * torch.tensor([[1.0], [-1.0], [1.0]])
    group = {"betas": (0.9, 0.999), "eps": 1e-8, "scale": 0.25}
    torch.testing.assert_close(flipped._direction_local(g, m, v.clone(), basis_a, group, True),
                               flipped._direction_local(g, m, v.clone(), basis_b, group, True))
    with pytest.raises(ValueError, match="svd, svd-batched, svd-cpu"):
        Conda([nn.Parameter(torch.zeros(2, 2))], basis="qr")


def test_conda_batched_step_equals_per_tensor_step_with_lagging_tensors():
    """Tensors without a gradient at some steps fall behind in step count: the batched step buckets
    them by step and still equals the per-tensor step."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(6, 4), (6, 4), (6, 4), (4, 9), (4, 9), (8,), (8,)]
    init = [torch.randn(s, generator=gen, dtype=DT) for s in shapes]
    results = {}
    for foreach in (True, False):
        params = [nn.Parameter(x.clone()) for x in init]
        opt = Conda(params, lr=1e-2, update_proj_gap=2, weight_decay=0.1, foreach=foreach)
        g = torch.Generator().manual_seed(4)
        for step in range(5):
            for i, p in enumerate(params):
                grad = torch.randn(p.shape, generator=g, dtype=DT)
                p.grad = None if (i % 3 == 0 and step in (0, 2)) else grad
            opt.step()
        results[foreach] = [p.detach().clone() for p in params]
        steps = sorted({int(opt.state[p]["step"].item()) for p in params})
        assert steps == [3, 5]
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)


def test_conda_batching_choice_stays_out_of_the_checkpointed_param_groups():
    """Param groups are saved in checkpoints: a `foreach` key there would make checkpoints written
    without it fail to load, and a resumed run take the saved choice over its config."""
    p = nn.Parameter(torch.randn(4, 3, dtype=DT))
    opt = Conda([p], lr=1e-2, foreach=False)
    p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state_dict()
    assert set(state["param_groups"][0]) == {"lr", "betas", "eps", "weight_decay", "correct_bias",
                                             "update_proj_gap", "scale", "params"}
    again = Conda([p], lr=1e-2, foreach=True)
    again.load_state_dict(state)
    assert again.foreach is True


def test_conda_projection_preserves_shape_and_refreshes_basis():
    p = nn.Parameter(torch.randn(3, 6, dtype=DT))
    opt = Conda([p], lr=1e-2, update_proj_gap=2)
    bases = []
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
        bases.append(opt.state[p]["projector"].clone())
    assert bases[0].shape == (3, 3)  # rows < cols: U
    assert torch.equal(bases[0], bases[1]) and not torch.equal(bases[1], bases[2])  # refresh at step 3
    torch.testing.assert_close(bases[2].T @ bases[2], torch.eye(3, dtype=DT), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- groups / builder


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.proj = nn.Linear(4, 4)  # weight decayed, bias not
        self.norm = nn.RMSNorm(4)  # gain not decayed
        self.scalar = nn.Parameter(torch.tensor(0.5))
        self.flagged = nn.Parameter(torch.randn(2, 4))  # 2-D but flagged
        self.flagged._no_weight_decay = True
        self.frozen = nn.Parameter(torch.randn(4, 4), requires_grad=False)

    def forward(self, tokens):
        h = self.norm(self.proj(self.emb(tokens))) * self.scalar
        return (h @ self.flagged.T).sum()


def _config(name, **extra):
    base = dict(name=name, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                implementation="foreach", early_step_in_backward=False)
    return SimpleNamespace(**{**base, **extra})


def test_param_groups_decay_only_unflagged_matrices():
    model = Small()
    groups = build_param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = sorted(names[id(p)] for p in groups[0]["params"])
    no_decay = sorted(names[id(p)] for p in groups[1]["params"])
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (0.1, 0.0)
    assert decay == ["emb.weight", "proj.weight"]
    assert no_decay == ["flagged", "norm.weight", "proj.bias", "scalar"]  # frozen left out


@pytest.mark.parametrize("name", ["AdamW", "AdEMAMix", "Conda"])
def test_builder_decays_only_the_decay_group(name):
    """With zero gradients every optimizer's step is pure decoupled weight decay."""
    model = Small().double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opts = build_neollm_optimizers([model], _config(name), parallel_dims=None)
    assert type(opts.optimizers[0]).__name__ == name
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opts.step()
    for n, p in model.named_parameters():
        if n in ("emb.weight", "proj.weight"):
            torch.testing.assert_close(p.detach(), before[n] * (1 - 1e-2 * 0.1), rtol=1e-14, atol=0)
        else:
            assert torch.equal(p.detach(), before[n]), n


def test_builder_rejects_unknown_name():
    from neollm.errors import ConfigError

    with pytest.raises(ConfigError, match="AdEMAMix"):
        build_neollm_optimizers([Small()], _config("Lion"), parallel_dims=None)


# ----------------------------------------------------------------------------- checkpoint round trip


def _train_steps(model, opts, scheds, batches):
    for tokens in batches:
        opts.zero_grad()
        model(tokens).backward()
        opts.step()
        scheds.step()


@pytest.mark.parametrize("name", ["AdEMAMix", "Conda", "Conda-2026-04-16", "AdamW"])
def test_state_round_trips_through_dcp_checkpoint(tmp_path, name):
    torch.manual_seed(0)
    extra = dict(beta3=0.999, alpha=5.0, t_alpha=3, t_beta3=3, conda_update_proj_gap=2)
    if name.startswith("Conda-"):
        name, extra["conda_version"] = "Conda", name[len("Conda-"):]
    sched_cfg = SimpleNamespace(warmup_steps=2, total_steps=None, decay_ratio=None, decay_type="cosine",
                                min_lr_factor=0.1, start_lr_factor=0.5)
    batches = [torch.randint(0, 11, (3, 5)) for _ in range(6)]
    model = Small().double()
    opts = build_neollm_optimizers([model], _config(name, **extra), parallel_dims=None)
    scheds = build_neollm_lr_schedulers(opts, sched_cfg, training_steps=6)
    _train_steps(model, opts, scheds, batches[:3])

    # save as torchtitan's CheckpointManager does (Stateful objects in a DCP checkpoint)
    dcp.save({"optimizer": opts, "lr_scheduler": scheds, "model": model.state_dict()}, checkpoint_id=tmp_path)
    torch.manual_seed(1)
    resumed = Small().double()  # other weights: the checkpoint must restore them
    opts2 = build_neollm_optimizers([resumed], _config(name, **extra), parallel_dims=None)
    scheds2 = build_neollm_lr_schedulers(opts2, sched_cfg, training_steps=6)
    state = {"optimizer": opts2, "lr_scheduler": scheds2, "model": resumed.state_dict()}
    dcp.load(state, checkpoint_id=tmp_path)
    resumed.load_state_dict(state["model"])
    if name == "Conda":
        assert "projector" in opts2.optimizers[0].state[resumed.proj.weight]
    assert opts2.optimizers[0].param_groups[0]["lr"] == opts.optimizers[0].param_groups[0]["lr"]

    _train_steps(model, opts, scheds, batches[3:])
    _train_steps(resumed, opts2, scheds2, batches[3:])
    for (n, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n


# ----------------------------------------------------------------------------- LR schedule


def test_schedule_seed000_closed_form():
    cfg = SimpleNamespace(warmup_steps=5000, total_steps=None, decay_ratio=None, decay_type="cosine",
                          min_lr_factor=0.1, start_lr_factor=0.5)
    opts = build_neollm_optimizers([Small()], _config("AdEMAMix", lr=6e-4), parallel_dims=None)
    sched = build_neollm_lr_schedulers(opts, cfg, training_steps=62500).schedulers[0]

    def lr(c):  # LR of training step c + 1
        return 6e-4 * sched.lr_lambdas[0](c)

    def closed(c):
        if c < 5000:
            return 3e-4 + (6e-4 - 3e-4) * c / 5000
        return 6e-5 + 0.5 * (6e-4 - 6e-5) * (1 + math.cos(math.pi * (c - 5000) / 57500))

    for c in (0, 1, 2500, 4999, 5000, 5001, 20000, 33750, 62499, 62500, 70000):
        assert lr(c) == pytest.approx(closed(min(c, 62500)), rel=1e-12), c
    assert lr(0) == pytest.approx(3e-4) and lr(5000) == pytest.approx(6e-4)
    assert lr(33750) == pytest.approx((6e-4 + 6e-5) / 2) and lr(62500) == pytest.approx(6e-5)


def test_schedule_drives_the_optimizer_and_wsd():
    cfg = SimpleNamespace(warmup_steps=4, total_steps=None, decay_ratio=0.5, decay_type="linear",
                          min_lr_factor=0.0, start_lr_factor=0.0)
    opts = build_neollm_optimizers([Small()], _config("Conda", lr=1.0), parallel_dims=None)
    scheds = build_neollm_lr_schedulers(opts, cfg, training_steps=12)
    seen = []
    for _ in range(13):
        seen.append(opts.optimizers[0].param_groups[0]["lr"])
        assert all(g["lr"] == seen[-1] for g in opts.optimizers[0].param_groups)
        opts.step()
        scheds.step()
    # warm-up 0, .25, .5, .75; stable 1 at c = 4..5; linear decay over the last 6 steps to 0 at c = 12
    expected = [0, .25, .5, .75, 1, 1, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0]
    assert seen == pytest.approx(expected, abs=1e-12)


def test_schedule_unset_is_torchtitans():
    cfg = SimpleNamespace(warmup_steps=3, total_steps=None, decay_ratio=None, decay_type="cosine",
                          min_lr_factor=0.1, start_lr_factor=None)
    ours = build_neollm_lr_schedulers(
        build_neollm_optimizers([Small()], _config("AdamW"), None), cfg, 10).schedulers[0]
    theirs = build_lr_schedulers(
        build_neollm_optimizers([Small()], _config("AdamW"), None), cfg, 10).schedulers[0]
    assert [ours.lr_lambdas[0](c) for c in range(12)] == [theirs.lr_lambdas[0](c) for c in range(12)]


# ----------------------------------------------------------------------------- 2 ranks (FSDP2) vs 1 process


class Tiny(nn.Module):
    """Covers every layout Conda meets under FSDP2 row sharding on 2 ranks."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(6, 10)  # [10, 6] rows >= cols ("right"); 1-D bias
        self.down = nn.Linear(10, 5, bias=False)  # [5, 10] "left", 5 rows -> shards of 3 and 2
        self.row = nn.Parameter(torch.randn(1, 5))  # [1, 5] "left", one row: rank 1's shard is empty
        self.mix = nn.Parameter(0.3 * torch.randn(5, 5))  # flagged no-decay matrix
        self.gain = nn.Parameter(torch.ones(5))  # 1-D
        self.kernel = nn.Parameter(0.3 * torch.randn(4, 1, 3))  # 3-D: Adam path

    def forward(self, x):
        h = self.down(torch.tanh(self.up(x))) * self.gain
        h = h + torch.tanh(h @ self.mix) * (1 + self.kernel.reshape(-1)[:5])
        return (h * self.row).sum(-1)


STEPS, SAVE_AT = 4, 2
OPT_CASES = {
    "AdEMAMix": _config("AdEMAMix", lr=2e-2, beta3=0.999, alpha=5.0, t_alpha=3, t_beta3=3),
    "Conda": _config("Conda", lr=2e-2, conda_update_proj_gap=2, conda_scale=0.25, conda_correct_bias=True),
    # the per-tensor step: left projections of row shards as reduce-scatters instead of one all-gather
    "Conda-loop": _config("Conda", lr=2e-2, conda_update_proj_gap=2, conda_scale=0.25, conda_correct_bias=True,
                          implementation="for-loop"),
    # the author's latest version (square "mix" takes the left projection; cautious decay on "down")
    "Conda-latest": _config("Conda", lr=2e-2, conda_update_proj_gap=2, conda_scale=0.25, conda_correct_bias=True,
                            conda_version="2026-04-16", eps=1e-3),
    "Conda-latest-loop": _config("Conda", lr=2e-2, conda_update_proj_gap=2, conda_scale=0.25,
                                 conda_correct_bias=True, conda_version="2026-04-16", eps=1e-3,
                                 implementation="for-loop"),
}


def _data():
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(8, 6, generator=gen, dtype=DT) for _ in range(STEPS)]
    ys = [torch.randn(8, generator=gen, dtype=DT) for _ in range(STEPS)]
    return xs, ys


def _tiny(seed=0):
    torch.manual_seed(seed)
    return Tiny().to(DT)


def _step(model, opts, x, y, divide_by=8):
    opts.zero_grad()
    (((model(x) - y) ** 2).sum() / divide_by).backward()
    opts.step()


def _reference_params(name):
    model = _tiny()
    model.mix._no_weight_decay = True
    opts = build_neollm_optimizers([model], OPT_CASES[name], parallel_dims=None)
    xs, ys = _data()
    for x, y in zip(xs, ys):
        _step(model, opts, x, y)
    return {n: p.detach() for n, p in model.named_parameters()}


def _sharded(mesh):
    from torch.distributed.fsdp import FSDPModule, fully_shard

    model = _tiny()
    for module in (model.up, model.down, model):
        fully_shard(module, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):  # as NeoLLM's parallelize on gloo: plain sums
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    model.mix._no_weight_decay = True  # flags go on the sharded parameters
    return model


def _fsdp_worker(rank, world, init_file, ckpt_dir):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    import neollm.optim.conda as conda_mod
    from gloo_ranks import gloo_rank

    with gloo_rank(rank, world, init_file):
        fsdp_mesh = init_device_mesh("cpu", (world,))
        # HSDP layout (Replicate(), Shard(0)) on a (1 replica x 2 shards) mesh
        hsdp_mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp_replicate", "fsdp"))
        xs, ys = _data()
        half = slice(rank * 4, rank * 4 + 4)
        # "gathered": Conda's fallback for other layouts (gather g, m, v), forced here
        cases = [("AdEMAMix", "fsdp"), ("Conda", "fsdp"), ("Conda", "hsdp"), ("Conda", "gathered"),
                 ("Conda-loop", "fsdp"), ("Conda-loop", "hsdp"), ("Conda-latest", "fsdp"),
                 ("Conda-latest", "gathered"), ("Conda-latest-loop", "fsdp")]
        for name, layout in cases:
            expected = _reference_params(name)
            original = conda_mod._row_sharded
            if layout == "gathered":
                conda_mod._row_sharded = lambda p: False
            try:
                mesh = hsdp_mesh if layout == "hsdp" else fsdp_mesh
                model = _sharded(mesh)
                assert isinstance(model.down.weight, DTensor)
                assert model.down.weight.placements[-1] == Shard(0)
                if rank == 1:
                    assert model.row.to_local().shape[0] == 0 and model.down.weight.to_local().shape[0] == 2
                opts = build_neollm_optimizers([model], OPT_CASES[name], parallel_dims=None)
                for i in range(STEPS):
                    if i == SAVE_AT and layout == "fsdp":
                        # DCP checkpoint at step 2, restored into a fresh sharded model: same steps 3-4
                        path = os.path.join(ckpt_dir, name)
                        dcp.save({"model": get_model_state_dict(model), "optimizer": opts}, checkpoint_id=path)
                        restored = _sharded(mesh)
                        opts2 = build_neollm_optimizers([restored], OPT_CASES[name], parallel_dims=None)
                        state = {"model": get_model_state_dict(restored), "optimizer": opts2}
                        dcp.load(state, checkpoint_id=path)
                        set_model_state_dict(restored, state["model"])
                        for j in range(SAVE_AT, STEPS):
                            _step(restored, opts2, xs[j][half], ys[j][half])
                    _step(model, opts, xs[i][half], ys[i][half])
                for n, p in model.named_parameters():
                    got = p.full_tensor()
                    tol = 1e-12 if name == "AdEMAMix" else 1e-10  # Conda: float32 SVD of a differently-summed m
                    torch.testing.assert_close(got, expected[n], rtol=tol, atol=tol,
                                               msg=lambda m, n=n: f"{name} {layout} {n}: {m}")
                    assert not torch.allclose(got, _tiny().get_parameter(n).detach()), n
                if layout == "fsdp":
                    for (n, p), q in zip(model.named_parameters(), restored.parameters()):
                        assert torch.equal(p.to_local(), q.to_local()), f"{name} resumed {n}"
            finally:
                conda_mod._row_sharded = original


def test_two_ranks_fsdp_match_one_process(tmp_path):
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "pg_init"), str(tmp_path / "ckpt")), nprocs=2, join=True)


# ----------------------------------------------------------------------------- the real trainer


@pytest.mark.slow
def test_trainer_trains_with_ademamix(tmp_path):
    """./run_train.sh with AdEMAMix + the start-LR schedule (Conda is covered above; one trainer
    run keeps this file fast)."""
    from conftest import losses_by_step, require_prepared_assets, run_trainer

    require_prepared_assets()
    result = run_trainer(
        "--optimizer.name", "AdEMAMix", "--optimizer.lr", "3e-3", "--optimizer.beta3", "0.999",
        "--optimizer.alpha", "5", "--optimizer.t_alpha", "4", "--optimizer.t_beta3", "4",
        "--lr_scheduler.start_lr_factor", "0.5", "--lr_scheduler.warmup_steps", "2",
        "--training.steps", "6", "--checkpoint.no-enable", "--job.dump_folder", str(tmp_path / "run"),
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    losses = losses_by_step(result.stdout)
    assert sorted(losses) == list(range(1, 7)), result.stdout[-3000:]
    assert losses[6] < losses[1] - 0.5, losses
