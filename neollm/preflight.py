"""Check a run's configuration before torchrun starts any process.

run_train.sh calls this first, so a wrong flavor, a missing tokenizer or corpus, a batch that
does not split over the ranks or an unreachable hub ends in one ``error: ...`` line and exit
status 2, instead of a stack trace from every rank. The checks are the ones the trainer itself
runs (neollm/run_checks.py, shared with neollm.train), on the same parsed config.

    python -m neollm.preflight --world-size 8 --job.config_file train_configs/neollm_135m.toml
"""

from __future__ import annotations

import copy
import sys

from torchtitan.config import JobConfig

from neollm.errors import ConfigError


def check_dataset(job_config: JobConfig) -> None:
    """Open the configured dataset the way the dataloader will (fails fast when it can't)."""
    from torchtitan.hf_datasets.text_datasets import DATASETS

    name = job_config.training.dataset.lower()
    if name not in DATASETS:
        raise ConfigError(f"[training] dataset {name!r} is unknown: choose one of {sorted(DATASETS)}")
    source = DATASETS[name]
    source.loader(job_config.training.dataset_path or source.path)


def check_run(job_config: JobConfig, world_size: int) -> None:
    from neollm.config_check import check_ranges, check_types
    from neollm.model.args import FLAVORS
    from neollm.run_checks import (
        check_model_choice,
        data_parallel_degree,
        fit_batch_to_ranks,
        guard_from_config,
        loss_settings,
    )

    check_types(job_config)
    check_ranges(job_config)
    if job_config.model.name != "neollm":
        return  # another torchtitan spec: its own trainer checks apply
    check_model_choice(job_config)
    loss_settings(job_config)
    guard_from_config(job_config)
    fit_batch_to_ranks(copy.deepcopy(job_config), world_size)
    if job_config.compile.enable:
        from neollm.parallelize import compile_settings

        p = job_config.parallelism
        shard = p.data_parallel_shard_degree
        if shard == -1:
            shard = data_parallel_degree(job_config, world_size) // p.data_parallel_replicate_degree
        compile_settings(job_config.compile, fsdp=shard > 1)
    copy.deepcopy(FLAVORS[job_config.model.flavor]).update_from_config(job_config)
    from neollm.data.loader import check_data
    from neollm.tokenizer import build_neollm_tokenizer

    tokenizer = build_neollm_tokenizer(job_config)
    check_dataset(job_config)
    check_data(job_config, data_parallel_degree(job_config, world_size), tokenizer.eos_id)


def main(argv: list[str]) -> int:
    world_size = 1
    if argv[:1] == ["--world-size"]:
        world_size, argv = int(argv[1]), argv[2:]
    import neollm  # noqa: F401  (registers the spec and datasets)
    from neollm.config_check import parse_config

    try:
        check_run(parse_config(argv), world_size)
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
