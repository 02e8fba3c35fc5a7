"""``[model] overrides``: typed "field=value" changes of a flavor, from TOML and the command line,
refused with one clear line when wrong, and really changing the trained model (CPU)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest

from conftest import REPO, require_prepared_assets, run_trainer

DEBUG = REPO / "train_configs" / "debug.toml"


def parse(*argv: str, config=DEBUG):
    import neollm  # noqa: F401  (registers NeoLLM's [model] keys)
    from neollm.config_check import parse_config

    return parse_config(["--job.config_file", str(config), *argv])


def model_args(job_config):
    from neollm.model.args import FLAVORS

    args = copy.deepcopy(FLAVORS[job_config.model.flavor])
    args.update_from_config(job_config)
    return args


def test_values_are_typed_by_the_field():
    from neollm.model.args import NeoLLMModelArgs
    from neollm.model.overrides import parse_overrides

    parsed = parse_overrides(["gpas=true", "qkv_norm=False", "n_layers=8", "fan_ratio=0.125",
                              "layer_pattern=DDA", "attention_output_gate='headwise'", "dropout=0"],
                             NeoLLMModelArgs)
    assert parsed == {"gpas": True, "qkv_norm": False, "n_layers": 8, "fan_ratio": 0.125,
                      "layer_pattern": "DDA", "attention_output_gate": "headwise", "dropout": 0.0}
    assert type(parsed["n_layers"]) is int and type(parsed["dropout"]) is float
    assert parse_overrides([], NeoLLMModelArgs) == {} and parse_overrides(None, NeoLLMModelArgs) == {}


@pytest.mark.parametrize("entry, fragment", [
    ("gpaz=true", "unknown model field 'gpaz' in 'gpaz=true': did you mean 'gpas'? the valid names "
                  "are the fields of NeoLLMModelArgs in neollm/model/args.py"),
    ("gpas=maybe", "gpas takes true or false, got 'maybe'"),
    ("n_layers=2.5", "n_layers takes an integer, got '2.5'"),
    ("fan_ratio=lots", "fan_ratio takes a number"),
    ("fan_ratio=nan", "fan_ratio takes a finite number"),
    ("gpas", "'gpas' is not \"field=value\""),
    ("vocab_size=1000", "vocab_size is set by [model] vocab_size"),
    ("max_seq_len=64", "max_seq_len is set by [training] seq_len"),
])
def test_bad_entries_name_the_entry_and_the_fix(entry, fragment):
    from neollm.errors import ConfigError
    from neollm.model.args import NeoLLMModelArgs
    from neollm.model.overrides import parse_overrides

    with pytest.raises(ConfigError) as error:
        parse_overrides([entry], NeoLLMModelArgs)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_twice_the_same_field_is_refused():
    from neollm.errors import ConfigError
    from neollm.model.args import NeoLLMModelArgs
    from neollm.model.overrides import parse_overrides

    with pytest.raises(ConfigError, match="gpas is given twice"):
        parse_overrides(["gpas=true", "gpas=false"], NeoLLMModelArgs)


def test_command_line_and_toml_reach_the_model_args(tmp_path):
    from neollm.errors import ConfigError

    # torchtitan's list[str] convention on the command line: one comma-separated value
    job = parse("--model.overrides", "layer_pattern=A,gpas=true")
    assert job.model.overrides == ["layer_pattern=A", "gpas=true"]
    args = model_args(job)
    assert (args.layer_pattern, args.gpas, args.n_layers) == ("A", True, 4)
    assert model_args(parse()).layer_pattern == "DA"  # the flavor itself is untouched

    toml = tmp_path / "over.toml"
    toml.write_text(DEBUG.read_text().replace('flavor = "debug"',
                                              'flavor = "debug"\noverrides = ["mlp_type=polynorm", "n_layers=2"]'))
    args = model_args(parse(config=toml))
    assert (args.mlp_type, args.n_layers, args.layer_pattern) == ("polynorm", 2, "DA")
    # overrides are applied before validate(): a combination that cannot work is refused
    with pytest.raises(ConfigError, match="layer_pattern 'DA'.*must tile n_layers \\(3\\)"):
        model_args(parse("--model.overrides", "n_layers=3"))
    # space-separated values: the message says lists are one comma-separated value
    with pytest.raises(ConfigError, match="one comma-separated value: --model.overrides"):
        parse("--model.overrides", "gpas=true", "mea=true")


def test_preflight_reports_a_bad_override_in_one_line(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text(DEBUG.read_text().replace('flavor = "debug"', 'flavor = "debug"\noverrides = ["gpaz=true"]'))
    r = subprocess.run([sys.executable, "-m", "neollm.preflight", "--job.config_file", str(toml)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: [model] overrides: unknown model field 'gpaz'") and "'gpas'" in r.stderr


def test_meta_model_of_an_override_has_no_gdn_params():
    from neollm.model.params import count_parameters

    import torch

    from neollm.model.model import NeoLLM

    def names(args):
        with torch.device("meta"):
            return {n for n, _ in NeoLLM(args).named_parameters()}

    hybrid, attention_only = model_args(parse()), model_args(parse("--model.overrides", "layer_pattern=A"))
    assert any(n.endswith(".A_log") for n in names(hybrid) - names(attention_only))
    assert not any("A_log" in n or "conv1d" in n for n in names(attention_only))
    assert count_parameters(hybrid)[0] != count_parameters(attention_only)[0]


@pytest.mark.slow
def test_trainer_builds_the_overridden_model(tmp_path):
    """layer_pattern=A on the debug flavor: the checkpoint holds no Gated DeltaNet weights."""
    require_prepared_assets()
    dump = tmp_path / "run"
    result = run_trainer("--training.steps", "1", "--training.seq_len", "32", "--training.global_batch_size", "2",
                         "--training.local_batch_size", "2", "--checkpoint.interval", "1",
                         "--job.dump_folder", str(dump), "--model.overrides", "layer_pattern=A,gpas=true")
    assert result.returncode == 0, result.stdout[-3000:]
    from torch.distributed.checkpoint import FileSystemReader

    keys = set(FileSystemReader(str(dump / "checkpoint" / "step-1")).read_metadata().state_dict_metadata)
    model_keys = {k for k in keys if k.startswith("model.") or "layers." in k}
    assert any(".gpas." in k for k in model_keys), sorted(model_keys)[:20]
    assert not any("A_log" in k or "conv1d" in k for k in model_keys), sorted(model_keys)
