"""NeoLLM's tokenizer: torchtitan's HuggingFaceTokenizer, set up for document packing.

torchtitan's dataset packs documents as ``encode(text, add_bos=True, add_eos=True)`` one after
the other, and its block-causal attention mask splits documents at ``tokenizer.eos_id``.
The stock HuggingFaceTokenizer takes BOS/EOS from tokenizer_config.json. For Qwen3 that means
no BOS (``bos_token`` is null, so nothing is prepended) but EOS ``<|im_end|>`` (151645), the
chat end-of-turn token. Qwen separates pretraining documents with ``<|endoftext|>`` (151643)
instead. ``NeoLLMTokenizer`` therefore uses ``<|endoftext|>`` as ``eos`` whenever the vocabulary
has it, and keeps the config's BOS (none for Qwen3).

It also encodes special-token strings that occur in document text (say, a web page quoting
"<|endoftext|>") as plain text. Otherwise such a page would inject document separators into the
stream. Special tokens are still only added where ``encode`` adds them.
"""

from __future__ import annotations

import json
from pathlib import Path

from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.config import JobConfig

DOCUMENT_SEPARATOR = "<|endoftext|>"
PREPARE_HINT = ("make it with `python tools/prepare_corpus.py --only tokenizer` (Qwen3, offline) or "
                "`python tools/download_tokenizer.py REPO --out PATH` (online), or set [model] hf_assets_path")


class NeoLLMTokenizer(HuggingFaceTokenizer):
    """HuggingFaceTokenizer with ``<|endoftext|>`` as the end-of-document token (see module doc)."""

    def __init__(self, tokenizer_path: str, plain_text_specials: bool = True):
        super().__init__(tokenizer_path)
        sep_id = self.tokenizer.token_to_id(DOCUMENT_SEPARATOR)
        if sep_id is not None:
            self.eos_token, self.eos_id = DOCUMENT_SEPARATOR, sep_id
            self._infer_should_add_bos_eos()  # re-check whether the backend adds the new eos
        # Special-token strings inside the text are encoded as ordinary text.
        self.tokenizer.encode_special_tokens = plain_text_specials


def _tokenizer_dir(path: str | Path | None) -> Path:
    if not path:
        raise FileNotFoundError(f"[model] hf_assets_path is not set: {PREPARE_HINT}")
    p = Path(path)
    if not (p / "tokenizer.json").is_file():
        what = "does not exist" if not p.exists() else "has no tokenizer.json"
        raise FileNotFoundError(f"tokenizer folder {p} {what}: {PREPARE_HINT}")
    return p


def check_covers(tokenizer: NeoLLMTokenizer, vocab_size: int) -> None:
    """ValueError when ``tokenizer`` has ids past a checkpoint's ``vocab_size`` (the wrong folder given)."""
    if tokenizer.get_vocab_size() > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size():,} ids but the checkpoint's "
                         f"vocabulary is {vocab_size:,}: wrong --tokenizer?")


def start_id(tokenizer: NeoLLMTokenizer) -> int:
    """The id an empty prompt / a context-free window starts from: BOS, else the end-of-text id
    (Qwen: no BOS, so ``<|endoftext|>``, NeoLLM's document separator)."""
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id


def build_neollm_tokenizer(job_config: JobConfig) -> NeoLLMTokenizer:
    """TrainSpec ``build_tokenizer_fn``: the tokenizer in ``[model] hf_assets_path``."""
    return NeoLLMTokenizer(str(_tokenizer_dir(job_config.model.hf_assets_path)))


def tokenizer_vocab_size(path: str | Path, loaded=None) -> int:
    """Largest token id + 1, added tokens included: the embedding rows the model needs.

    ``path``: the tokenizer folder or its tokenizer.json. Ids listed in tokenizer_config.json's
    ``added_tokens_decoder`` count too, as torchtitan adds those tokens when it loads.
    ``loaded``: the folder's ``tokenizers.Tokenizer`` if already loaded (saves reading it again).
    """
    from tokenizers import Tokenizer

    p = Path(path)
    folder = _tokenizer_dir(p.parent if p.name == "tokenizer.json" else p)
    tok = loaded if loaded is not None else Tokenizer.from_file(str(folder / "tokenizer.json"))
    top = max(tok.get_vocab(with_added_tokens=True).values(), default=-1)
    config = folder / "tokenizer_config.json"
    if config.is_file():
        decoder = json.loads(config.read_text()).get("added_tokens_decoder") or {}
        top = max([top, *(int(i) for i in decoder)])
    return top + 1
