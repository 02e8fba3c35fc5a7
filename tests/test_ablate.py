"""tools/ablate.py: variants differ only in their module, the grid runs through the real trainer
on CPU, writes its results, and resumes (finished variants skipped, a partly run one continued)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import pytest
import torch

from conftest import REPO, load_tool, require_prepared_assets

from neollm.ablation import bench
from neollm.errors import ConfigError

DEBUG = "train_configs/debug.toml"
TINY = ["--steps", "2", "--val-freq", "1", "--val-steps", "1", "--set", "training.seq_len=32",
        "--set", "training.global_batch_size=2", "--set", "training.local_batch_size=2",
        "--set", "checkpoint.interval=1"]


@pytest.fixture(scope="module")
def ablate():
    return load_tool("ablate")


def plan(ablate, *argv: str, out="/tmp/unused"):
    from neollm.ablation import bench

    return bench.plan(ablate.build_parser().parse_args(["--out", str(out), *argv]))


def job_and_args(ablate, argv):
    from neollm.ablation.grid import model_args_for

    from neollm.ablation.bench import parse_job

    job = parse_job(argv)
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


def test_seeds_for_repeats_only_the_named_variants(ablate):
    runs = plan(ablate, "--config", DEBUG, "--vary", "layer_pattern=A,D", "--seeds", "0,1,2",
                "--seeds-for=layer_pattern=D", *TINY)
    assert [(v.name, v.seed) for v, _ in runs] == [
        ("base", 0), ("base@seed1", 1), ("base@seed2", 2), ("layer_pattern=A", 0),
        ("layer_pattern=D", 0), ("layer_pattern=D@seed1", 1), ("layer_pattern=D@seed2", 2)]
    assert {v.group for v, _ in runs if v.name.startswith("layer_pattern=D")} == {"layer_pattern=D"}
    with pytest.raises(ConfigError, match=r"--seeds-for names \['-mea'\].*layer_pattern=A"):
        plan(ablate, "--config", DEBUG, "--vary", "layer_pattern=A,D", "--seeds", "0,1",
             "--seeds-for=-mea", *TINY)
    with pytest.raises(ConfigError, match="give two or more"):
        plan(ablate, "--config", DEBUG, "--vary", "layer_pattern=A,D", "--seeds-for=layer_pattern=D", *TINY)
    # a variant of two --vary axes has a comma in its name: given whole, it is taken whole
    runs = plan(ablate, "--config", DEBUG, "--vary", "layer_pattern=A,D", "--vary", "gpas=true", "--seeds", "0,1",
                "--seeds-for", "layer_pattern=A,gpas=true", *TINY)
    assert [v.name for v, _ in runs if v.seed == 1] == ["base@seed1", "layer_pattern=A,gpas=true@seed1"]


def test_equal_time_scales_each_variants_steps_by_its_measured_speed(ablate, tmp_path):
    """--equal-time GRID: every variant trains the reference's seconds with its whole schedule, its
    steps = the reference's x its tok/s / the reference's in GRID (rounded to the validation interval),
    the warm-up at the same fraction; GRIDs whose speeds are not each run's own are refused."""
    from neollm.ablation import report

    def run(name, tps, group=None, reference=False, sharing=1, tokens_per_step=1000):
        return {"variant": {"name": name, "group": group or name, "reference": reference}, "tps_median": tps,
                "runs_sharing_gpu": sharing, "final_step": 40, "tokens": 40 * tokens_per_step}

    grid_dir = tmp_path / "measured"
    grid_dir.mkdir()
    runs = [run("base", 1000.0, reference=True), run("base@seed1", 1020.0, "base", True),
            run("layer_pattern=A", 1515.0), run("layer_pattern=D", 380.0, tokens_per_step=500)]
    (grid_dir / "results.json").write_text(json.dumps({"runs": runs}))
    planned = plan(ablate, "--config", DEBUG, "--vary", "layer_pattern=A,D", "--seeds", "0,1", "--steps", "40",
                   "--val-freq", "4", "--equal-time", str(grid_dir), out=tmp_path / "equal")
    jobs = {v.name: job_and_args(ablate, argv)[0] for v, argv in planned}
    # speeds in steps per second: the reference 1.01 (its seeds' mean), A 1.515 (1.50x -> 60 steps), D at
    # half the tokens per step 0.76 (0.752x -> 30.1 -> 32, a multiple of 4); warm-ups 5/40 of each
    assert {n: (j.training.steps, j.lr_scheduler.warmup_steps) for n, j in jobs.items()} == {
        "base": (40, 5), "base@seed1": (40, 5), "layer_pattern=A": (60, 8), "layer_pattern=D": (32, 4)}
    assert "60 steps = 1.50x the reference's (speed 1.50x)" in next(
        v.what for v, _ in planned if v.name == "layer_pattern=A")
    with pytest.raises(ConfigError, match="another --out than GRID"):
        plan(ablate, "--config", DEBUG, "--vary", "layer_pattern=A", "--steps", "40", "--equal-time",
             str(grid_dir), out=grid_dir)
    # the report says so, and its verdict column names the delta an equal-time grid measures
    opts = ablate.build_parser().parse_args(["--config", DEBUG, "--out", "x", "--vary", "layer_pattern=A",
                                             "--equal-time", str(grid_dir)])
    head = bench.header(opts, [], jobs["base"], "1")
    assert "40 steps times its steps per second" in head["equal time"]
    with pytest.MonkeyPatch.context() as env:  # the job's kernel switches are part of its record
        for name in [k for k in os.environ if k.startswith("NEOLLM_") and k != "NEOLLM_COMMIT"]:
            env.delenv(name)
        assert "environment" not in bench.header(opts, [], jobs["base"], "1")
        env.setenv("NEOLLM_LUCID_DIAGONAL", "substitute")
        assert bench.header(opts, [], jobs["base"], "1")["environment"] == "NEOLLM_LUCID_DIAGONAL=substitute"

    def finished(name, loss, reference=False):
        return {"variant": {"name": name, "group": name, "reference": reference, "what": "", "seed": 0},
                "params": 1, "tokens": 1000, "final_val_loss": loss, "best_val_loss": loss, "tps_median": 100.0,
                "peak_memory_gib": 1.0, "val_curve": [[1, 1000, loss]]}

    results = [finished("base", 3.0, True), finished("layer_pattern=A", 2.9)]
    for header, label in ((head, "delta at equal time (whole schedules)"), ({}, "delta at equal tokens")):
        report.write_markdown(tmp_path / "r.md", header, results, report.significance(results), [])
        assert f"| variant | seeds | {label} |" in (tmp_path / "r.md").read_text()
    (grid_dir / "results.json").write_text(json.dumps({"runs": runs[:3]}))
    with pytest.raises(ConfigError, match=r"no finished run of layer_pattern=D there.*'layer_pattern=A'"):
        plan(ablate, "--config", DEBUG, "--vary", "layer_pattern=A,D", "--steps", "40", "--val-freq", "4",
             "--equal-time", str(grid_dir))
    (grid_dir / "results.json").write_text(json.dumps({"runs": [*runs[:3], run("layer_pattern=D", 380.0, sharing=2)]}))
    with pytest.raises(ConfigError, match="layer_pattern=D shared a GPU.*--parallel 1"):
        plan(ablate, "--config", DEBUG, "--vary", "layer_pattern=A,D", "--steps", "40", "--val-freq", "4",
             "--equal-time", str(grid_dir))
    (grid_dir / "results.json").write_text(json.dumps({"runs": [{**runs[0], "tps_median": None}, *runs[2:]]}))
    with pytest.raises(ConfigError, match="the reference base has no measured speed"):
        plan(ablate, "--config", DEBUG, "--vary", "layer_pattern=A", "--steps", "40", "--equal-time",
             str(grid_dir))
    with pytest.raises(ConfigError, match="results.json not found"):
        plan(ablate, "--config", DEBUG, "--vary", "layer_pattern=A", "--steps", "40", "--equal-time",
             str(tmp_path / "none"))


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
    from neollm.ablation.bench import parse_job
    from neollm.data.loader import build_neollm_dataloader
    from neollm.tokenizer import build_neollm_tokenizer

    require_prepared_assets()
    batches = []
    for seed in (0, 1):
        job = parse_job(["--job.config_file", DEBUG, "--training.seq_len", "32", "--debug.seed", str(seed)])
        torch.manual_seed(seed)  # what torchtitan's set_determinism does with the seed
        loader = build_neollm_dataloader(1, 0, build_neollm_tokenizer(job), job)
        it = iter(loader)
        batches.append([next(it)[0]["input"] for _ in range(3)])
    assert all(torch.equal(a, b) for a, b in zip(*batches))


def test_significance_against_the_reference_seed_noise():
    """The noise rule of neollm/ablation/stats.py, with thresholds worked out by hand."""
    from neollm.ablation.report import significance

    def run(name, loss, reference=False, group=None):
        return {"final_val_loss": loss, "variant": {"name": name, "reference": reference, "group": group or name}}

    ref = [run("base", 3.00, True), run("base@seed1", 3.02, True, "base"), run("base@seed2", 3.04, True, "base")]
    sig = significance([*ref, run("a", 3.15), run("b", 3.03), run("c", 2.90),
                        run("d", 3.10), run("d@seed1", 3.12, group="d")])
    assert sig["reference_mean"] == pytest.approx(3.02) and sig["sd"] == pytest.approx(0.02)
    assert sig["spread"] == pytest.approx(0.04)
    # one seed vs 3: t(0.975, 2) = 4.303, se = 0.02 * sqrt(1 + 1/3)
    assert sig["verdicts"]["a"]["threshold"] == pytest.approx(4.303 * 0.02 * math.sqrt(4 / 3))
    # two seeds vs 3: pooled variance (2 * 0.02^2 + 1 * 0.0002) / 3, t(0.975, 3) = 3.182
    assert sig["verdicts"]["d"]["threshold"] == pytest.approx(
        3.182 * math.sqrt((2 * 0.0004 + 0.0002) / 3) * math.sqrt(1 / 3 + 1 / 2))
    assert sig["verdicts"]["d"]["delta"] == pytest.approx(0.09) and sig["verdicts"]["d"]["runs"] == 2
    verdicts = {k: v["quality"] for k, v in sig["verdicts"].items()}
    assert verdicts == {"a": "hurts", "b": "within noise", "c": "helps", "d": "hurts"}
    assert sig["rows"]["base@seed1"]["significant"] == "reference" and sig["rows"]["d@seed1"]["significant"] == "hurts"
    # 3.10 alone would be inside the one-seed threshold (0.0994): the second seed is what tells
    assert significance([*ref, run("d", 3.10)])["verdicts"]["d"]["quality"] == "within noise"
    one = significance([run("base", 3.0, True), run("a", 3.5)])
    assert one["sd"] is None and one["verdicts"]["a"]["quality"] == "noise unknown"
    same = significance([run("base", 3.0, True), run("base@1", 3.0, True, "base"), run("a", 3.5)])
    assert same["verdicts"]["a"]["quality"] == "noise unknown"  # identical seeds: no noise estimate


def test_t_quantiles_and_seed_counts():
    from neollm.ablation import stats

    assert stats.t975(1) == 12.706 and stats.t975(2) == 4.303 and stats.t975(9) == 2.262
    assert stats.t975(22) == stats.t975(20) and stats.t975(1000) == 1.960  # untabulated: errs wide
    with pytest.raises(ValueError):
        stats.t975(0)
    # two seeds each: t(2) * sd * sqrt(2/2) = 4.303 sd; three: t(4) * sd * sqrt(2/3) = 2.267 sd
    assert stats.required_seeds(4.4, 1.0) == 2 and stats.required_seeds(4.2, 1.0) == 3
    assert stats.required_seeds(2.2, 1.0) == 4 and stats.required_seeds(0.001, 1.0) is None


def test_equal_time_verdict_and_the_technique_reading():
    """A slower variant that is better per token can still lose at equal time; a leave-one-out
    row's verdicts are said of the technique it removes."""
    from neollm.ablation import stats
    from neollm.ablation.report import significance

    assert stats.interpolate([(1, 5.0), (3, 4.0)], 2) == pytest.approx(4.5)
    with pytest.raises(ValueError):
        stats.interpolate([(1, 5.0), (3, 4.0)], 4)
    # a run ending before the other's first validation: that one is at its initial loss until then
    assert stats.equal_time_delta([(1, 9.0), (2, 7.0)], [(5, 9.5), (10, 6.0)]) == {"seconds": 2, "delta": 7.0 - 9.5}

    def run(name, losses, tps, reference=False, group=None):
        curve = [[step, step * 1000, loss] for step, loss in zip((1, 2, 3), losses)]
        return {"final_val_loss": losses[-1], "val_curve": curve, "tps_median": tps,
                "variant": {"name": name, "reference": reference, "group": group or name}}

    ref = [run("base", [5.0, 4.0, 3.0], 1000, True), run("base@seed1", [5.0, 4.0, 3.02], 1000, True, "base")]
    # "-x" removes a technique: 2x faster per token and 0.3 worse at equal tokens
    sig = significance([*ref, run("-x", [5.2, 4.2, 3.31], 2000), run("+y", [4.5, 3.5, 2.7], 500)])
    fast, slow = sig["verdicts"]["-x"], sig["verdicts"]["+y"]
    assert fast["time_per_token_vs_ref"] == pytest.approx(0.5) and slow["time_per_token_vs_ref"] == pytest.approx(2.0)
    # -x ends at 1.5 s (4.2 -> 3.31 between 1 and 1.5 s); the reference at 1.5 s: 4.5 (mean of seeds)
    assert fast["equal_time_s"] == pytest.approx(1.5) and fast["delta_equal_time"] == pytest.approx(3.31 - 4.5)
    assert fast["quality"] == "hurts" and fast["time"] == "worth its time"
    assert fast["reading"] == "x: helps; not worth its time (judged by its removal)"
    # +y: better at equal tokens (2.7 vs 3.01, noise threshold 0.22); at the reference's 3 s it is
    # at 4.0 (between 2 and 4 s)
    assert slow["delta_equal_time"] == pytest.approx(4.0 - 3.01)
    assert (slow["quality"], slow["time"]) == ("helps", "not worth its time")
    assert slow["reading"] == "y: helps; not worth its time"


def test_within_noise_verdicts_say_how_many_seeds_would_resolve_them(tmp_path):
    from neollm.ablation import report, stats

    def run(name, loss, reference=False, group=None):
        return {"variant": {"name": name, "group": group or name, "reference": reference, "what": "", "seed": 0},
                "params": 1, "tokens": 1000, "final_val_loss": loss, "best_val_loss": loss, "tps_median": 100.0,
                "peak_memory_gib": 1.0, "val_curve": [[1, 1000, loss]]}

    results = [run("base", 3.0, True), run("base@seed1", 3.02, True, "base"), run("base@seed2", 3.01, True, "base"),
               run("-a", 3.03), run("-b", 3.5)]
    sig = report.significance(results)
    near, far = sig["verdicts"]["-a"], sig["verdicts"]["-b"]
    assert near["quality"] == "within noise" and far["quality"] == "hurts" and far["seeds_to_resolve"] is None
    assert near["seeds_to_resolve"] == stats.required_seeds(0.02, 0.01) == 4  # t(6) 2.45 x 0.01 x sqrt(1/2) < 0.02
    report.write_markdown(tmp_path / "r.md", {}, results, sig, [])
    assert "a: within noise; even at equal time (judged by its removal); 4 seeds a side would resolve a delta of " \
           "+0.020\n" in (tmp_path / "r.md").read_text()


def test_an_equal_time_report_names_runs_that_missed_the_references_seconds(tmp_path):
    """An --equal-time grid takes its steps from another grid's speeds; a run that trained at another
    speed here (52 s against 34) is named, one within the tolerance is not, and a grid at equal
    tokens never gets the list."""
    from neollm.ablation import report

    def run(name, tokens, tps, reference=False, group=None):
        return {"variant": {"name": name, "group": group or name, "reference": reference, "what": "", "seed": 0},
                "params": 1, "tokens": tokens, "final_val_loss": 3.0, "best_val_loss": 3.0, "tps_median": tps,
                "peak_memory_gib": 1.0, "val_curve": [[1, tokens, 3.0]]}

    results = [run("base", 3400, 100.0, True), run("base@seed1", 3400, 100.0, True, "base"),
               run("slowed", 5200, 100.0), run("on_time", 3600, 100.0)]
    assert report.off_equal_time(results) == [("slowed", 52.0, 34.0)]
    sig = report.significance(results)
    report.write_markdown(tmp_path / "t.md", {"equal time": "from another grid"}, results, sig, [])
    text = (tmp_path / "t.md").read_text()
    assert "- slowed: 52 s against 34 s (1.53x)" in text and " s against " not in text.replace("- slowed: 52 s against", "")
    report.write_markdown(tmp_path / "e.md", {}, results, sig, [])
    assert "Off equal time" not in (tmp_path / "e.md").read_text()


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
    out, err = capsys.readouterr()
    commands = [line for line in out.splitlines() if line.startswith("./run_train.sh")]
    assert len(commands) == 3 and "# attn: attention only" in out
    assert "--model.overrides layer_pattern=A" in commands[1] and "--optimizer.lr 1e-2" in commands[2]
    assert not (tmp_path / "o").exists()
    assert "equals the base config" not in err  # no unnamed variant from an empty --vary


@pytest.mark.slow
def test_grid_runs_reports_and_resumes(ablate, tmp_path, capsys):
    require_prepared_assets()
    out = tmp_path / "grid"
    argv = ["--config", DEBUG, "--out", str(out), "--vary", "layer_pattern=A,D", "--no-compile",
            "--parallel", "1", "--keep-checkpoints", *TINY]

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
    assert results["reference"]["sd"] is None and runs["layer_pattern=D"]["significant"] == "noise unknown"
    assert results["verdicts"]["layer_pattern=D"]["time_per_token_vs_ref"] > 0
    md = (out / "results.md").read_text()
    assert "python tools/ablate.py --config train_configs/debug.toml" in md and "git commit" in md
    assert md.count("\n| layer_pattern=") == 4 and "unknown (one seed" in md  # runs and verdicts
    assert "2 steps x 64 tokens = 128 tokens per run" in md and "eager" in md
    for png in ("val_loss.png", "val_loss_time.png", "delta.png"):
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

    sig = significance([run("base", True, 5.0), run("base@1", True, 5.01),
                        run("-lm", False, 4.5, same_network_as_reference=True), run("-x", False, 4.5)])
    assert sig["rows"]["-lm"]["significant"].startswith("no-op")
    assert sig["rows"]["-x"]["significant"] == "helps"


def test_budget_warmup_and_runs_per_gpu(tmp_path):
    """One epoch of the shards in whole validation intervals; the warm-up keeps its fraction;
    runs per GPU from a measured peak."""
    import types

    from neollm.ablation import schedule
    from neollm.errors import ConfigError

    from neollm.data.shards import FORMAT, FORMAT_VERSION

    (tmp_path / "index.json").write_text(json.dumps({"format": FORMAT, "version": FORMAT_VERSION,
                                                     "splits": {"train": {"tokens": 18_910_310}}}))
    job = types.SimpleNamespace(training=types.SimpleNamespace(
        dataset="shards", dataset_path=str(tmp_path), global_batch_size=64, seq_len=512))
    assert schedule.epoch_steps(job, 80) == 640  # 577.1 steps -> 578 -> 8 intervals of 80
    assert schedule.epoch_steps(job, 1) == 578
    job.training.dataset_path = str(tmp_path / "none")
    with pytest.raises(ConfigError, match="tokenize_data.py, or give --steps N"):
        schedule.epoch_steps(job, 80)
    job.training.dataset = "text"
    assert schedule.epoch_steps(job, 80) is None
    assert schedule.scaled_warmup(8, 80, 640) == 64 and schedule.scaled_warmup(5, 40, 2) == 1
    assert schedule.scaled_warmup(0, 80, 640) == 0
    # 10 GiB peak: 10 * 1.2 + 1.5 = 13.5 GiB a run; 139 GiB free holds 10, capped by cores and cap
    assert schedule.runs_per_gpu(139, 10, cpu_cores=64, cap=16) == 10
    assert schedule.runs_per_gpu(139, 10, cpu_cores=8, cap=16) == 4
    assert schedule.runs_per_gpu(139, 10, cpu_cores=64) == 8
    assert schedule.runs_per_gpu(10, 10, cpu_cores=64) == 1
    env = schedule.compile_cache_env(tmp_path / "cache")
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")
    assert env["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1" and env["TRITON_CACHE_DIR"].endswith("triton")


def fake_grid(ablate, monkeypatch, tmp_path, wall_s=100.0, peak=10.0, teardown_s=0.0, fail=()):
    """tools/ablate.py's scheduler with the trainer replaced: each run sleeps a little, writes its
    result as a real one would, and records how many runs were in flight with it."""
    import threading
    import time as clock

    from neollm.ablation import runner, schedule

    from neollm import handover

    state = {"active": 0, "max": 0, "order": [], "env": {}, "gated": {}, "trains": {}, "exits": {}, "began": {}}
    lock = threading.Lock()

    def fake_run(variant, dump, argv, ngpu, folder, summarize, extra=None, env=None, keep_checkpoints=True):
        done = runner.finished(dump, argv)
        if done is not None:
            return done, False
        began = clock.monotonic()
        try:
            handover.wait_for_gate(env, poll_s=0.01)  # as neollm/train.py does, then trains
        except handover.GateAbandoned as error:  # the trainer exits 2; the runner reports that so
            raise runner.RunFailed(str(error)) from None
        if variant.name in fail:
            clock.sleep(0.3)
            raise runner.RunFailed(f"{variant.name} failed")
        with lock:
            state["active"] += 1
            state["max"] = max(state["max"], state["active"])
            state["order"].append(variant.name)
            state["env"][variant.name] = env.get("CUDA_VISIBLE_DEVICES")
            state["gated"][variant.name] = handover.START_GATE in env
            state["trains"][variant.name] = [clock.monotonic()]
        clock.sleep(0.3)
        with lock:
            state["active"] -= 1
            state["trains"][variant.name].append(clock.monotonic())
        handover.release(env)
        clock.sleep(teardown_s)  # the process's exit
        state["exits"][variant.name] = clock.monotonic()
        state["began"][variant.name] = began
        loss = 4.0 + 0.01 * len(state["order"])
        result = {"final_step": 2, "tokens": 128, "final_val_loss": loss, "best_val_loss": loss,
                  "final_train_loss": loss, "tps_median": 1000.0, "peak_memory_gib": peak,
                  "val_curve": [[1, 64, 5.0], [2, 128, loss]], **(extra or {}), "argv": argv,
                  "variant": dataclasses.asdict(variant), "processes": ngpu, "wall_s": wall_s, "resumed": False}
        dump.mkdir(parents=True, exist_ok=True)
        runner.write_atomic(dump / runner.MARKER, json.dumps(result))
        return result, True

    monkeypatch.setattr(runner, "run_variant", fake_run)
    monkeypatch.setattr(bench, "check_variant", lambda v, argv, ngpu: {
        "params": 1000, "params_non_embedding": 500, "model_args": {"name": v.name}, "checkpoint_folder": "checkpoint"})
    monkeypatch.setattr(bench, "mark_same_networks", lambda runs, checked: None)
    monkeypatch.setattr(schedule, "gpu_memory_gib", lambda: [(140.0, 139.0)])
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    return state


def test_parallel_auto_measures_the_first_run_then_fills_the_gpu(ablate, monkeypatch, tmp_path, capsys):
    state = fake_grid(ablate, monkeypatch, tmp_path)
    out = tmp_path / "grid"
    argv = ["--config", DEBUG, "--out", str(out), "--vary", "layer_pattern=A,D,AD", "--seeds", "0,1,2", *TINY]
    assert ablate.main(argv) == 0
    assert state["order"][0] == "base" and len(state["order"]) == 6
    # the first run went alone (nothing measured yet), then 8 at once fit (10 GiB peak, 139 GiB free)
    assert state["max"] > 1 and set(state["env"].values()) == {"0"}
    results = json.loads((out / "results.json").read_text())
    runs = {r["variant"]["name"]: r for r in results["runs"]}
    assert runs["base"].get("runs_sharing_gpu", 1) == 1 and max(r.get("runs_sharing_gpu", 1) for r in runs.values()) > 1
    assert results["reference"]["sd"] is not None and set(results["verdicts"]) == {
        "layer_pattern=A", "layer_pattern=D", "layer_pattern=AD"}
    md = (out / "results.md").read_text()
    assert "runs at once: auto: 8 (8 per GPU from a measured peak of 10.0 GiB and 139 GiB free)" in md
    assert "shared one GPU" in md and "One line per technique" in md
    assert results["verdicts"]["layer_pattern=AD"]["time"] == "time not judged (runs shared a GPU)"


def test_time_budget_stops_starting_runs_and_a_rerun_continues(ablate, monkeypatch, tmp_path, capsys):
    state = fake_grid(ablate, monkeypatch, tmp_path, wall_s=100.0)
    out = tmp_path / "grid"
    argv = ["--config", DEBUG, "--out", str(out), "--vary", "layer_pattern=A,D", "--parallel", "1", *TINY]
    # the first run has no estimate and starts; then a 100 s run no longer fits in 50 s
    assert ablate.main([*argv, "--time-budget", "50"]) == 0
    err = capsys.readouterr()
    assert state["order"] == ["base"] and "would end after --time-budget 50 s (about 100 s" in err.out
    assert "not finished: layer_pattern=A, layer_pattern=D" in err.err
    assert (out / "base" / "result.json").is_file() and (out / "results.md").is_file()
    assert ablate.main([*argv, "--time-budget", "500"]) == 0  # 0 + 100 <= 500: both start
    assert state["order"] == ["base", "layer_pattern=A", "layer_pattern=D"]
    assert "base: finished earlier, skipped" in capsys.readouterr().out
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["variant"]["name"] for r in runs] == ["base", "layer_pattern=A", "layer_pattern=D"]


def test_run_time_estimate_scales_training_with_the_runs_on_the_gpu():
    from neollm.ablation.schedule import estimate_seconds

    def run(group, wall_s, tokens=1_000_000, tps=10_000, sharing=1, resumed=False):
        return {"variant": {"name": group, "group": group}, "wall_s": wall_s, "tokens": tokens,
                "tps_median": tps, "runs_sharing_gpu": sharing, "resumed": resumed}

    assert estimate_seconds("a", []) is None
    alone = [run("a", 150.0)]  # 100 s of training (1M tokens at 10k tok/s) + 50 s of the rest
    assert estimate_seconds("a", alone) == pytest.approx(150.0)
    assert estimate_seconds("a", alone, runs_on_gpu=3) == pytest.approx(50 + 300)
    # measured beside 4 others at 2.5k tok/s: 400 s of training = 80 s of the GPU alone
    shared = [run("b", 450.0, tps=2_500, sharing=5)]
    assert estimate_seconds("b", shared, runs_on_gpu=5) == pytest.approx(450.0)
    assert estimate_seconds("b", shared, runs_on_gpu=1) == pytest.approx(50 + 80)
    # its own group first; another group's runs only when it has none; resumed runs never
    both = alone + [run("c", 900.0), run("a", 999.0, resumed=True)]
    assert estimate_seconds("a", both) == pytest.approx(150.0)
    assert estimate_seconds("d", both) == pytest.approx(900.0)


def test_prestart_hands_the_gpu_over_while_the_last_run_exits(ablate, monkeypatch, tmp_path):
    """--prestart (default): the next run starts while one trains, waits at its gate, and trains once the
    other has released the GPU: before that one's process has exited when a measured peak says both
    fit in memory, after it otherwise (the first run). Its wait is not counted as its wall time."""
    state = fake_grid(ablate, monkeypatch, tmp_path, teardown_s=0.6)
    out = tmp_path / "grid"
    argv = ["--config", DEBUG, "--out", str(out), "--vary", "layer_pattern=A,D", "--parallel", "1", *TINY]
    assert ablate.main(argv) == 0
    order = state["order"]
    assert order == ["base", "layer_pattern=A", "layer_pattern=D"] and state["max"] == 1
    assert state["gated"] == {"base": False, "layer_pattern=A": True, "layer_pattern=D": True}
    trains, exits, began = state["trains"], state["exits"], state["began"]
    assert began["layer_pattern=A"] < trains["base"][1] and began["layer_pattern=D"] < trains["layer_pattern=A"][1]
    assert trains["layer_pattern=A"][0] >= exits["base"]  # no peak measured yet: after the exit
    assert trains["layer_pattern=A"][1] <= trains["layer_pattern=D"][0] < exits["layer_pattern=A"]  # 10 GiB fits
    runs = {r["variant"]["name"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert "waited_s" not in runs["base"] and all(runs[name]["waited_s"] > 0.2 for name in order[1:])
    assert all(r.get("runs_sharing_gpu", 1) == 1 for r in runs.values())

    state = fake_grid(ablate, monkeypatch, tmp_path, teardown_s=0.2)
    assert ablate.main([*argv[:3], str(tmp_path / "grid2"), *argv[4:], "--no-prestart"]) == 0
    assert not any(state["gated"].values()) and state["order"] == order
    assert all(state["trains"][after][0] >= state["exits"][before] for before, after in zip(order, order[1:]))


def test_start_gate_waits_for_its_file_and_gives_up_without_its_opener(tmp_path):
    import subprocess
    import sys
    import threading

    from neollm import handover

    assert handover.wait_for_gate({}) == 0.0
    gate = tmp_path / "run.gate"
    threading.Timer(0.3, gate.touch).start()
    assert handover.wait_for_gate({handover.START_GATE: f"{gate}:{os.getpid()}"}, poll_s=0.01) >= 0.25
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with pytest.raises(handover.GateAbandoned, match="has ended"):
        handover.wait_for_gate({handover.START_GATE: f"{tmp_path / 'never.gate'}:{gone.stdout.strip()}"}, poll_s=0.01)
    closed = tmp_path / "closed.gate"
    handover.open_gate(closed, abort=True)
    with pytest.raises(handover.GateAbandoned, match="closed for good"):
        handover.wait_for_gate({handover.START_GATE: f"{closed}:{os.getpid()}"}, poll_s=0.01)
    with pytest.raises(ValueError, match="PATH:PID"):
        handover.wait_for_gate({handover.START_GATE: str(gate)})
    done = tmp_path / "sub" / "run.released"
    handover.release({handover.RELEASE_FILE: str(done), "RANK": "1"})
    assert not done.exists()  # rank 0 writes it
    handover.release({handover.RELEASE_FILE: str(done)})
    assert done.is_file()


def test_prestart_sends_the_waiting_run_away_when_a_run_fails(ablate, monkeypatch, tmp_path, capsys):
    """A failed run stops the grid: the run waiting at its gate leaves without training (no hang)."""
    state = fake_grid(ablate, monkeypatch, tmp_path, fail={"base"})
    out = tmp_path / "grid"
    argv = ["--config", DEBUG, "--out", str(out), "--vary", "layer_pattern=A,D", "--parallel", "1", *TINY]
    assert ablate.main(argv) == 1
    assert state["order"] == [] and state["gated"] == {}
    err = capsys.readouterr()
    assert "layer_pattern=A: not started, a run failed" in err.out and "base failed" in err.err
    assert not (out / ".handover").exists()


def test_the_docs_variant_files_build_what_they_say():
    """docs/ablations/stack_10m, pairs_10m and headline_21m (grids for GPU jobs): "plain" is the plain
    flavor (add-one's reference), "add_one_helpers" plain with exactly the four switches add-one found
    helping, each pair exactly its two switches (with their settings) on plain; and every variant of
    each committed variants file builds (a typo in a field name fails here, not on the GPU)."""
    from neollm.ablation import grid
    from neollm.model.args import FLAVORS

    # run with --set model.flavor=plain; the others on the TOML's neollm_135m; a variant may set its own flavor
    bases = {"pairs_10m": "plain", "headline_21m": "plain"}
    built = {}
    for path in sorted((REPO / "docs" / "ablations").glob("*/variants.toml")):
        for v in grid.variants_from_toml(path):  # __post_init__ checks each combination
            base = FLAVORS[v.cli.get("model.flavor", bases.get(path.parent.name, "neollm_135m"))]
            built[(path.parent.name, v.name)] = dataclasses.replace(base, **grid._checked(base, v.model, v.name))
    headline = {name: args for (folder, name), args in built.items() if folder == "headline_21m"}
    assert set(headline) == {"neollm_135m", "neollm_110m_hybrid", "fanformer_92m", "plain_four_helpers"}
    assert all(headline[name] == FLAVORS[name] for name in ("neollm_135m", "neollm_110m_hybrid", "fanformer_92m"))
    stack = {name: args for (folder, name), args in built.items() if folder == "stack_10m"}
    assert set(stack) == {"plain", "add_one_helpers", "no_simplegpt", "lean", "simplegpt_paper_embeddings", "untied"}
    assert changed_fields(stack["simplegpt_paper_embeddings"], FLAVORS["neollm_135m"]) == {
        "embedding_init_std", "tie_embeddings"}
    assert changed_fields(stack["untied"], FLAVORS["neollm_135m"]) == {"tie_embeddings"}
    assert stack["plain"] == FLAVORS["plain"]
    assert changed_fields(stack["add_one_helpers"], FLAVORS["plain"]) == {
        "seednorm_qk", "affine_scaled_attention", "xsa", "fan_ratio"}
    assert headline["plain_four_helpers"] == stack["add_one_helpers"]  # the stack grid's best, at 21M tokens
    assert changed_fields(stack["no_simplegpt"], FLAVORS["neollm_135m"]) == {"simplegpt"}
    assert changed_fields(stack["lean"], FLAVORS["neollm_135m"]) == {
        "simplegpt", "lucid", "directional_routing", "attention_output_gate", "learnable_multipliers"}
    pairs = {name: changed_fields(args, FLAVORS["plain"]) for (folder, name), args in built.items()
             if folder == "pairs_10m"}
    simplegpt_mlp = {"simplegpt", "simplegpt_scope"}
    assert pairs == {"mea": {"mea"}, "mea_seednorm_qk": {"mea", "seednorm_qk"},
                     "ffn_fan_simplegpt": {"ffn_fan_ratio"} | simplegpt_mlp,
                     "lns_simplegpt": {"layernorm_scaling"} | simplegpt_mlp,
                     "polynorm_simplegpt": {"mlp_type"} | simplegpt_mlp,
                     "author_mlp": {"ffn_fan_ratio", "mlp_type", "learnable_multipliers"}}
    for name in ("ffn_fan_simplegpt", "author_mlp"):  # at neollm_135m's values
        assert built[("pairs_10m", name)].ffn_fan_ratio == FLAVORS["neollm_135m"].ffn_fan_ratio


def test_a_grid_reread_against_another_variant(tmp_path):
    """neollm.ablation.report --reference: the committed stack grid judged against its three-seed
    add_one_helpers instead of neollm_135m: deltas are differences of means, the noise comes from the new
    reference's seeds, and an unknown variant is refused by name."""
    import statistics

    from neollm.ablation import report

    folder = REPO / "docs" / "ablations" / "stack_10m"
    runs = json.loads((folder / "results.json").read_text())["runs"]
    loss = {}
    for r in runs:
        loss.setdefault(r["variant"].get("group") or r["variant"]["name"], []).append(r["final_val_loss"])
    report.rereference(folder, "add_one_helpers", tmp_path / "re")
    data = json.loads((tmp_path / "re" / "results.json").read_text())
    assert data["reference"]["reference_mean"] == pytest.approx(statistics.fmean(loss["add_one_helpers"]))
    assert data["reference"]["sd"] == pytest.approx(statistics.stdev(loss["add_one_helpers"]))
    verdicts = data["verdicts"]
    assert "add_one_helpers" not in verdicts and set(verdicts) == set(loss) - {"add_one_helpers"}
    for name, v in verdicts.items():
        assert v["delta"] == pytest.approx(statistics.fmean(loss[name]) - statistics.fmean(loss["add_one_helpers"]))
    assert verdicts["base"]["runs"] == 3 and verdicts["base"]["quality"] == "hurts"
    assert "add_one_helpers (re-read from" in (tmp_path / "re" / "results.md").read_text()
    with pytest.raises(ValueError, match="no variant 'nope' to take as the reference"):
        report.rereference(folder, "nope", tmp_path / "x")
    # the committed re-readings are what the tool writes from the committed grid
    for ref in ("add_one_helpers", "no_simplegpt"):
        report.rereference(folder, ref, tmp_path / ref)
        committed = json.loads((folder / f"vs_{ref}" / "results.json").read_text())
        fresh = json.loads((tmp_path / ref / "results.json").read_text())
        assert committed["verdicts"] == fresh["verdicts"], ref
