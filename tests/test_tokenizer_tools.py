"""tools/train_tokenizer.py, tools/trim_tokenizer.py, tools/download_tokenizer.py (CPU, offline)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool

REPO = Path(__file__).resolve().parents[1]
QWEN3_DIR = REPO / "assets" / "tokenizer" / "qwen3"
WIKI_VALIDATION = REPO / "data" / "wiki_vital_en" / "validation.jsonl"

TRICKY = [
    "Hello world.", "  leading and trailing spaces  ", "tabs\tand\nnew\r\nlines\n\n\n",
    "Ünïcödé ñ ß Æ ø å", "日本語のテキスト、中文文本，한국어 텍스트", "emoji 🙂👍🏽🇫🇷 and ZWJ 👩‍👩‍👧",
    "Ελληνικά Русский עברית العربية हिन्दी", "math ∑∫√∞ ≤ ≥ ≠ → ⊂", "control \x00\x01\x07\x1b\x7f chars",
    "<|endoftext|> and <|im_end|> as plain text", "numbers 1234567890 3.14159 -42", "",
]


tool = load_tool


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Arbitrary unicode: code points from every plane (no surrogates), and bytes as latin-1."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        cps = []
        for _ in range(rng.randint(1, 40)):
            plane = rng.choice([0x7F, 0x7FF, 0xFFFF, 0x10FFFF])
            cp = rng.randint(0, plane)
            if 0xD800 <= cp <= 0xDFFF:
                cp = 0x20
            cps.append(chr(cp))
        out.append("".join(cps))
    out.append(bytes(range(256)).decode("latin-1"))
    return out


def wiki_texts() -> list[str]:
    if not WIKI_VALIDATION.is_file():
        pytest.fail("data/wiki_vital_en is missing: run `python tools/prepare_corpus.py`")
    return [json.loads(line)["text"] for line in WIKI_VALIDATION.read_text().splitlines()]


# ----------------------------------------------------------------------------- train_tokenizer


def test_train_tokenizer_writes_a_loadable_byte_level_bpe(tmp_path):
    from neollm.data.shards import TokenShards
    from neollm.tokenizer import NeoLLMTokenizer, tokenizer_vocab_size

    out = tmp_path / "bpe"
    assert tool("train_tokenizer").main(["--input", str(WIKI_VALIDATION), "--vocab-size", "600",
                                         "--out", str(out), "--quiet"]) == 0
    tok = NeoLLMTokenizer(str(out))
    assert tok.eos_token == "<|endoftext|>" and tok.eos_id == 0 and tok.bos_id is None
    assert 300 < tokenizer_vocab_size(out) <= 600
    for text in TRICKY + random_texts(20) + wiki_texts()[:20]:
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert ids[-1] == 0 and 0 not in ids[:-1]
        assert tok.decode(ids[:-1]) == tok.tokenizer.normalizer.normalize_str(text)  # NFC
    # merges learnt: the corpus encodes in fewer tokens than bytes
    sample = " ".join(wiki_texts()[:10])
    assert len(tok.encode(sample)) < 0.5 * len(sample.encode())

    # a vocabulary this small is stored as uint16 shards
    shards = tmp_path / "shards"
    assert tool("tokenize_data").main(["--input", str(WIKI_VALIDATION), "--tokenizer", str(out), "--out",
                                       str(shards), "--workers", "1", "--quiet"]) == 0
    assert json.loads((shards / "index.json").read_text())["dtype"] == "uint16"
    read = TokenShards(shards)
    assert read.document(5).dtype == np.uint16
    assert read.document(5).tolist() == tok.encode(wiki_texts()[5], add_bos=True, add_eos=True)


# ----------------------------------------------------------------------------- trim_tokenizer

N_TRIM = 3000


@pytest.fixture(scope="module")
def trimmed(tmp_path_factory):
    if not (QWEN3_DIR / "tokenizer.json").is_file():
        pytest.fail("assets/tokenizer/qwen3 is missing: run `python tools/prepare_corpus.py`")
    out = tmp_path_factory.mktemp("trim") / "qwen3_3k"
    assert tool("trim_tokenizer").main(["--tokenizer", str(QWEN3_DIR), "--input", str(WIKI_VALIDATION),
                                        "--vocab-size", str(N_TRIM), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def qwen3():
    from neollm.tokenizer import NeoLLMTokenizer

    return NeoLLMTokenizer(str(QWEN3_DIR))


def test_trimmed_tokenizer_has_n_ids_bytes_specials_and_frequent_tokens(trimmed, qwen3):
    from tokenizers import pre_tokenizers

    from neollm.tokenizer import NeoLLMTokenizer, tokenizer_vocab_size

    assert tokenizer_vocab_size(trimmed) == N_TRIM
    spec = json.loads((trimmed / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    assert sorted(vocab.values()) == list(range(len(vocab)))  # dense ids
    assert set(pre_tokenizers.ByteLevel.alphabet()) <= set(vocab)  # all 256 byte tokens
    added = [t["content"] for t in spec["added_tokens"]]
    assert len(added) == 26 and [t["id"] for t in spec["added_tokens"]] == list(range(len(vocab), N_TRIM))
    for a, b in (m if isinstance(m, list) else m.split(" ", 1) for m in spec["model"]["merges"]):
        assert a in vocab and b in vocab and a + b in vocab  # every kept token can be built
    config = json.loads((trimmed / "tokenizer_config.json").read_text())
    assert {v["content"]: int(k) for k, v in config["added_tokens_decoder"].items()} == \
        {t["content"]: t["id"] for t in spec["added_tokens"]}
    tok = NeoLLMTokenizer(str(trimmed))
    assert tok.eos_token == "<|endoftext|>" and tok.eos_id == len(vocab)
    # the corpus's most frequent Qwen3 tokens survive with the same strings
    counts: dict[int, int] = {}
    for text in wiki_texts():
        for i in qwen3.tokenizer.encode(text).ids:
            counts[i] = counts.get(i, 0) + 1
    top = sorted(counts, key=counts.get, reverse=True)[:200]
    assert all(qwen3.tokenizer.id_to_token(i) in vocab for i in top)
    report = json.loads((trimmed / "trim_report.json").read_text())
    assert report["vocab_size"] == N_TRIM and report["corpus_tokens_kept_fraction"] > 0.8


def test_trimmed_tokenizer_round_trips_any_text(trimmed, qwen3):
    from neollm.tokenizer import NeoLLMTokenizer

    tok = NeoLLMTokenizer(str(trimmed))
    texts = TRICKY + random_texts(200) + wiki_texts()
    for text in texts:
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert max(ids) < N_TRIM and ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
        expected = qwen3.decode(qwen3.encode(text))  # Qwen3 normalises to NFC; so must the trim
        assert tok.decode(ids[:-1]) == expected, repr(text)
    for text in wiki_texts():  # the corpus text is NFC already: exact round trip
        assert tok.decode(tok.encode(text)) == text
    # fewer ids -> longer sequences, but not absurdly so on the corpus it was trimmed on
    n_full = sum(len(qwen3.encode(t)) for t in wiki_texts())
    n_trim = sum(len(tok.encode(t)) for t in wiki_texts())
    assert n_full < n_trim < 1.6 * n_full


def test_trim_tokenizer_rejects_impossible_sizes(tmp_path, capsys):
    rc = tool("trim_tokenizer").main(["--tokenizer", str(QWEN3_DIR), "--input", str(WIKI_VALIDATION),
                                      "--vocab-size", "200", "--out", str(tmp_path / "x")])
    assert rc == 1 and "256 byte tokens" in capsys.readouterr().err


# ----------------------------------------------------------------------------- download_tokenizer


def test_download_tokenizer_offline_names_prepare_corpus(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = tool("download_tokenizer").main(["Qwen/Qwen3-0.6B", "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert rc == 1 and "unreachable" in err and "tools/prepare_corpus.py" in err
    assert not (tmp_path / "q").exists()


def test_download_tokenizer_writes_a_loadable_folder(tmp_path, monkeypatch, capsys):
    """The hub call itself replaced by the local Qwen3 files (no network here)."""
    import huggingface_hub

    from neollm.data import sources
    from neollm.tokenizer import tokenizer_vocab_size

    class EntryNotFoundError(Exception):
        pass

    def fake_download(repo, name, revision=None):
        assert repo == "Qwen/Qwen3-0.6B"
        if not (QWEN3_DIR / name).is_file():
            raise EntryNotFoundError(name)  # e.g. special_tokens_map.json: optional
        return str(QWEN3_DIR / name)

    monkeypatch.setattr(sources, "_hub_offline_reason", lambda: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert tool("download_tokenizer").main(["--out", str(tmp_path / "q")]) == 0
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert tokenizer_vocab_size(tmp_path / "q") == 151_669
    assert "vocab_size >= 151669 (e.g. 151680" in capsys.readouterr().out
