"""The hash hold-out of a streamed source (fineweb_edu / fineweb_edu_validation), CPU, no network.

The hub is replaced by a local streaming dataset (``load_dataset("json", streaming=True)``) at
``datasets.load_dataset``, so the stream goes through the real fineweb_edu loader, NeoLLM's
dataloader builders and torchtitan's packing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
QWEN3_DIR = REPO / "assets" / "tokenizer" / "qwen3"
HUB = "HuggingFaceFW/fineweb-edu:sample-10BT"
L = 16
DOCS = [f"Document {i} is about the number {i * 7919 % 1000} and nothing else." for i in range(120)]
FRACTION = 0.2


@pytest.fixture(scope="module")
def tokenizer():
    from neollm.tokenizer import NeoLLMTokenizer

    if not (QWEN3_DIR / "tokenizer.json").is_file():
        pytest.fail("assets/tokenizer/qwen3 is missing: run `python tools/prepare_corpus.py`")
    return NeoLLMTokenizer(str(QWEN3_DIR))


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """fineweb_edu streams DOCS from a local jsonl (FineWeb-Edu's columns: id, text, ...)."""
    import datasets

    from neollm.data import sources

    jsonl = tmp_path / "fineweb.jsonl"
    jsonl.write_text("".join(json.dumps({"id": f"<urn:uuid:{i}>", "text": t, "score": 3.1}) + "\n"
                             for i, t in enumerate(DOCS)))
    real = datasets.load_dataset
    calls = []

    def fake(repo, name=None, split=None, streaming=False, **kwargs):
        if repo != "HuggingFaceFW/fineweb-edu":
            return real(repo, name=name, split=split, streaming=streaming, **kwargs)
        calls.append((repo, name, split, streaming))
        assert (name, split, streaming) == ("sample-10BT", "train", True)
        return real("json", data_files=str(jsonl), split="train", streaming=True)

    monkeypatch.setattr(sources, "_hub_offline_reason", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", fake)
    return calls


def make_job(*extra: str):
    from torchtitan.config import ConfigManager

    import neollm  # noqa: F401  (registers sources and NeoLLM's config keys)

    return ConfigManager().parse_args([
        "--job.config_file", str(REPO / "train_configs" / "debug.toml"),
        "--training.dataset", "fineweb_edu", "--training.dataset_path", HUB, "--training.seq_len", str(L),
        "--training.local_batch_size", "2", "--model.hf_assets_path", str(QWEN3_DIR),
        "--validation.enable", "--validation.seq_len", str(L), "--validation.local_batch_size", "2",
        "--data.holdout_fraction", str(FRACTION), *extra])


def rows(loader, n: int | None = None, it=None):
    it = iter(loader) if it is None else it
    out = []
    for k, (x, y) in enumerate(it):
        out += [r.tolist() for r in torch.cat([x["input"], y[:, -1:]], dim=1)]
        if n is not None and k + 1 == n:
            break
    return out, it


def windows(tokenizer, texts) -> list[list[int]]:
    """What packing must yield: documents + EOS, concatenated, cut into L + 1 token windows."""
    stream = [t for text in texts for t in tokenizer.encode(text, add_bos=True, add_eos=True)]
    return [stream[i:i + L + 1] for i in range(0, len(stream) - L, L + 1)]


def test_rule_is_the_shard_writers_and_is_deterministic():
    from neollm.data import shard_writer
    from neollm.data.holdout import is_held_out

    assert shard_writer.is_held_out is is_held_out  # tools/tokenize_data.py splits by this rule
    texts = [f"text {i} \u00e9\u4e2d" for i in range(2000)]
    assert not any(is_held_out(t, 0.0) for t in texts)
    assert [is_held_out(t, 0.3) for t in texts] == [is_held_out(t, 0.3) for t in reversed(texts)][::-1]
    share = sum(is_held_out(t, 0.01) for t in texts) / len(texts)
    assert 0.003 < share < 0.02


def test_training_skips_held_out_documents_and_validation_yields_only_them(local_hub, tokenizer):
    from neollm.data.holdout import is_held_out
    from neollm.data.loader import (build_neollm_dataloader, build_neollm_validation_dataloader,
                                    validation_source)

    held = [d for d in DOCS if is_held_out(d, FRACTION)]
    kept = [d for d in DOCS if not is_held_out(d, FRACTION)]
    assert 5 < len(held) < 60
    job = make_job()
    assert validation_source(job) == ("fineweb_edu_validation", HUB)  # [validation] enable alone
    train, _ = rows(build_neollm_dataloader(1, 0, tokenizer, job, infinite=False))
    assert train == windows(tokenizer, kept)
    val_loader = build_neollm_validation_dataloader(1, 0, tokenizer, job)
    first, _ = rows(val_loader)
    assert first == windows(tokenizer, held) and rows(val_loader)[0] == first  # same each pass
    assert len(local_hub) == 2  # both came from the (fake) hub stream


def test_held_out_stream_resumes_exactly_on_two_ranks(local_hub, tokenizer):
    from neollm.data.loader import build_neollm_dataloader

    job = make_job()
    for rank in range(2):
        full, _ = rows(build_neollm_dataloader(2, rank, tokenizer, job), 7)
        loader = build_neollm_dataloader(2, rank, tokenizer, job)
        head, _ = rows(loader, 3)
        state = loader.state_dict()
        resumed = build_neollm_dataloader(2, rank, tokenizer, job)
        resumed.load_state_dict(state)
        tail, _ = rows(resumed, 4)
        assert head + tail == full


def test_holdout_fraction_setting(local_hub):
    from neollm.data.loader import check_data
    from neollm.errors import ConfigError

    for bad in ("1", "-0.1", "1.5"):
        with pytest.raises(ConfigError, match=r"\[data\] holdout_fraction must be a number in \[0, 1\)"):
            check_data(make_job("--data.holdout_fraction", bad))
    with pytest.raises(ConfigError, match="fineweb_edu_validation.*holdout_fraction > 0"):
        check_data(make_job("--data.holdout_fraction", "0"))
    check_data(make_job())  # the default pair: fine
    held_out_file = str(REPO / "data" / "wiki_vital_en" / "validation.jsonl")
    check_data(make_job("--data.holdout_fraction", "0", "--validation.dataset", "local_text",
                        "--validation.dataset_path", held_out_file))
