"""The ablation bench's driver behind tools/ablate.py (its docstring and docs/ablations.md describe
it): the variants' run_train.sh commands (``plan``), each checked before any trains
(``check_variant``), then run as many at once as the GPUs hold (``Devices``), skipping finished
ones, with results.md / results.json and the plots rewritten as runs finish (``run``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import json
import os
import shlex
import shutil
import sys
import threading
import time
from pathlib import Path

from neollm import handover
from neollm.ablation import grid, report, runner, schedule
from neollm.errors import ConfigError
from neollm.provenance import device_name, git_commit, neollm_environment


def parse_job(argv: list[str]):
    """A run's parsed JobConfig, as run_train.sh would parse ``argv``."""
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
    grid.apply_assignments(opts.set, common_model, common_cli)
    common_cli.setdefault("compile.enable", "true" if opts.compile else "false")
    base_overrides = grid.merged_overrides(grid.config_overrides(opts.config),
                                           grid.Variant("common", model=common_model))
    head = ["--job.config_file", str(opts.config)]
    config_job = parse_job([*head, *grid.cli_args(common_cli), *_overrides_arg(base_overrides)])
    steps = _steps(opts, config_job, common_cli)
    if steps is not None:
        common_cli["training.steps"] = str(steps)
        if "lr_scheduler.warmup_steps" not in common_cli:
            common_cli["lr_scheduler.warmup_steps"] = str(schedule.scaled_warmup(
                config_job.lr_scheduler.warmup_steps, config_job.training.steps, steps))
    base_job = parse_job([*head, *grid.cli_args(common_cli), *_overrides_arg(base_overrides)])
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
    variants = grid.with_seeds(variants, seeds, opts.seeds_all, opts.seeds_for)
    validation = _validation_cli(opts, base_job)
    freq = int(validation["validation.freq"])
    if opts.equal_time:
        variants = _equal_time(variants, opts.equal_time, base_job, freq, opts.out)
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


def _equal_time(variants: list[grid.Variant], source, base_job, freq: int, out) -> list[grid.Variant]:
    """The variants with their steps for the reference's training seconds: the reference's steps times
    each variant's steps per second over the reference's, as the finished grid in ``source`` measured
    them, rounded to the validation interval; the warm-up keeps its fraction. So each variant's whole LR
    schedule fits the same seconds, where the report's interpolated equal-time delta cuts the slower run
    short."""
    if Path(source).resolve() == Path(out).resolve():
        raise ConfigError("--equal-time GRID: write the equal-time grid to another --out than GRID")
    try:
        speeds, ref_group = report.grid_speeds(source)
    except ValueError as error:
        raise ConfigError(f"--equal-time: {error}") from None
    steps, warmup = base_job.training.steps, base_job.lr_scheduler.warmup_steps
    result = []
    for v in variants:
        if v.reference:
            result.append(v)
            continue
        own = sorted(k for k in ("training.steps", "lr_scheduler.warmup_steps") if k in v.cli)
        if own:
            raise ConfigError(f"variant {v.name} sets its own {', '.join(own)}: --equal-time sets every variant's")
        if v.group not in speeds:
            raise ConfigError(f"--equal-time {source}: no finished run of {v.group} there to take its speed from "
                              f"(it has {sorted(speeds)}): finish it in that grid, or leave it out of this one")
        ratio = speeds[v.group] / speeds[ref_group]
        n = max(freq, round(steps * ratio / freq) * freq)
        if abs(n / (steps * ratio) - 1) > 0.02:
            print(f"note: {v.name} trains {n} steps for the reference's {steps} x {ratio:.3f} = {steps * ratio:.1f}: "
                  f"{100 * (n / (steps * ratio) - 1):+.1f}% off equal time (a finer --val-freq rounds closer)",
                  file=sys.stderr)
        result.append(dataclasses.replace(
            v, what=f"{v.what}; {n} steps = {n / steps:.2f}x the reference's (speed {ratio:.2f}x)",
            cli={**v.cli, "training.steps": str(n),
                 "lr_scheduler.warmup_steps": str(schedule.scaled_warmup(warmup, steps, n))}))
    return result


def _steps(opts, job, common_cli: dict[str, str]) -> int | None:
    """The steps every variant trains (None: the config's own)."""
    if "training.steps" in common_cli:
        if opts.steps is not None:
            raise ConfigError("give the steps once: --steps or --set training.steps, not both")
        return None
    choice = opts.steps if opts.steps is not None else ("epoch" if job.training.dataset == "shards" else "config")
    if choice == "config":
        return None
    if choice == "epoch":
        freq = opts.val_freq or (job.validation.freq if job.validation.enable else 1)
        steps = schedule.epoch_steps(job, freq)
        if steps is None:
            raise ConfigError(f"--steps epoch needs a config reading token shards ([training] dataset = "
                              f"'shards'; this one reads {job.training.dataset!r}): give --steps N")
        return steps
    if not choice.isdigit() or int(choice) <= 0:
        raise ConfigError(f"--steps {choice!r}: give a positive number of steps, 'epoch' or 'config'")
    return int(choice)


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
        job = parse_job(argv)
        check_run(job, ngpu)
        args = grid.model_args_for(job)
    except (ConfigError, FileNotFoundError) as error:
        raise ConfigError(f"variant {variant.name}: {error}") from None
    total, embedding = count_parameters(args)
    return {"params": total, "params_non_embedding": total - embedding,
            "model_args": dataclasses.asdict(args), "checkpoint_folder": job.checkpoint.folder}


def header(opts, argv: list[str], job, parallel_text: str) -> dict:
    commit, device = git_commit(), device_name()
    per_step = job.training.global_batch_size * job.training.seq_len
    return {"command": "python tools/ablate.py " + shlex.join(argv), "config": str(opts.config),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "git commit": commit, "device": f"{device} x {opts.ngpu} process(es) per run",
            "budget": f"{job.training.steps} steps x {per_step:,} tokens = {job.training.steps * per_step:,} "
                      f"tokens per run, warm-up {job.lr_scheduler.warmup_steps} steps, validation every "
                      f"{job.validation.freq} steps on {job.validation.steps} batches, "
                      + ("compiled" if job.compile.enable else "eager"),
            "runs at once": parallel_text,
            # kernel switches (NEOLLM_LUCID_DIAGONAL, ...) set for this job: they change speeds and rounding
            **({"environment": " ".join(f"{k}={v}" for k, v in env.items())} if (env := neollm_environment()) else {}),
            **({"equal time": f"each variant trains the reference's {job.training.steps} steps times its steps per second "
                              f"over the reference's in {opts.equal_time} (rounded to the validation interval), so every "
                              "run takes the reference's training seconds with its whole LR schedule"}
               if getattr(opts, "equal_time", None) else {})}


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


class Devices:
    """Which GPUs the next run gets, and how many runs may be in flight.

    The visible GPUs form groups of ``ngpu``; a new run goes to the group with the fewest runs.
    ``parallel`` is a number, or "auto": runs_per_gpu() of the largest peak memory measured so
    far (one run in all until a run has finished)."""

    def __init__(self, parallel: str, ngpu: int, max_per_gpu: int, gpus: list[tuple[float, float]] | None = None):
        self.gpus = schedule.gpu_memory_gib() if gpus is None else gpus
        self.ngpu = ngpu
        self.groups = max(1, len(self.gpus) // ngpu) if self.gpus else 0
        self.auto = parallel == "auto"
        if not self.auto and (not parallel.isdigit() or int(parallel) < 1):
            raise ConfigError(f"--parallel {parallel!r}: give a positive number or auto")
        self.fixed = None if self.auto else int(parallel)
        self.max_per_gpu = max_per_gpu
        self.active: dict[int, set[str]] = {g: set() for g in range(max(1, self.groups))}
        self.peaks: list[float] = []

    def limit(self) -> int:
        if self.fixed is not None:
            return self.fixed
        if not self.gpus or not self.peaks:
            return 1
        free = min(f for _, f in self.gpus)
        cores = (os.cpu_count() or 2) // max(1, self.groups)
        return schedule.runs_per_gpu(free, max(self.peaks), cores, self.max_per_gpu) * self.groups

    def describe(self) -> str:
        if self.fixed is not None:
            return str(self.fixed)
        if not self.gpus:
            return "auto: 1 (no GPU visible)"
        if not self.peaks:
            return "auto: 1 (no finished run measured its peak memory yet)"
        return (f"auto: {self.limit()} ({self.limit() // self.groups} per GPU from a measured peak of "
                f"{max(self.peaks):.1f} GiB and {min(f for _, f in self.gpus):.0f} GiB free)")

    def next_load(self) -> int:
        """Runs on the GPU the next run would get, itself included."""
        return 1 + min(len(names) for names in self.active.values())

    def take(self, name: str, group: int | None = None) -> tuple[int, dict[str, str]]:
        """(group, environment) for a run starting now (on ``group``, else the least loaded)."""
        if group is None:
            group = min(self.active, key=lambda g: len(self.active[g]))
        self.active[group].add(name)
        return group, self.environment(group)

    def environment(self, group: int) -> dict[str, str]:
        if not self.groups:
            return {}
        return {"CUDA_VISIBLE_DEVICES": ",".join(str(group * self.ngpu + i) for i in range(self.ngpu))}

    def room_for_one_more(self) -> bool:
        """Whether a run starting now fits beside the runs still holding memory on the one GPU
        group (nvidia-smi's free memory against the largest measured peak); True without a GPU."""
        if not self.gpus:
            return True
        free = schedule.gpu_memory_gib()
        need = max(self.peaks, default=0.0) * schedule.MEMORY_MARGIN + schedule.PROCESS_OVERHEAD_GIB
        return bool(free) and bool(self.peaks) and min(f for _, f in free[:self.ngpu]) >= need

    def release(self, group: int, name: str) -> None:
        self.active[group].discard(name)


def _fits(v: grid.Variant, known: list[dict], started: float, budget: float | None,
          runs_on_gpu: int) -> tuple[bool, float | None]:
    if budget is None:
        return True, None
    estimate = schedule.estimate_seconds(v.group, known, runs_on_gpu)
    return estimate is None or time.monotonic() - started + estimate <= budget, estimate


def run(opts, argv: list[str]) -> int:
    """Run the grid of ``opts`` (tools/ablate.py's parsed arguments; ``argv`` the command line it
    came from, for the report). Returns the exit status: 0, 1 (a run failed) or 2 (a config error)."""
    started = time.monotonic()
    try:
        runs = plan(opts)
        if opts.dry_run:
            for v, run_argv in runs:
                print(f"# {v.name}: {v.what} (seed {v.seed})")
                print("./run_train.sh " + shlex.join(run_argv))
            return 0
        devices = Devices(opts.parallel, opts.ngpu, opts.max_parallel)
        opts.out.mkdir(parents=True, exist_ok=True)
        checked, done = {}, {}
        for v, run_argv in runs:  # every variant is checked before the first one trains
            stored = runner.finished(opts.out / v.dirname, run_argv)
            if stored is not None:
                done[v.name] = stored
            elif not opts.report_only:
                checked[v.name] = check_variant(v, run_argv, opts.ngpu)
        mark_same_networks(runs, checked)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    env = schedule.compile_cache_env(opts.cache_dir or opts.out / "compile_cache")
    report_header = header(opts, argv, parse_job(runs[0][1]), devices.describe())  # the budget every run shares
    known = list(done.values())  # finished runs: estimates of time and memory
    devices.peaks += [r["peak_memory_gib"] for r in known if r.get("peak_memory_gib")]
    results: dict[str, dict] = dict(done)
    missing: list[str] = []
    failure: list[Exception] = []
    lock = threading.Lock()
    sharing: dict[str, dict] = {}  # run name -> its extra (runs_sharing_gpu updated while in flight)

    def one(v: grid.Variant, run_argv: list[str], group: int, run_env: dict[str, str], gated: bool = False):
        dump = opts.out / v.dirname
        info = checked[v.name]
        try:
            dump.mkdir(parents=True, exist_ok=True)
            (dump / "model_args.json").write_text(json.dumps(info["model_args"], indent=2))
            early = " (started early: waits for the GPU once imported)" if gated else ""
            print(f"[start] {v.name}: {v.what} (seed {v.seed}) -> {dump}/train.log{early}", flush=True)
            extra = sharing[v.name]
            threads = {} if "OMP_NUM_THREADS" in os.environ else {  # the CPU cores split between the runs
                "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, devices.limit() * opts.ngpu)))}
            return runner.run_variant(v, dump, run_argv, opts.ngpu, info["checkpoint_folder"], report.summarize,
                                      extra, env={**env, **threads, **run_env},
                                      keep_checkpoints=opts.keep_checkpoints)[0]
        finally:
            with lock:
                devices.release(group, v.name)

    def write_report() -> None:
        finished = [results[v.name] for v, _ in runs if v.name in results]
        if any(r["variant"]["reference"] for r in finished):
            pending = [v.name for v, _ in runs if v.name not in results]
            written = report.write_report(opts.out, {**report_header, "runs at once": devices.describe()},
                                          finished, pending)
            print("    report: " + ", ".join(str(p) for p in written), flush=True)

    for v, _ in runs:
        if v.name in done:
            print(f"    {v.name}: finished earlier, skipped", flush=True)
    queue = [(v, a) for v, a in runs if v.name not in done]
    if opts.report_only:
        missing += [v.name for v, _ in queue]
        queue = []
    if opts.max_runs is not None:
        missing += [v.name for v, _ in queue[opts.max_runs:]]
        queue = queue[:opts.max_runs]
    # --prestart (one GPU group): the next run starts while the GPU is busy and waits, imported, at its
    # gate (neollm/handover.py); the gate opens when a training run has released the GPU (written its
    # release file after its last validation and checkpoint) and memory allows, or has exited
    prestart = opts.prestart and devices.groups <= 1 and devices.fixed == 1
    handover_dir = opts.out / ".handover"
    in_flight: dict[concurrent.futures.Future, grid.Variant] = {}
    files: dict[str, tuple] = {}  # run name -> (its gate, its release file)
    waiting: dict[str, float] = {}  # prestarted runs behind a shut gate -> when they started
    released: set[str] = set()  # runs in flight that no longer use the GPU (tearing down)
    started_at: dict[str, float] = {}
    closed: set[str] = set()  # prestarted runs sent away from their gate (failure, budget)

    def mark_sharing(group: int) -> None:
        on_gpu = devices.active[group]
        for name in on_gpu:  # every run on this GPU now shares it with len(on_gpu) runs
            sharing[name]["runs_sharing_gpu"] = max(sharing[name].get("runs_sharing_gpu", 1), len(on_gpu))

    def training() -> int:
        return sum(1 for v in in_flight.values() if v.name not in waiting and v.name not in released)

    def gpu_free(for_waiting_run: bool = False) -> bool:
        """Room for one more run on the GPU (for one of the waiting runs, or a new one): a free slot,
        and the memory of runs still tearing down."""
        return (training() + len(waiting) - for_waiting_run < devices.limit()
                and (not released or devices.room_for_one_more()))

    def start(v: grid.Variant, run_argv: list[str], gated: bool) -> None:
        extra_env: dict[str, str] = {}
        if prestart:
            gate, done = handover_dir / f"{v.dirname}.gate", handover_dir / f"{v.dirname}.released"
            for stale in (gate, done):
                stale.unlink(missing_ok=True)
            files[v.name] = (gate, done)
            extra_env[handover.RELEASE_FILE] = str(done)
            if gated:
                extra_env[handover.START_GATE] = f"{gate}:{os.getpid()}"
        with lock:
            sharing[v.name] = {k: checked[v.name][k] for k in
                               ("params", "params_non_embedding", "same_network_as_reference")
                               if k in checked[v.name]}
            started_at[v.name] = time.monotonic()
            if gated:
                group, run_env = 0, devices.environment(0)
                waiting[v.name] = started_at[v.name]
            else:
                group, run_env = devices.take(v.name)
                mark_sharing(group)
        in_flight[pool.submit(one, v, run_argv, group, {**run_env, **extra_env}, gated)] = v

    def poll_handover() -> None:
        for v in in_flight.values():
            if v.name in files and v.name not in waiting and v.name not in released and files[v.name][1].exists():
                released.add(v.name)
                with lock:
                    devices.release(0, v.name)
        done = {v.name for future, v in in_flight.items() if future.done()}
        for name in list(waiting):
            if name in done:  # ended at its gate; the loop collects it
                continue
            if failure:  # the grid stops: the waiting run leaves without training
                close_gate(name, "a run failed")
                continue
            if not gpu_free(for_waiting_run=True):
                continue
            fits, estimate = _fits(next(v for v in in_flight.values() if v.name == name), known, started,
                                   opts.time_budget, 1)
            if not fits:
                close_gate(name, f"it would end after --time-budget {opts.time_budget:.0f} s (about {estimate:.0f} s)")
                continue
            del waiting[name]
            handover.open_gate(files[name][0])
            with lock:
                sharing[name]["waited_s"] = round(time.monotonic() - started_at[name], 2)
                devices.take(name, 0)
                mark_sharing(0)
            print(f"    {name}: the GPU is free; trains now (started {sharing[name]['waited_s']:.0f} s early)",
                  flush=True)

    def close_gate(name: str, why: str) -> None:
        del waiting[name]
        closed.add(name)
        missing.append(name)
        handover.open_gate(files[name][0], abort=True)
        print(f"    {name}: not started, {why}", flush=True)

    def close_all_gates() -> None:
        for name in list(waiting):
            close_gate(name, "the grid stopped")

    def fits_after_current(v: grid.Variant) -> bool:
        """Whether a run started now but training only after the runs on the GPU end fits the budget."""
        if opts.time_budget is None:
            return True
        now = time.monotonic()
        ahead = [schedule.estimate_seconds(u.group, known) for u in in_flight.values()]
        if any(e is None for e in ahead):
            return False
        delay = max((e - (now - started_at[u.name]) for e, u in zip(ahead, in_flight.values())), default=0.0)
        fits, estimate = _fits(v, known, started, opts.time_budget - max(0.0, delay), 1)
        return fits and estimate is not None

    with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
        try:
            while queue or in_flight:
                if prestart:
                    poll_handover()
                while queue and not failure and gpu_free():
                    v, run_argv = queue.pop(0)
                    fits, estimate = _fits(v, known, started, opts.time_budget, devices.next_load())
                    if not fits:
                        print(f"    {v.name}: not started, it would end after --time-budget {opts.time_budget:.0f} s "
                              f"(about {estimate:.0f} s; {time.monotonic() - started:.0f} s spent)", flush=True)
                        missing.append(v.name)
                        continue
                    start(v, run_argv, gated=False)
                if (prestart and queue and not failure and not waiting and in_flight
                        and fits_after_current(queue[0][0])):
                    v, run_argv = queue.pop(0)
                    start(v, run_argv, gated=True)
                if not in_flight:
                    break
                finished, _ = concurrent.futures.wait(in_flight, timeout=0.5 if prestart else None,
                                                      return_when=concurrent.futures.FIRST_COMPLETED)
                for future in finished:
                    v = in_flight.pop(future)
                    released.discard(v.name)
                    waiting.pop(v.name, None)
                    try:
                        result = future.result()
                    except runner.RunFailed as error:
                        if v.name in closed:  # sent away from its gate, as it was told
                            continue
                        print(f"error: {error}", file=sys.stderr)
                        failure.append(error)
                        missing.append(v.name)
                        continue
                    print(f"    {v.name}: done in {result['wall_s']:.0f} s", flush=True)
                    results[v.name] = result
                    known.append(result)
                    if result.get("peak_memory_gib"):
                        devices.peaks.append(result["peak_memory_gib"])
                    write_report()
        finally:  # an error here must not leave a prestarted run waiting at its gate (and the pool with it)
            close_all_gates()
        missing += [v.name for v, _ in queue]  # left after a failure
    shutil.rmtree(handover_dir, ignore_errors=True)  # every run's gate and release file: all ended
    if not any(r["variant"]["reference"] for r in results.values()):
        print("no finished reference run yet: rerun the same command to continue", file=sys.stderr)
        return 1 if failure else 0
    write_report()
    if missing:
        print(f"not finished: {', '.join(n for v, _ in runs for n in [v.name] if n in missing)} "
              "(rerun the same command to continue)", file=sys.stderr)
    return 1 if failure else 0

