"""Pre-tokenized shards: tools/tokenize_data.py, the ``shards`` source and its checks (CPU).

Small corpora are written into tmp_path; the tokenizer is the prepared Qwen3 one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_tool

from neollm.data.holdout import is_held_out

REPO = Path(__file__).resolve().parents[1]
QWEN3_DIR = REPO / "assets" / "tokenizer" / "qwen3"
ENDOFTEXT = 151643

# Documents of different lengths (some longer than a window), unicode and a special-token string.
DOCS = [
    f"Document {i}. " + " ".join(["alpha beta gamma delta"] * (1 + (i * 7) % 13))
    + (" Ünïcödé ✓ 日本語 🙂" if i % 5 == 0 else "") + (" <|endoftext|> inside" if i == 3 else "")
    for i in range(40)
]


def qwen3_dir() -> Path:
    if not (QWEN3_DIR / "tokenizer.json").is_file():
        pytest.fail(f"{QWEN3_DIR}/tokenizer.json is missing: run `python tools/prepare_corpus.py`")
    return QWEN3_DIR


@pytest.fixture(scope="module")
def tokenizer():
    from neollm.tokenizer import NeoLLMTokenizer

    return NeoLLMTokenizer(str(qwen3_dir()))


@pytest.fixture(scope="module")
def tool():
    return load_tool("tokenize_data")


def write_jsonl(path: Path, texts) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def tokenize(tool, *args: str) -> int:
    return tool.main(["--tokenizer", str(qwen3_dir()), "--quiet", *args])


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_bos=True, add_eos=True)


def windows(ds) -> list[list[int]]:
    return [torch.cat([x["input"], y[-1:]]).tolist() for x, y in ds]


@pytest.fixture(scope="module")
def shard_dir(tool, tmp_path_factory):
    """DOCS tokenized into several shards, ~30% of documents in validation."""
    root = tmp_path_factory.mktemp("shards")
    write_jsonl(root / "corpus" / "docs.jsonl", DOCS)
    rc = tokenize(tool, "--input", str(root / "corpus"), "--out", str(root / "out"),
                  "--docs-per-shard", "7", "--batch-docs", "3", "--validation-fraction", "0.3",
                  "--workers", "1")
    assert rc == 0
    return root / "out"


def split_docs(tool, fraction=0.3):
    train = [d for d in DOCS if not is_held_out(d, fraction)]
    val = [d for d in DOCS if is_held_out(d, fraction)]
    return train, val


# ----------------------------------------------------------------------------- tokenize_data


def test_index_and_documents_round_trip(tool, tokenizer, shard_dir):
    from neollm.data.shards import TokenShards, tokenizer_sha256

    index = json.loads((shard_dir / "index.json").read_text())
    train, val = split_docs(tool)
    assert 3 <= len(val) <= 25 and len(train) + len(val) == len(DOCS)
    assert index["tokenizer"]["sha256"] == tokenizer_sha256(qwen3_dir())
    assert index["tokenizer"]["vocab_size"] == 151_669 and index["tokenizer"]["eos_id"] == ENDOFTEXT
    assert index["dtype"] == "uint32"  # 151,669 ids do not fit 16 bits
    assert len(index["splits"]["train"]["shards"]) == 6  # ceil(40 / 7) input chunks
    for split, texts in (("train", train), ("validation", val)):
        shards = TokenShards(shard_dir, split)
        assert shards.num_documents == len(texts) == index["splits"][split]["documents"]
        expected = [encode(tokenizer, t) for t in texts]
        got = [shards.document(i).tolist() for i in range(len(texts))]
        assert got == expected  # EOS (<|endoftext|>) closes every document, no other EOS inside
        assert all(d[-1] == ENDOFTEXT and ENDOFTEXT not in d[:-1] for d in got)
        assert shards.num_tokens == sum(map(len, expected)) == index["splits"][split]["tokens"]
    assert index["max_token_id"] == ENDOFTEXT


def test_token_dtype():
    from neollm.data.shards import token_dtype

    assert token_dtype(65_536) == np.uint16 and token_dtype(64_402) == np.uint16
    assert token_dtype(65_537) == np.uint32 and token_dtype(151_669) == np.uint32


def test_shards_give_the_same_windows_as_on_the_fly_tokenization(tool, tokenizer, shard_dir):
    """text -> shards -> packed windows == text -> tokenizer -> torchtitan's packing, per rank."""
    from datasets import Dataset

    from neollm.data.shards import TokenShardDataset, TokenShards
    from neollm.data.sources import text_sample
    from neollm.data.text import NeoLLMTextDataset

    train, _ = split_docs(tool)
    shards = TokenShards(shard_dir)
    text = Dataset.from_dict({"text": train})
    for world in (1, 2):
        for rank in range(world):
            for limit in (0, 24):  # whole documents; truncated to 24 tokens (EOS kept)
                a = windows(TokenShardDataset(shards, 16, rank, world, infinite=False, max_doc_tokens=limit))
                b = windows(NeoLLMTextDataset("t", text, text_sample, tokenizer, 16, rank, world,
                                              infinite=False, max_doc_tokens=limit))
                assert a and a == b, (world, rank, limit)
    # one rank, whole documents: the windows are the concatenated documents, cut every 17 tokens
    stream = [t for d in train for t in encode(tokenizer, d)]
    got = windows(TokenShardDataset(shards, 16, infinite=False))
    assert got == [stream[i:i + 17] for i in range(0, len(stream) - 16, 17)]
    # and the on-the-fly path (documents tokenized ENCODE_CHUNK at a time) is one-at-a-time encoding's
    assert windows(NeoLLMTextDataset("t", text, text_sample, tokenizer, 16, infinite=False)) == got


def test_truncation_keeps_eos_and_limits_every_document(tool, tokenizer, shard_dir):
    from neollm.data.packing import truncate_document
    from neollm.data.shards import TokenShardDataset, TokenShards

    assert truncate_document([1, 2, 3, 4, 9], 3, 9) == [1, 2, 9]
    assert truncate_document([1, 2, 9], 3, 9) == [1, 2, 9]
    assert truncate_document(np.array([1, 2, 3, 4]), 3, 9).tolist() == [1, 2, 3]
    assert truncate_document([1, 2, 3, 4], 0, 9) == [1, 2, 3, 4]

    shards = TokenShards(shard_dir)
    flat = [t for w in windows(TokenShardDataset(shards, 8, infinite=False, max_doc_tokens=16)) for t in w]
    pieces, cur = [], []
    for t in flat:
        cur.append(t)
        if t == ENDOFTEXT:
            pieces.append(cur)
            cur = []
    assert len(pieces) >= shards.num_documents - 2
    assert max(map(len, pieces)) == 16  # documents were longer; each is cut to 16 incl. EOS
    first = shards.document(0).tolist()
    assert pieces[0] == (first[:15] + [ENDOFTEXT] if len(first) > 16 else first)


def test_multiprocess_matches_single_process(tool, tmp_path, shard_dir):
    write_jsonl(tmp_path / "c.jsonl", DOCS)
    rc = tokenize(tool, "--input", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "mp"),
                  "--docs-per-shard", "7", "--batch-docs", "3", "--validation-fraction", "0.3",
                  "--workers", "2")
    assert rc == 0
    for split in ("train", "validation"):
        for a, b in zip(sorted((tmp_path / "mp" / split).iterdir()), sorted((shard_dir / split).iterdir())):
            assert a.name == b.name and a.read_bytes() == b.read_bytes()


def test_interrupted_run_resumes_where_it_stopped(tool, tmp_path, monkeypatch, shard_dir):
    write_jsonl(tmp_path / "c.jsonl", DOCS)
    args = ["--input", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "out"), "--docs-per-shard", "7",
            "--batch-docs", "3", "--validation-fraction", "0.3", "--workers", "1"]
    from neollm.data import shard_writer

    real_write, real_tokenize = shard_writer.write_chunk, shard_writer._tokenize
    written = []

    def crash_after_two(out, source, k, parts, route):
        if len(written) == 2:
            raise KeyboardInterrupt  # killed while tokenizing chunk 2
        written.append(k)
        return real_write(out, source, k, parts, route)

    monkeypatch.setattr(shard_writer, "write_chunk", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        tokenize(tool, *args)
    assert written == [0, 1] and not (tmp_path / "out" / "index.json").exists()
    assert not list((tmp_path / "out").rglob("*.tmp"))  # nothing half-written

    tokenized = []
    monkeypatch.setattr(shard_writer, "write_chunk", real_write)
    monkeypatch.setattr(shard_writer, "_tokenize", lambda task: tokenized.append(task[0]) or real_tokenize(task))
    assert tokenize(tool, *args) == 0
    assert sorted(set(tokenized)) == [2, 3, 4, 5]  # chunks 0 and 1 were not tokenized again
    for split in ("train", "validation"):
        assert sorted(p.name for p in (tmp_path / "out" / split).iterdir()) == \
            sorted(p.name for p in (shard_dir / split).iterdir())
        for p in (shard_dir / split).iterdir():
            assert (tmp_path / "out" / split / p.name).read_bytes() == p.read_bytes()
    ref = json.loads((shard_dir / "index.json").read_text())["splits"]
    assert json.loads((tmp_path / "out" / "index.json").read_text())["splits"] == ref

    # a finished run is a no-op; changed settings are refused unless --force
    tokenized.clear()
    assert tokenize(tool, *args) == 0 and tokenized == []
    assert tokenize(tool, *args[:-4], "--validation-fraction", "0.1", "--workers", "1") == 1
    assert tokenize(tool, *args[:-4], "--validation-fraction", "0.1", "--workers", "1", "--force") == 0


def test_validation_input_and_missing_input(tool, tmp_path, capsys):
    write_jsonl(tmp_path / "train.jsonl", DOCS[:10])
    write_jsonl(tmp_path / "val.jsonl", DOCS[10:13])
    assert tokenize(tool, "--input", str(tmp_path / "train.jsonl"), "--validation-input",
                    str(tmp_path / "val.jsonl"), "--out", str(tmp_path / "o"), "--workers", "1") == 0
    splits = json.loads((tmp_path / "o" / "index.json").read_text())["splits"]
    assert splits["train"]["documents"] == 10 and splits["validation"]["documents"] == 3
    capsys.readouterr()
    assert tokenize(tool, "--input", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")) == 1
    assert "does not exist" in capsys.readouterr().err


def test_hub_offline_error_names_local_route(tool, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert tokenize(tool, "--hub", "HuggingFaceFW/fineweb-edu:sample-10BT", "--out", str(tmp_path / "h")) == 1
    err = capsys.readouterr().err
    assert "unreachable" in err and "--input" in err


# ----------------------------------------------------------------------------- checks


def test_shards_refuse_another_tokenizer_and_ids_beyond_the_model_vocab(shard_dir, tmp_path):
    from neollm.data.shards import TokenShards
    from neollm.errors import ConfigError

    shards = TokenShards(shard_dir)
    shards.check(qwen3_dir(), ENDOFTEXT, 151_680)  # the right tokenizer and vocabulary: fine
    other = tmp_path / "other_tok"
    other.mkdir()
    (other / "tokenizer.json").write_text((qwen3_dir() / "tokenizer.json").read_text() + "\n")
    with pytest.raises(ConfigError, match="another tokenizer.*hf_assets_path"):
        shards.check(other, ENDOFTEXT, 151_680)
    with pytest.raises(ConfigError, match=r"token id 151643.*\[model\] vocab_size >= 151644"):
        shards.check(qwen3_dir(), ENDOFTEXT, 64_402)
    with pytest.raises(ConfigError, match="end-of-document id"):
        shards.check(qwen3_dir(), 151645, 151_680)
    with pytest.raises(FileNotFoundError, match="tools/tokenize_data.py"):
        TokenShards(tmp_path / "missing")
    with pytest.raises(ConfigError, match="no 'validation' split"):
        bad = tmp_path / "nosplit"
        shutil.copytree(shard_dir, bad)
        index = json.loads((bad / "index.json").read_text())
        del index["splits"]["validation"]
        (bad / "index.json").write_text(json.dumps(index))
        TokenShards(bad, "validation")


def _preflight(capsys, *args: str) -> tuple[int, str]:
    from neollm import preflight

    capsys.readouterr()
    rc = preflight.main(["--job.config_file", "train_configs/debug.toml", *args])
    return rc, capsys.readouterr().err


def test_preflight_checks_shards(shard_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    shards = ["--training.dataset", "shards", "--training.dataset_path", str(shard_dir)]
    assert _preflight(capsys, *shards, "--validation.enable", "--validation.dataset",
                      "shards_validation") == (0, "")
    rc, err = _preflight(capsys, "--training.dataset", "shards", "--training.dataset_path", str(tmp_path / "none"))
    assert rc == 2 and "tools/tokenize_data.py" in err and err.count("\n") == 1
    other = tmp_path / "tok"
    shutil.copytree(qwen3_dir(), other)
    with open(other / "tokenizer.json", "a") as f:
        f.write(" ")
    rc, err = _preflight(capsys, *shards, "--model.hf_assets_path", str(other))
    assert rc == 2 and "another tokenizer" in err and err.count("\n") == 1


def test_max_doc_tokens_factor_setting():
    from types import SimpleNamespace

    from neollm.data.packing import max_doc_tokens
    from neollm.errors import ConfigError

    assert max_doc_tokens(SimpleNamespace(), 128) == 0  # no [data] section
    assert max_doc_tokens(SimpleNamespace(data=SimpleNamespace(max_doc_tokens_factor=4)), 128) == 512
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="max_doc_tokens_factor"):
            max_doc_tokens(SimpleNamespace(data=SimpleNamespace(max_doc_tokens_factor=bad)), 128)


def test_builder_refuses_ids_beyond_model_vocab(shard_dir, tokenizer):
    from torchtitan.config import ConfigManager

    from neollm.data.loader import build_neollm_dataloader
    from neollm.errors import ConfigError

    job = ConfigManager().parse_args([
        "--job.config_file", str(REPO / "train_configs" / "debug.toml"), "--training.dataset", "shards",
        "--training.dataset_path", str(shard_dir), "--model.hf_assets_path", str(qwen3_dir()),
        "--model.vocab_size", "100000"])
    with pytest.raises(ConfigError, match="vocab_size"):
        build_neollm_dataloader(1, 0, tokenizer, job)


# ----------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def wiki_shards(tool, tmp_path_factory):
    """The first 600 wiki_vital_en training documents + its validation file, as shards."""
    from conftest import require_prepared_assets

    require_prepared_assets()
    out = tmp_path_factory.mktemp("wiki") / "shards"
    assert tokenize(tool, "--input", str(REPO / "data/wiki_vital_en/train.jsonl"), "--max-docs", "600",
                    "--validation-input", str(REPO / "data/wiki_vital_en/validation.jsonl"),
                    "--out", str(out), "--workers", "1") == 0
    return out


def _train_on_shards(dump, shards, *extra, ngpu=1):
    from conftest import run_trainer

    result = run_trainer(
        "--training.dataset", "shards", "--training.dataset_path", str(shards),
        "--training.seq_len", "64", "--training.global_batch_size", "4", "--training.local_batch_size", "2",
        "--job.dump_folder", str(dump), *extra, ngpu=ngpu)
    assert result.returncode == 0, result.stdout[-4000:]
    train = "\n".join(line for line in result.stdout.splitlines() if "validate step" not in line)
    from conftest import losses_by_step

    return result.stdout, losses_by_step(train)


VALIDATE = re.compile(r"validate step:\s*(\d+)\s+loss:\s*([0-9.]+)")


@pytest.mark.slow
def test_trainer_on_shards_validates_and_resumes_exactly_with_two_ranks(wiki_shards, tmp_path):
    """./run_train.sh, NGPU=2: train 4 steps on shards (validation on the shards' validation
    split at steps 1 and 4), drop the last checkpoint, rerun: steps 3-4 and the step-4
    validation loss repeat exactly."""
    dump = tmp_path / "run"
    args = ("--training.steps", "4", "--checkpoint.interval", "2", "--data.max_doc_tokens_factor", "4",
            "--validation.enable", "--validation.dataset", "shards_validation", "--validation.freq", "4",
            "--validation.steps", "1", "--validation.seq_len", "64", "--validation.local_batch_size", "2")
    out, first = _train_on_shards(dump, wiki_shards, *args, ngpu=2)
    assert sorted(first) == [1, 2, 3, 4] and first[1] > 11.0 and first[4] < first[1]
    val = {int(s): float(v) for s, v in VALIDATE.findall(out)}
    assert sorted(val) == [1, 4] and all(10 < v < 12.5 for v in val.values())
    assert (dump / "checkpoint" / "step-2" / ".metadata").is_file()
    shutil.rmtree(dump / "checkpoint" / "step-4")

    out, resumed = _train_on_shards(dump, wiki_shards, *args, ngpu=2)
    assert "Training starts at step 3" in out
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(first[step], rel=1e-6, abs=1e-6), step
    val2 = {int(s): float(v) for s, v in VALIDATE.findall(out)}
    assert val2[4] == pytest.approx(val[4], rel=1e-6, abs=1e-6)

