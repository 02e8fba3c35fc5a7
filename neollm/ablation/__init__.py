"""Ablation bench: run one base config with one module swapped at a time (tools/ablate.py).

grid.py expands the variants, bench.py plans, checks and schedules the runs, runner.py runs each
through ./run_train.sh (resumable), report.py writes results.md / results.json and the plots.
docs/ablations.md explains what is held fixed.
"""
