"""Training a byte-level BPE tokenizer with the ``tokenizers`` trainer: the code behind
tools/train_tokenizer.py (its docstring gives the design: Qwen-style pre-tokenisation, 256 byte
symbols, ``<|endoftext|>`` as id 0 and the only special token).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from neollm.tokenizer import DOCUMENT_SEPARATOR, NeoLLMTokenizer, tokenizer_vocab_size


# Qwen2/Qwen3's pre-tokenisation pattern (digits one by one, contractions, words, punctuation).
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def tokenizer_config(max_length: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": DOCUMENT_SEPARATOR,
        "pad_token": DOCUMENT_SEPARATOR,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {"0": {"content": DOCUMENT_SEPARATOR, "lstrip": False, "normalized": False,
                                       "rstrip": False, "single_word": False, "special": True}},
    }


def train(texts, vocab_size: int, min_frequency: int = 2, show_progress: bool = True, length=None):
    """A trained byte-level BPE ``tokenizers.Tokenizer`` over the iterable ``texts``."""
    from tokenizers import pre_tokenizers, trainers

    tok = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
        special_tokens=[DOCUMENT_SEPARATOR], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def train_and_save(texts, n: int, out: Path, vocab_size: int, min_frequency: int = 2, show_progress: bool = True,
                   max_length: int = 131072) -> str:
    """Train on the ``n`` documents of the iterable ``texts``, write ``out/tokenizer.json`` and
    ``tokenizer_config.json``, load the folder as the trainer will; the summary line to print."""
    t0 = time.perf_counter()
    tok = train(texts, vocab_size, min_frequency, show_progress, length=n)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(max_length), indent=2) + "\n")
    loaded = NeoLLMTokenizer(str(out))  # what the trainer will load
    size = tokenizer_vocab_size(out)
    padded = -(-size // 64) * 64
    return (f"[train_tokenizer] {out}: {size:,} ids ({tok.get_vocab_size():,} requested {vocab_size:,}) "
            f"trained on {n:,} documents in {time.perf_counter() - t0:.1f}s; end-of-document "
            f"{loaded.eos_token!r} = {loaded.eos_id}. Use [model] hf_assets_path = \"{out}\" and "
            f"vocab_size >= {size} (e.g. {padded}, a multiple of 64).")
