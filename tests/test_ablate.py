"""tools/ablate.py: variants differ only in their module, the grid runs through the real trainer
on CPU, writes its results, and resumes (finished variants skipped, a partly run one continued)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch

from conftest import REPO, load_tool, require_prepared_assets

DEBUG = "train_configs/debug.toml"
TINY = ["--steps", "2", "--val-freq", "1", "--val-steps", "1", "--set", "training.seq_len=32",
        "--set", "training.global_batch_size=2", "--set", "training.local_batch_size=2",
        "--set", "checkpoint.interval=1"]


@pytest.fixture(scope="module")
def ablate():
    return load_tool("ablate")


def plan(ablate, *argv: str, out="/tmp/unused"):
    return ablate.plan(ablate.build_parser().parse_args(["--out", str(out), *argv]))


def job_and_args(ablate, argv):
    from neollm.ablation.grid import model_args_for

    job = ablate._parse(argv)
    return job, model_args_for(job)


def param_names(args) -> set[str]:
    from neollm.model.model import NeoLLM

    with torch.device("meta"):
        return {n for n, _ in NeoLLM(args).named_parameters()}


def job_dict(job) -> dict:
    """The parsed run config without what a variant may change (its folder, overrides, seed)."""
    d = dataclasses.asdict(job)
    d["job"].pop("dump_folder")
    d["model"].pop("overrides")
    d["debug"].pop("seed")
    return d


def changed_fields(a, b) -> set[str]:
    return {f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)}


def techniques_toml(tmp_path):
    """debug.toml with two technique switches on through [model] overrides."""
    path = tmp_path / "techniques.toml"
    path.write_text((REPO / DEBUG).read_text().replace(
        'flavor = "debug"', 'flavor = "debug"\noverrides = ["gpas=true", "mlp_type=polynorm"]'))
    return str(path)


def test_vary_changes_only_the_mixer(ablate):
    runs = plan(ablate, "--config", DEBUG, "--vary", "layer_pattern=A,DA,D", "--seeds", "0,1", *TINY)
    # DA is the flavor's own pattern: run once, as the base; the base is repeated at seed 1
    assert [v.name for v, _ in runs] == ["base", "base@seed1", "layer_pattern=A", "layer_pattern=D"]
    jobs = {v.name: job_and_args(ablate, argv) for v, argv in runs}
    base_job, base_args = jobs["base"]
    for name, (job, args) in jobs.items():
        assert job_dict(job) == job_dict(base_job), name  # same data, steps, batch, LR, validation
        assert job.validation.enable and (job.validation.freq, job.validation.steps) == (1, 1)
        assert job.training.steps == 2 and job.training.seq_len == 32
    assert changed_fields(jobs["layer_pattern=A"][1], base_args) == {"layer_pattern"}
    assert changed_fields(jobs["base@seed1"][1], base_args) == set()
    assert (jobs["base"][0].debug.seed, jobs["base@seed1"][0].debug.seed, jobs["layer_pattern=D"][0].debug.seed) == (0, 1, 0)
    # only the mixer's own parameters differ: GDN's in layers 0 and 2 become attention's
    gone = param_names(base_args) - param_names(jobs["layer_pattern=A"][1])
    new = param_names(jobs["layer_pattern=A"][1]) - param_names(base_args)
    assert {n.split(".mixer.")[0] for n in gone | new} == {"layers.0", "layers.2"}
    assert "layers.0.mixer.A_log" in gone and "layers.0.mixer.wq.weight" in new


def test_leave_one_out_and_add_one_touch_one_technique(ablate, tmp_path):
    config = techniques_toml(tmp_path)
    loo = {v.name: job_and_args(ablate, argv) for v, argv in plan(ablate, "--config", config, "--leave-one-out", *TINY)}
    assert set(loo) == {"base", "-gpas", "-mlp_type"}
    base = loo["base"][1]
    assert (base.gpas, base.mlp_type) == (True, "polynorm")  # the config's own overrides are kept
    assert changed_fields(loo["-gpas"][1], base) == {"gpas"}
    assert changed_fields(loo["-mlp_type"][1], base) == {"mlp_type"}
    assert param_names(base) - param_names(loo["-gpas"][1]) == {f"layers.{i}.gpas.gate" for i in range(4)}
    assert {n.split(".", 2)[2] for n in param_names(base) - param_names(loo["-mlp_type"][1])} == {
        "mlp.act.weight", "mlp.act.bias"}
    assert param_names(loo["-gpas"][1]) <= param_names(base)

    add = {v.name: (v, *job_and_args(ablate, argv)) for v, argv in plan(ablate, "--config", config, "--add-one", *TINY)}
    assert set(add) == {"plain", "+gpas", "+mlp_type"} and add["plain"][0].reference
    plain = add["plain"][2]
    assert (plain.gpas, plain.mlp_type) == (False, "swiglu")
    assert changed_fields(add["+gpas"][2], plain) == {"gpas"}
    assert param_names(add["+gpas"][2]) - param_names(plain) == {f"layers.{i}.gpas.gate" for i in range(4)}


def test_add_one_on_the_135m_flavor_starts_from_plain():
    from neollm.ablation import grid
    from neollm.model.args import FLAVORS
    from neollm.model.params import technique_switches

    base = FLAVORS["neollm_135m"]
    variants = grid.add_one(base)
    assert dataclasses.replace(base, **variants[0].model) == FLAVORS["plain"]
    assert [v.name for v in variants[1:]] == [f"+{s}" for s in technique_switches(base)]
    for v in variants[1:]:
        args = dataclasses.replace(base, **v.model)
        on = changed_fields(args, FLAVORS["plain"])
        settings = {d for d, needs in grid.NEEDS.items() if v.name[1:] in needs}  # e.g. momentum_first
        assert v.name[1:] in on and on - {v.name[1:]} <= settings, (v.name, on)
    loo = grid.leave_one_out(base)
    for v in loo:  # the switch, and its settings back at their defaults (simplegpt_scope with simplegpt)
        settings = {d for d, needs in grid.NEEDS.items() if v.name[1:] in needs}
        changed = changed_fields(dataclasses.replace(base, **v.model), base)
        assert v.name[1:] in changed and changed - {v.name[1:]} <= settings, (v.name, changed)
    # a switch another one needs goes off with it: -fan_ratio also drops fan_on_gdn
    fan_gdn = dataclasses.replace(base, fan_on_gdn=True)
    assert grid.switch_off(fan_gdn, "fan_ratio") == {"fan_ratio": 0.0, "fan_on_gdn": False}
    assert "fan_on_gdn" not in technique_switches(fan_gdn)  # a setting, not its own switch
    # a switch that needs another: +polynorm_exclusive brings mlp_type = polynorm along
    exclusive = dataclasses.replace(base, polynorm_exclusive=True)
    plus = {v.name: v.model for v in grid.add_one(exclusive)}["+polynorm_exclusive"]
    assert changed_fields(dataclasses.replace(exclusive, **plus), FLAVORS["plain"]) == {
        "polynorm_exclusive", "mlp_type"}
    assert grid.switch_off(exclusive, "mlp_type") == {"mlp_type": "swiglu", "polynorm_exclusive": False}


def test_seed_does_not_change_the_data_order(ablate):
    """[debug] seed changes the initialisation; the batches come in the same order."""
    from neollm.data.loader import build_neollm_dataloader
    from neollm.tokenizer import build_neollm_tokenizer

    require_prepared_assets()
    batches = []
    for seed in (0, 1):
        job = ablate._parse(["--job.config_file", DEBUG, "--training.seq_len", "32", "--debug.seed", str(seed)])
        torch.manual_seed(seed)  # what torchtitan's set_determinism does with the seed
        loader = build_neollm_dataloader(1, 0, build_neollm_tokenizer(job), job)
        it = iter(loader)
        batches.append([next(it)[0]["input"] for _ in range(3)])
    assert all(torch.equal(a, b) for a, b in zip(*batches))


def test_significance_against_the_reference_seed_spread():
    from neollm.ablation.report import significance

    def run(name, loss, reference=False):
        return {"final_val_loss": loss, "variant": {"name": name, "reference": reference}}

    sig = significance([run("base", 3.00, True), run("base@seed1", 3.02, True), run("base@seed2", 3.04, True),
                        run("a", 3.10), run("b", 3.03), run("c", 2.97)])
    assert sig["reference_mean"] == pytest.approx(3.02) and sig["spread"] == pytest.approx(0.04)
    verdicts = {k: v["significant"] for k, v in sig["rows"].items()}
    assert verdicts == {"base": "reference", "base@seed1": "reference", "base@seed2": "reference",
                        "a": "yes", "b": "no", "c": "yes"}
    assert sig["rows"]["a"]["delta"] == pytest.approx(0.08)
    one = significance([run("base", 3.0, True), run("a", 3.5)])
    assert one["spread"] is None and one["rows"]["a"]["significant"] == "spread unknown"


def test_bad_requests_are_one_clear_error(ablate, tmp_path, capsys):
    from neollm.errors import ConfigError

    with pytest.raises(ConfigError, match="'layer_patern' is neither a model field.*did you mean layer_pattern"):
        plan(ablate, "--config", DEBUG, "--vary", "layer_patern=A")
    with pytest.raises(ConfigError, match="does not end at step 2"):
        plan(ablate, "--config", DEBUG, "--vary", "layer_pattern=A", "--steps", "2", "--val-freq", "3")
    with pytest.raises(ConfigError, match="choose one mode"):
        plan(ablate, "--config", DEBUG, "--vary", "layer_pattern=A", "--leave-one-out")
    with pytest.raises(ConfigError, match="no technique switched on"):
        plan(ablate, "--config", DEBUG, "--leave-one-out")
    # a variant that cannot build is refused before anything trains
    rc = ablate.main(["--config", DEBUG, "--out", str(tmp_path / "x"), "--vary", "n_layers=3", *TINY])
    assert rc == 2 and "variant n_layers=3: model args: layer_pattern 'DA'" in capsys.readouterr().err
    assert not list((tmp_path / "x").glob("*/train.log"))


def test_dry_run_prints_one_command_per_variant(ablate, tmp_path, capsys):
    toml = tmp_path / "variants.toml"
    toml.write_text('[variants.attn]\noverrides = ["layer_pattern=A"]\ndescription = "attention only"\n'
                    '[variants.hot]\nset = ["optimizer.lr=1e-2"]\n')
    assert ablate.main(["--config", DEBUG, "--out", str(tmp_path / "o"), "--variants", str(toml), "--dry-run", *TINY]) == 0
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if line.startswith("./run_train.sh")]
    assert len(commands) == 3 and "# attn: attention only" in out
    assert "--model.overrides layer_pattern=A" in commands[1] and "--optimizer.lr 1e-2" in commands[2]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_grid_runs_reports_and_resumes(ablate, tmp_path, capsys):
    require_prepared_assets()
    out = tmp_path / "grid"
    argv = ["--config", DEBUG, "--out", str(out), "--vary", "layer_pattern=A,D", *TINY]

    # interrupted after two variants
    assert ablate.main([*argv, "--max-runs", "2"]) == 0
    assert "not finished: layer_pattern=D" in capsys.readouterr().err
    first = json.loads((out / "layer_pattern=A" / "result.json").read_text())
    base_marker = (out / "base" / "result.json").stat().st_mtime_ns
    # make layer_pattern=A "partly run": its step-2 checkpoint and its marker gone, step 1 kept
    (out / "layer_pattern=A" / "result.json").unlink()
    shutil.rmtree(out / "layer_pattern=A" / "checkpoint" / "step-2")

    assert ablate.main(argv) == 0
    printed = capsys.readouterr().out
    assert "base: finished earlier, skipped" in printed
    assert (out / "base" / "result.json").stat().st_mtime_ns == base_marker
    assert (out / "base" / "train.log").read_text().count("=== ") == 1  # launched once in all
    log = (out / "layer_pattern=A" / "train.log").read_text()
    assert log.count("=== ") == 2 and "resume: ./run_train.sh" in log and "Training starts at step 2" in log
    resumed = json.loads((out / "layer_pattern=A" / "result.json").read_text())
    assert resumed["resumed"] and resumed["final_val_loss"] == pytest.approx(first["final_val_loss"], rel=1e-5)

    results = json.loads((out / "results.json").read_text())
    runs = {r["variant"]["name"]: r for r in results["runs"]}
    assert list(runs) == ["base", "layer_pattern=A", "layer_pattern=D"] and results["missing"] == []
    for name, r in runs.items():
        assert r["tokens"] == 2 * 2 * 32 and [p[0] for p in r["val_curve"]] == [1, 2]
        assert 9.0 < r["final_val_loss"] < 12.5 and r["best_val_loss"] <= r["final_val_loss"]
        assert math.isfinite(r["tps_median"]) and r["peak_memory_gib"] > 0
        assert r["delta"] == pytest.approx(r["final_val_loss"] - runs["base"]["final_val_loss"])
    assert runs["layer_pattern=A"]["params"] < runs["base"]["params"] < runs["layer_pattern=D"]["params"]
    assert results["reference"]["spread"] is None and runs["layer_pattern=D"]["significant"] == "spread unknown"
    md = (out / "results.md").read_text()
    assert "python tools/ablate.py --config train_configs/debug.toml" in md and "git commit" in md
    assert md.count("\n| layer_pattern=") == 2 and "unknown (one seed" in md
    for png in ("val_loss.png", "delta.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and (out / png).stat().st_size > 10_000
    from neollm.hf.convert import model_args_from_json  # what convert_to_hf --flavor X.json reads

    assert model_args_from_json(out / "layer_pattern=D" / "model_args.json").layer_pattern == "D"


def test_same_network_flags_a_switch_without_effect_and_nothing_else():
    """learnable_multipliers does nothing while simplegpt is on (linear.py): such a variant is the
    reference's network again; momentum (same parameters, other maths) and gpas are not."""
    import dataclasses

    from neollm.ablation.grid import same_network
    from neollm.ablation.report import significance
    from neollm.model.args import FLAVORS

    base = dataclasses.replace(FLAVORS["debug"], simplegpt=True, learnable_multipliers=True,
                               layer_pattern="A", vocab_size=512, max_seq_len=32)
    assert same_network(base, dataclasses.replace(base, learnable_multipliers=False))
    assert not same_network(base, dataclasses.replace(base, momentum_gamma=0.1))
    assert not same_network(base, dataclasses.replace(base, gpas=True))

    def run(name, reference, loss, **extra):
        return {"variant": {"name": name, "reference": reference}, "final_val_loss": loss, **extra}

    sig = significance([run("base", True, 5.0), run("base@1", True, 5.1),
                        run("-lm", False, 4.5, same_network_as_reference=True), run("-x", False, 4.5)])
    assert sig["rows"]["-lm"]["significant"].startswith("no-op")
    assert sig["rows"]["-x"]["significant"] == "yes"
