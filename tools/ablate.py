"""Ablation bench: one base config, one module swapped per variant, same data and budget.

    python tools/ablate.py --config train_configs/debug.toml --out outputs/ablate_mixers \\
        --vary layer_pattern=A,DA,D --steps 200 --seeds 0,1,2
    python tools/ablate.py --config train_configs/neollm_135m.toml --out outputs/loo --leave-one-out
    python tools/ablate.py --config train_configs/neollm_135m.toml --out outputs/add1 --add-one
    python tools/ablate.py --config X.toml --out outputs/mine --variants my_variants.toml

Every variant is ./run_train.sh on the same config file with only its own ``[model] overrides``
entries / torchtitan keys changed (neollm/ablation/grid.py); validation runs at a fixed interval
on fixed batches so validation loss can be compared against tokens. Rerunning the same command
skips finished variants and resumes a partly run one from its last checkpoint. Writes
results.md, results.json, val_loss.png and delta.png into --out. See docs/ablations.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import os
import queue
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from neollm.ablation import grid, report, runner  # noqa: E402
from neollm.errors import ConfigError  # noqa: E402
from neollm.provenance import device_name, git_commit  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="base TOML (e.g. train_configs/neollm_135m.toml)")
    p.add_argument("--out", required=True, type=Path, help="output folder: one dump folder per variant + results")
    mode = p.add_argument_group("variants (--vary and --variants combine; the others stand alone)")
    mode.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                      help="a model field (layer_pattern, mlp_type, gpas...) or dotted torchtitan key "
                           "(optimizer.lr); repeat for a cartesian grid")
    mode.add_argument("--variants", type=Path, help="TOML of [variants.<name>] with overrides = [...], set = [...]")
    mode.add_argument("--leave-one-out", action="store_true",
                      help="each technique switch of the base model off in turn (-<switch>)")
    mode.add_argument("--add-one", action="store_true",
                      help="every switch off (plain, the reference), then each switch on alone (+<switch>)")
    p.add_argument("--steps", type=int, help="training steps of every variant (= --set training.steps=N)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="applied to every variant (model field or dotted torchtitan key)")
    p.add_argument("--seeds", help="comma-separated [debug] seeds: the reference runs at each (to measure "
                                   "the noise), the other variants at the first (default: the config's seed)")
    p.add_argument("--seeds-all", action="store_true", help="run every variant at every seed")
    p.add_argument("--val-freq", type=int, help="validate every N steps (default: config's, else steps/10)")
    p.add_argument("--val-steps", type=int, help="validation batches per evaluation (default: config's, else 10)")
    p.add_argument("--ngpu", type=int, default=int(os.environ.get("NGPU", "1")), help="processes per run")
    p.add_argument("--parallel", type=int, default=1,
                   help="variants trained at once (default 1). With at least parallel x ngpu GPUs each run "
                        "gets its own; otherwise they share the GPUs (then tok/s is not each run's own)")
    p.add_argument("--max-runs", type=int, help="stop after starting this many runs (rerun to continue)")
    p.add_argument("--report-only", action="store_true",
                   help="write results.md/json and plots from the finished variants; train nothing")
    p.add_argument("--dry-run", action="store_true", help="print each variant's command and exit")
    return p


def _parse(argv: list[str]):
    import neollm  # noqa: F401  (registers the spec and NeoLLM's keys)
    from neollm.config_check import parse_config

    return parse_config(argv)


def plan(opts) -> list[tuple[grid.Variant, list[str]]]:
    """(variant, run_train.sh arguments) for every run of the grid, the reference first."""
    if not os.path.isfile(opts.config):
        raise ConfigError(f"--config {opts.config}: no such file")
    modes = [bool(opts.vary or opts.variants), opts.leave_one_out, opts.add_one]
    if sum(modes) != 1:
        raise ConfigError("choose one mode: --vary/--variants, --leave-one-out or --add-one")
    common_model: dict[str, object] = {}
    common_cli: dict[str, str] = {}
    grid.apply_assignments(opts.set + ([f"training.steps={opts.steps}"] if opts.steps else []),
                           common_model, common_cli)
    base_overrides = grid.merged_overrides(grid.config_overrides(opts.config),
                                           grid.Variant("common", model=common_model))
    head = ["--job.config_file", str(opts.config)]
    base_job = _parse([*head, *grid.cli_args(common_cli), *_overrides_arg(base_overrides)])
    base_args = grid.model_args_for(base_job)

    skipped: list[str] = []
    if opts.add_one:
        variants = grid.add_one(base_args, skipped)
    else:
        variants = [grid.Variant("base", reference=True)]
        if opts.leave_one_out:
            variants += grid.leave_one_out(base_args, skipped)
        else:
            candidates = grid.vary_grid(opts.vary) + (grid.variants_from_toml(opts.variants) if opts.variants else [])
            for v in candidates:
                if grid.same_as(v, base_args, base_job):
                    print(f"note: variant {v.name} equals the base config: run once, as 'base'", file=sys.stderr)
                else:
                    variants.append(v)
    for reason in skipped:
        print(f"note: left out, cannot change alone: {reason}", file=sys.stderr)
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"variant names repeat: {names}")

    seeds = _seeds(opts.seeds, base_job)
    variants = grid.with_seeds(variants, seeds, opts.seeds_all)
    validation = _validation_cli(opts, base_job)
    freq = int(validation["validation.freq"])
    for v in variants:
        steps = v.cli.get("training.steps")
        if steps is not None and (not steps.isdigit() or int(steps) % freq):
            raise ConfigError(f"variant {v.name}: training.steps {steps} is not a multiple of the "
                              f"validation interval {freq}: choose a --val-freq dividing every variant's steps")
    runs = []
    for v in variants:
        dump = opts.out / v.dirname
        overrides = grid.merged_overrides(base_overrides, v)
        argv = [*head, "--job.dump_folder", str(dump),
                *grid.cli_args({"checkpoint.enable": "true", **common_cli, **validation, **v.cli,
                                "debug.seed": str(v.seed)}),
                *_overrides_arg(overrides)]
        runs.append((v, argv))
    return runs


def _overrides_arg(overrides: list[str]) -> list[str]:
    for entry in overrides:
        if "," in entry:
            raise ConfigError(f"model override {entry!r} holds a comma, which the command line's "
                              "comma-separated list cannot carry")
    return ["--model.overrides", ",".join(overrides)] if overrides else []


def _seeds(text: str | None, base_job) -> list[int]:
    if not text:
        return [base_job.debug.seed if base_job.debug.seed is not None else 0]
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: give distinct integers, e.g. 0,1,2")
    return seeds


def _validation_cli(opts, job) -> dict[str, str]:
    """Validation at a fixed interval on fixed batches, its last evaluation at the last step."""
    v, steps = job.validation, job.training.steps
    about_ten = max(d for d in range(1, max(1, steps // 10) + 1) if steps % d == 0)
    freq = opts.val_freq or (v.freq if v.enable else about_ten)
    if freq <= 0 or steps % freq:
        raise ConfigError(f"validation every {freq} steps does not end at step {steps}: choose a "
                          f"--val-freq dividing the steps (e.g. {about_ten} for {steps})")
    val_steps = opts.val_steps or (v.steps if v.enable else 10)
    cli = {"validation.enable": "true", "validation.freq": str(freq), "validation.steps": str(val_steps)}
    if not v.enable:  # torchtitan's defaults (seq_len 2048, batch 8) would not match the run
        cli.update({"validation.seq_len": str(job.training.seq_len),
                    "validation.local_batch_size": str(job.training.local_batch_size)})
    return cli


def check_variant(variant: grid.Variant, argv: list[str], ngpu: int) -> dict:
    """The preflight checks on the variant's parsed config; its parameter counts and model args."""
    from neollm.model.params import count_parameters
    from neollm.preflight import check_run

    try:
        job = _parse(argv)
        check_run(job, ngpu)
        args = grid.model_args_for(job)
    except (ConfigError, FileNotFoundError) as error:
        raise ConfigError(f"variant {variant.name}: {error}") from None
    total, embedding = count_parameters(args)
    return {"params": total, "params_non_embedding": total - embedding,
            "model_args": dataclasses.asdict(args), "checkpoint_folder": job.checkpoint.folder}


def header(opts, argv: list[str]) -> dict:
    commit, device = git_commit(), device_name()
    return {"command": "python tools/ablate.py " + shlex.join(argv), "config": str(opts.config),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "git commit": commit, "device": f"{device} x {opts.ngpu} process(es)",
            "runs at once": str(opts.parallel) + (" sharing the GPU(s): tok/s is not each variant's own speed"
                                                  if opts.parallel > 1 and not gpu_env(0, opts.parallel, opts.ngpu)
                                                  else "")}


def mark_same_networks(runs, checked: dict) -> None:
    """Flag variants whose model is the reference's network (a switch without effect in this base)."""
    from neollm.model.args import NeoLLMModelArgs

    reference = next((checked[v.name] for v, _ in runs if v.reference and v.name in checked), None)
    if reference is None:
        return
    base = NeoLLMModelArgs(**reference["model_args"])
    for v, _ in runs:
        info = checked.get(v.name)
        if info is None or v.reference or info["model_args"] == reference["model_args"]:
            continue
        if grid.same_network(base, NeoLLMModelArgs(**info["model_args"])):
            info["same_network_as_reference"] = True
            print(f"note: {v.name} builds the same network as the reference; it runs as a noise control",
                  flush=True)


def gpu_env(slot: int, parallel: int, ngpu: int) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for a run slot when the GPUs can be split between parallel runs."""
    if parallel <= 1:
        return {}
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < parallel * ngpu:
        return {}  # shared: every run sees every GPU
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(slot * ngpu + i) for i in range(ngpu))}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = build_parser().parse_args(argv)
    try:
        runs = plan(opts)
        if opts.dry_run:
            for v, run_argv in runs:
                print(f"# {v.name}: {v.what} (seed {v.seed})")
                print("./run_train.sh " + shlex.join(run_argv))
            return 0
        opts.out.mkdir(parents=True, exist_ok=True)
        checked = {}
        for v, run_argv in runs:  # every variant is checked before the first one trains
            if runner.finished(opts.out / v.dirname, run_argv) is None and not opts.report_only:
                checked[v.name] = check_variant(v, run_argv, opts.ngpu)
        mark_same_networks(runs, checked)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    results, missing = [], []
    failure: list[Exception] = []
    todo = []
    to_start = 0
    for v, run_argv in runs:
        unfinished = runner.finished(opts.out / v.dirname, run_argv) is None
        if unfinished and (opts.report_only or (opts.max_runs is not None and to_start >= opts.max_runs)):
            missing.append(v.name)
            continue
        to_start += unfinished
        todo.append((v, run_argv))
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(max(1, opts.parallel)):
        slots.put(slot)

    def one(v: grid.Variant, run_argv: list[str]):
        dump = opts.out / v.dirname
        info = checked.get(v.name, {})
        if info and failure:
            missing.append(v.name)
            return None
        slot = slots.get()
        try:
            if info:
                dump.mkdir(parents=True, exist_ok=True)
                (dump / "model_args.json").write_text(json.dumps(info["model_args"], indent=2))
                print(f"[start] {v.name}: {v.what} (seed {v.seed}) -> {dump}/train.log", flush=True)
            extra = {k: info[k] for k in ("params", "params_non_embedding", "same_network_as_reference")
                     if k in info} if info else None
            env = gpu_env(slot, opts.parallel, opts.ngpu)
            result, ran = runner.run_variant(v, dump, run_argv, opts.ngpu, info.get("checkpoint_folder", "checkpoint"),
                                             report.summarize, extra, env=env)
        except runner.RunFailed as error:
            print(f"error: {error}", file=sys.stderr)
            failure.append(error)
            missing.append(v.name)
            return None
        finally:
            slots.put(slot)
        print(f"    {v.name}: {'done' if ran else 'finished earlier, skipped'}", flush=True)
        return result

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, opts.parallel)) as pool:
        for result in pool.map(lambda job: one(*job), todo):  # map keeps the grid's order
            if result is not None:
                results.append(result)
    if not any(r["variant"]["reference"] for r in results):
        print("no finished reference run yet: rerun the same command to continue", file=sys.stderr)
        return 1 if failure else 0
    written = report.write_report(opts.out, header(opts, argv), results, missing)
    print("\n".join(str(p) for p in written))
    if missing:
        print(f"not finished: {', '.join(missing)} (rerun the same command to continue)", file=sys.stderr)
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
