"""Bad configuration, each through the preflight check run_train.sh runs before torchrun:
one ``error: ...`` line naming the key and the fix, exit status 2, nothing written.

The table runs in-process (neollm.preflight.main, as ``python -m neollm.preflight`` does);
two cases also run as that exact command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, require_prepared_assets

BASE = (REPO / "train_configs" / "debug.toml").read_text()


def toml(tmp_path, text: str) -> str:
    path = tmp_path / "job.toml"
    path.write_text(text.replace('dump_folder = "outputs/debug"', f'dump_folder = "{tmp_path / "dump"}"'))
    return str(path)


def edit(old: str, new: str):
    assert old in BASE
    return lambda tmp_path: ["--job.config_file", toml(tmp_path, BASE.replace(old, new, 1))]


def cli(*args: str):
    return lambda tmp_path: ["--job.config_file", toml(tmp_path, BASE), *args]


CASES = {
    "malformed TOML": (edit("[training]", "[training"), "is not valid TOML: Expected ']'"),
    "unknown key": (edit("lr = 3e-3", "lr = 3e-3\nlearnin_rate = 1"), "unknown key [optimizer] learnin_rate"),
    "unknown section": (lambda p: ["--job.config_file", toml(p, BASE + "\n[optimiser]\nlr = 1\n")],
                        "unknown section [optimiser]: did you mean 'optimizer'?"),
    "unknown option": (cli("--training.stepz", "3"), "unknown option --training.stepz: did you mean --training.steps?"),
    "bool given a value": (cli("--checkpoint.enable", "false"), "unexpected value 'false' on the command line"),
    "wrong type in TOML": (edit("steps = 40", 'steps = "forty"'),
                           "[training] steps = 'forty' has the wrong type: it must be an integer"),
    "wrong type in TOML (float)": (edit("lr = 3e-3", 'lr = "fast"'), "[optimizer] lr = 'fast' has the wrong type"),
    "wrong type on the command line": (cli("--training.steps", "abc"),
                                       "--training.steps: invalid literal for int() with base 10: 'abc': give a value of type INT"),
    "literal not allowed": (edit('decay_type = "cosine"', 'decay_type = "cosine2"'), "[lr_scheduler] decay_type = 'cosine2'"),
    "negative LR": (cli("--optimizer.lr", "-3e-3"), "[optimizer] lr must be a positive number, got -0.003"),
    "zero steps": (cli("--training.steps", "0"), "[training] steps must be positive, got 0"),
    "negative seq_len": (cli("--training.seq_len", "-128"), "[training] seq_len must be positive"),
    "seq_len not divisible for context parallelism": (
        cli("--parallelism.context_parallel_degree", "2", "--training.seq_len", "129"),
        "[training] seq_len 129 must be divisible by 2 x context_parallel_degree = 4"),
    "beta out of range": (cli("--optimizer.beta2", "1.5"), "[optimizer] beta2 must be in [0, 1)"),
    "keep_latest_k 1": (cli("--checkpoint.keep_latest_k", "1"), "[checkpoint] keep_latest_k must be 0 (keep all) or >= 2"),
    "guard mode": (cli("--guard.on_bad_loss", "ignore"), "[guard] on_bad_loss 'ignore' is unknown"),
    "guard ratio": (cli("--guard.max_loss_ratio", "0.5"), "[guard] max_loss_ratio 0.5 must be 0 (off) or above 1"),
    "global batch not divisible": (cli("--training.global_batch_size", "7", "--training.local_batch_size", "2"),
                                   "[training] local_batch_size 2 does not divide the 7"),
    "unknown flavor": (cli("--model.flavor", "gpt5"), "[model] flavor 'gpt5' is unknown"),
    "missing config file": (lambda p: ["--job.config_file", str(p / "nope.toml")], "nope.toml: no such file"),
    "missing tokenizer": (cli("--model.hf_assets_path", "no/such/tokenizer"), "no/such/tokenizer"),
    "missing corpus": (cli("--training.dataset_path", "no/such/corpus"), "no/such/corpus"),
    "missing initial checkpoint": (cli("--checkpoint.initial_load_path", "no/such/ckpt"),
                                   "[checkpoint] initial_load_path no/such/ckpt: no such folder"),
}


@pytest.fixture(autouse=True)
def _assets():
    require_prepared_assets()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_clear_line(case, tmp_path, capsys, monkeypatch):
    from neollm.preflight import main

    monkeypatch.chdir(REPO)
    make_args, fragment = CASES[case]
    status = main(make_args(tmp_path))
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.strip()]
    assert status == 2, out
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert fragment in lines[0]
    assert not (tmp_path / "dump").exists()


def test_good_config_passes(tmp_path, capsys, monkeypatch):
    from neollm.preflight import main

    monkeypatch.chdir(REPO)
    assert main(cli()(tmp_path)) == 0
    assert not (tmp_path / "dump").exists()


@pytest.mark.parametrize("case", ["unknown key", "negative LR"])
def test_as_a_command(case, tmp_path):
    make_args, fragment = CASES[case]
    result = subprocess.run([sys.executable, "-m", "neollm.preflight", *make_args(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == "" and result.stderr.strip().count("\n") == 0, result.stderr
    assert fragment in result.stderr
    assert not (tmp_path / "dump").exists()


@pytest.mark.parametrize("change, fragment", [
    (dict(n_heads=6, n_kv_heads=4), "n_heads (6) must be a multiple of n_kv_heads (4)"),
    (dict(layer_pattern="DADAD"), "layer_pattern 'DADAD' (length 5) must tile n_layers (4) exactly"),
    (dict(head_dim=33), "head_dim (33) must be even"),
])
def test_model_shapes_that_do_not_fit(change, fragment):
    """Shape rules of the flavors (not TOML keys): the same one-line ConfigError."""
    import dataclasses

    from neollm.errors import ConfigError
    from neollm.model.args import FLAVORS

    with pytest.raises(ConfigError, match=None) as raised:
        dataclasses.replace(FLAVORS["debug"], **change)
    assert fragment in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "train_configs").glob("*.toml")))
def test_every_shipped_config_passes_the_config_checks(config):
    """Types, ranges, model choice and loss settings of each train_configs/*.toml (data and
    tokenizer availability are machine-dependent and tested elsewhere)."""
    import neollm  # noqa: F401
    from neollm.config_check import check_ranges, check_types, parse_config
    from neollm.run_checks import check_model_choice, loss_settings

    job = parse_config(["--job.config_file", str(REPO / "train_configs" / config)])
    check_types(job)
    check_ranges(job)
    check_model_choice(job)
    loss_settings(job)
