"""Every ./run_train.sh command line in README.md passes run_train.sh's preflight check (CPU).

The README's bash blocks are parsed (continuation lines joined, ``&&`` chains split, comments
dropped); each ``./run_train.sh`` line is checked by ``neollm.preflight.main`` with the world size
its ``NGPU`` / ``NNODES`` give, as run_train.sh would check it. What a reader supplies is made
here: ``my_corpus/*.jsonl`` is a folder of jsonl documents, the trimmed tokenizer the README
builds is built by the README's own trim_tokenizer line, and FineWeb-Edu (the hub) is a local
streamed jsonl, so the check needs no network. A documented command cannot rot unnoticed.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, require_prepared_assets

README = REPO / "README.md"


def readme_commands(text: str) -> list[str]:
    """Shell commands of the README's ```bash blocks, one string each."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            for part in re.split(r"&&|;", line):
                words = shlex.split(part, comments=True)
                if words:
                    commands.append(shlex.join(words))
    return commands


def run_train_lines() -> list[list[str]]:
    return [shlex.split(c) for c in readme_commands(README.read_text()) if "./run_train.sh" in c]


def test_readme_has_run_train_lines_to_check():
    lines = run_train_lines()
    assert len(lines) >= 6
    assert any("--training.dataset" in line for line in lines)


@pytest.fixture(scope="module")
def supplied(tmp_path_factory):
    """Stand-ins for what a reader supplies: their corpus, and the README's trimmed tokenizer."""
    require_prepared_assets()
    root = tmp_path_factory.mktemp("readme")
    corpus = root / "my_corpus"
    corpus.mkdir()
    docs = (REPO / "data" / "wiki_vital_en" / "validation.jsonl").read_text().splitlines()
    (corpus / "a.jsonl").write_text("\n".join(docs[:50]) + "\n")
    (corpus / "b.jsonl").write_text("\n".join(docs[50:]) + "\n")
    return {"my_corpus": str(corpus)}


def substitute(words: list[str], supplied: dict[str, str]) -> list[str]:
    return [w.replace("my_corpus", supplied["my_corpus"]) for w in words]


@pytest.fixture(scope="module")
def trimmed_tokenizer(supplied, tmp_path_factory):
    """The README's own trim_tokenizer command, on the stand-in corpus (its --out moved to tmp)."""
    trim = [shlex.split(c) for c in readme_commands(README.read_text()) if "tools/trim_tokenizer.py" in c]
    assert len(trim) == 1
    words = substitute(trim[0], supplied)
    out = words.index("--out")
    documented = words[out + 1]
    words[out + 1] = str(tmp_path_factory.mktemp("tok") / Path(documented).name)
    assert words[0] == "python"
    result = subprocess.run([sys.executable, *words[1:]], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return documented, words[out + 1]


def local_stream(path: str):
    """fineweb_edu's loader without the hub: the same repo[:config] parsing, local jsonl data."""
    from datasets import load_dataset

    from neollm.data.sources import parse_hub_path

    repo, config = parse_hub_path(path)
    assert repo == "HuggingFaceFW/fineweb-edu" and config.startswith("sample-")
    return load_dataset("json", data_files=str(REPO / "data" / "wiki_vital_en" / "validation.jsonl"),
                        split="train", streaming=True)


@pytest.mark.parametrize("index", range(len(run_train_lines())))
def test_readme_run_train_line_passes_preflight(index, supplied, monkeypatch, capsys, request):
    from torchtitan.hf_datasets import DatasetConfig
    from torchtitan.hf_datasets.text_datasets import DATASETS

    from neollm import preflight

    words = substitute(run_train_lines()[index], supplied)
    env = {}
    while "=" in words[0] and not words[0].startswith("-"):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    assert words[0] == "./run_train.sh", words
    args = words[1:]
    if "qwen3_64k" in " ".join(args):
        documented, built = request.getfixturevalue("trimmed_tokenizer")
        args = [a.replace(documented, built) for a in args]
    if not any(a.startswith("--job.config_file") for a in args):
        args = ["--job.config_file", env.get("CONFIG_FILE", "train_configs/debug.toml"), *args]
    for name in ("fineweb_edu", "fineweb_edu_validation"):
        monkeypatch.setitem(DATASETS, name, DatasetConfig(
            path=DATASETS[name].path, loader=local_stream, sample_processor=DATASETS[name].sample_processor))
    monkeypatch.chdir(REPO)
    world = int(env.get("NGPU", "1")) * int(env.get("NNODES", "1"))
    status = preflight.main(["--world-size", str(world), *args])
    assert status == 0, f"{' '.join(words)}: {capsys.readouterr().err}"


def test_changed_dataset_takes_its_own_default_path(monkeypatch):
    """`--training.dataset wiki_vital_en` on a TOML whose dataset_path is a hub path reads
    data/wiki_vital_en; with --training.dataset_path too, that path wins."""
    from neollm.config_check import parse_config

    monkeypatch.chdir(REPO)
    base = ["--job.config_file", "train_configs/neollm_135m.toml"]
    assert parse_config(base).training.dataset_path == "HuggingFaceFW/fineweb-edu:sample-10BT"
    assert parse_config([*base, "--training.dataset", "wiki_vital_en"]).training.dataset_path is None
    assert parse_config([*base, "--training.dataset=fineweb_edu"]).training.dataset_path == \
        "HuggingFaceFW/fineweb-edu:sample-10BT"  # the TOML's own dataset keeps its path
    given = parse_config([*base, "--training.dataset", "local_text", "--training.dataset_path", "x/*.jsonl"])
    assert given.training.dataset_path == "x/*.jsonl"


def test_changed_dataset_without_a_path_stops_with_a_clear_error(monkeypatch, capsys):
    from neollm import preflight

    require_prepared_assets()
    monkeypatch.chdir(REPO)
    status = preflight.main(["--job.config_file", "train_configs/neollm_135m.toml",
                             "--training.dataset", "local_text"])
    assert status == 2
    assert "local_text needs files: set [training] dataset_path" in capsys.readouterr().err
