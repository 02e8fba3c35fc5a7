"""The model's embedding vs the tokenizer: too small is refused, larger only when it is the
tokenizer padded to a multiple of 64 or 128 or [model] allow_vocab_mismatch is set (CPU, fast)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def word_tokenizer(folder: Path, n: int) -> Path:
    """A tokenizer.json with ids 0..n-1 (largest id + 1 = n), without loading Qwen3."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, n)}}
    (folder / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
        "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}))
    return folder


_PARSED = {}


def job(tok: Path, *extra: str, flavor: str = "debug"):
    """debug.toml with another flavor and tokenizer; ``extra``: --model.vocab_size N and/or
    --model.allow_vocab_mismatch (as on the command line; parsed once per flag set)."""
    from torchtitan.config import ConfigManager

    import neollm  # noqa: F401  (registers the spec; NeoLLM's [model] keys)

    flags = tuple(a for a in extra if a.startswith("--model.allow"))
    if flags not in _PARSED:
        _PARSED[flags] = ConfigManager().parse_args(
            ["--job.config_file", str(REPO / "train_configs" / "debug.toml"), *flags])
    job_config = copy.deepcopy(_PARSED[flags])
    job_config.model.flavor, job_config.model.hf_assets_path = flavor, str(tok)
    if "--model.vocab_size" in extra:
        job_config.model.vocab_size = int(extra[extra.index("--model.vocab_size") + 1])
    return job_config


def update(job_config):
    from neollm.model.args import FLAVORS

    args = copy.deepcopy(FLAVORS[job_config.model.flavor])
    args.update_from_config(job_config)
    return args


def test_padded_sizes_pass_and_needless_rows_are_refused(tmp_path):
    from neollm.errors import ConfigError

    tok = word_tokenizer(tmp_path / "tok", 1030)  # padded: 1088 (x64), 1152 (x128)
    for size in (1030, 1088, 1152):
        assert update(job(tok, "--model.vocab_size", str(size))).vocab_size == size
    for size in (1100, 1216, 2048):
        with pytest.raises(ConfigError) as e:
            update(job(tok, "--model.vocab_size", str(size)))
        msg = str(e.value)
        assert "\n" not in msg and "[model] vocab_size = 1030" in msg and "1088 / 1152" in msg
        assert "[model] allow_vocab_mismatch = true" in msg and f"{size - 1030:,} unused" in msg
        allowed = update(job(tok, "--model.vocab_size", str(size), "--model.allow_vocab_mismatch"))
        assert allowed.vocab_size == size
    with pytest.raises(ConfigError, match="has 1,030 ids.*vocab_size = 1152"):  # too small
        update(job(tok, "--model.vocab_size", "1000", "--model.allow_vocab_mismatch"))
    # a flavor's own size is checked too, and the message says it is the flavor's
    with pytest.raises(ConfigError, match=r"vocab_size 49,152 \(flavor 'fanformer_92m'"):
        update(job(tok, flavor="fanformer_92m"))
    assert update(job(word_tokenizer(tmp_path / "smol", 49_152), flavor="fanformer_92m")).vocab_size == 49_152


def test_shipped_flavors_fit_their_tokenizers(tmp_path):
    """Qwen3 (151,669 ids) with 151,680 = padded to 64 and 128 (debug, hybrid, 135m configs);
    neollm_135m's own 64,402 with its 64,402-token trimmed tokenizer."""
    qwen_sized = word_tokenizer(tmp_path / "q", 151_669)
    for flavor in ("debug", "neollm_110m_hybrid"):
        assert update(job(qwen_sized, flavor=flavor)).vocab_size == 151_680
    assert update(job(qwen_sized, "--model.vocab_size", "151680", flavor="neollm_135m")).vocab_size == 151_680
    assert update(job(word_tokenizer(tmp_path / "t", 64_402), flavor="neollm_135m")).vocab_size == 64_402


def test_preflight_refuses_needless_rows_in_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    base = [sys.executable, "-m", "neollm.preflight", "--job.config_file", "train_configs/debug.toml",
            "--model.vocab_size", "151808"]  # Qwen3 needs 151,669: 151,680 is the padded size
    r = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: vocab_size 151,808 ([model] vocab_size)") and r.stderr.count("\n") == 1
    assert "151680" in r.stderr and "allow_vocab_mismatch" in r.stderr


def test_preflight_passes_with_the_allow_switch(capsys, monkeypatch):
    from neollm import preflight

    monkeypatch.chdir(REPO)
    rc = preflight.main(["--job.config_file", "train_configs/debug.toml", "--model.vocab_size", "151808",
                         "--model.allow_vocab_mismatch"])
    assert (rc, capsys.readouterr().err) == (0, "")
