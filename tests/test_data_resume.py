"""Exact resume and rank disjointness of NeoLLM's dataloaders, without the trainer (CPU).

Each test builds the loader the trainer builds (neollm.data.loader.build_neollm_dataloader ->
torchtitan's ParallelAwareDataloader) for 2 simulated data-parallel ranks, iterates k batches,
saves the loader state as torchtitan's checkpointer does, rebuilds it, loads the state and
continues: the batches must equal those of an uninterrupted loader. Sources: pre-tokenized
shards, local jsonl (map-style), and a streaming dataset (``datasets``' own state_dict); with
and without dataloader workers.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import load_tool

REPO = Path(__file__).resolve().parents[1]
QWEN3_DIR = REPO / "assets" / "tokenizer" / "qwen3"
ENDOFTEXT = 151643
# Document i repeats its own word, one Qwen3 token (" apple", ...), 20 to 56 times, so the token
# ids a rank receives tell which documents it read (whatever the order in which dataloader
# workers' batches arrive; what a worker drops at its end, < 9 tokens, loses no document).
WORDS = ("apple river stone cloud music garden window silver forest bridge candle mirror ocean "
         "pencil rocket tiger violin wheat yellow anchor basket castle dragon engine glacier harbor "
         "island jungle kettle lemon").split()
N_DOCS = len(WORDS)
DOCS = [f"Document {i}:" + f" {w}" * (20 + (i * 11) % 37) + "." for i, w in enumerate(WORDS)]


@pytest.fixture(scope="module")
def tokenizer():
    from neollm.tokenizer import NeoLLMTokenizer

    if not (QWEN3_DIR / "tokenizer.json").is_file():
        pytest.fail("assets/tokenizer/qwen3 is missing: run `python tools/prepare_corpus.py`")
    return NeoLLMTokenizer(str(QWEN3_DIR))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The same documents as local jsonl and as token shards."""
    root = tmp_path_factory.mktemp("resume")
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    tool = load_tool("tokenize_data")
    assert tool.main(["--input", str(jsonl), "--out", str(root / "shards"), "--tokenizer", str(QWEN3_DIR),
                      "--validation-input", str(jsonl), "--docs-per-shard", "8", "--workers", "1",
                      "--quiet"]) == 0
    return {"local_text": str(jsonl), "shards": str(root / "shards")}


def make_job(dataset: str, path: str, *extra: str):
    from torchtitan.config import ConfigManager

    return ConfigManager().parse_args([
        "--job.config_file", str(REPO / "train_configs" / "debug.toml"),
        "--training.dataset", dataset, "--training.dataset_path", path, "--training.seq_len", "8",
        "--training.local_batch_size", "2", "--model.hf_assets_path", str(QWEN3_DIR), *extra])


def build(job, tokenizer, rank: int, world: int = 2, infinite: bool = True):
    from neollm.data.loader import build_neollm_dataloader

    return build_neollm_dataloader(world, rank, tokenizer, job, infinite=infinite)


def take(loader, n: int, it=None):
    it = it if it is not None else iter(loader)
    return [torch.cat([x["input"], y[:, -1:]], dim=1) for x, y, in (next(it) for _ in range(n))], it


def check_resume(job, tokenizer, k: int, m: int) -> None:
    """For both ranks: k batches, checkpoint, new loader + load, m batches == k + m uninterrupted."""
    for rank in range(2):
        full, _ = take(build(job, tokenizer, rank), k + m)
        first = build(job, tokenizer, rank)
        head, _ = take(first, k)
        state = first.state_dict()  # {"dp_rank_<r>": pickled StatefulDataLoader state, "world_size": 2}
        assert set(state) == {f"dp_rank_{rank}", "world_size"}
        resumed = build(job, tokenizer, rank)
        resumed.load_state_dict(state)
        tail, _ = take(resumed, m)
        assert len(full) == len(head) + len(tail) == k + m
        for step, (a, b) in enumerate(zip(full, head + tail)):
            assert torch.equal(a, b), f"rank {rank}, batch {step}"


def documents_seen(job, tokenizer, rank: int, world: int = 2) -> list[int]:
    """Documents in one pass of a rank's loader (finite), in order of first appearance."""
    word_ids = {tokenizer.encode(f" {w}")[0]: i for i, w in enumerate(WORDS)}
    assert len(word_ids) == N_DOCS
    loader = build(job, tokenizer, rank, world, infinite=False)
    seen: list[int] = []
    for x, y in loader:
        for t in torch.cat([x["input"], y[:, -1:]], dim=1).flatten().tolist():
            if t in word_ids and word_ids[t] not in seen:
                seen.append(word_ids[t])
    return seen


WORKERS = ("--training.dataloader.num_workers", "2")


@pytest.mark.parametrize("source", ["shards", "local_text"])
@pytest.mark.parametrize("workers", [False, True], ids=["no_workers", "2_workers"])
def test_ranks_read_disjoint_documents_that_cover_the_data(corpus, tokenizer, source, workers):
    job = make_job(source, corpus[source], *(WORKERS if workers else ()))
    seen = [documents_seen(job, tokenizer, rank) for rank in range(2)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(N_DOCS))  # each document exactly once
    if not workers:
        assert seen == [list(range(15)), list(range(15, 30))]  # contiguous halves, in order


@pytest.mark.parametrize("source", ["shards", "local_text"])
def test_resume_is_exact_across_epochs(corpus, tokenizer, source):
    job = make_job(source, corpus[source])
    per_epoch = min(len(list(build(job, tokenizer, rank, infinite=False))) for rank in range(2))
    assert per_epoch > 20
    # the checkpoint is taken 3 batches before the end of the first pass; the resumed loader
    # finishes the pass and starts the next one (with the tokens left over from the first)
    check_resume(job, tokenizer, k=per_epoch - 3, m=8)


@pytest.mark.parametrize("source", ["shards", "local_text"])
def test_resume_is_exact_with_truncation_and_workers(corpus, tokenizer, source):
    job = make_job(source, corpus[source], "--data.max_doc_tokens_factor", "2", *WORKERS)
    check_resume(job, tokenizer, k=5, m=4)


def test_shard_state_is_a_position_and_refuses_other_data(corpus, tokenizer):
    from neollm.data.shards import TokenShardDataset, TokenShards
    from neollm.errors import ConfigError

    shards = TokenShards(corpus["shards"])
    ds = TokenShardDataset(shards, 8, dp_rank=1, dp_world_size=2)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = ds.state_dict()
    assert state["epoch"] == 0 and state["rank_range"] == [15, 30] and state["documents"] == N_DOCS
    consumed = sum(len(shards.document(15 + d)) for d in range(state["doc"])) + state["offset"]
    assert consumed == 3 * 9  # exactly the tokens of three windows
    other = TokenShardDataset(shards, 8, dp_rank=0, dp_world_size=3)
    with pytest.raises(ConfigError, match="same shards and number of data-parallel ranks"):
        other.load_state_dict(state)


def test_streaming_dataset_resumes_with_its_own_state_dict(corpus, tokenizer, monkeypatch):
    """An iterable (streaming) source, e.g. fineweb_edu: datasets' IterableDataset.state_dict."""
    from datasets import load_dataset
    from torchtitan.hf_datasets import DatasetConfig
    from torchtitan.hf_datasets.text_datasets import DATASETS

    from neollm.data.sources import text_sample

    loader = partial(load_dataset, "json", split="train", streaming=True)
    monkeypatch.setitem(DATASETS, "stream_test", DatasetConfig(
        path="", loader=lambda path: loader(data_files=path), sample_processor=text_sample))
    job = make_job("stream_test", corpus["local_text"])
    check_resume(job, tokenizer, k=6, m=5)
    seen = [documents_seen(job, tokenizer, rank) for rank in range(2)]
    assert sorted(seen[0] + seen[1]) == list(range(N_DOCS)) and not set(seen[0]) & set(seen[1])


@pytest.mark.parametrize("source", ["shards", "local_text"])
def test_validation_loader_restarts_every_pass_and_splits_ranks(corpus, tokenizer, source):
    from neollm.data.loader import build_neollm_validation_dataloader, validation_source

    extra = ("--validation.enable", "--validation.seq_len", "8", "--validation.local_batch_size", "2")
    if source == "local_text":
        extra += ("--validation.dataset", "local_text", "--validation.dataset_path", corpus["local_text"])
    job = make_job(source, corpus[source], *extra)
    if source == "shards":  # [validation] enable alone: the shards' validation split, same folder
        assert validation_source(job) == ("shards_validation", corpus["shards"])
    word_ids = {tokenizer.encode(f" {w}")[0]: i for i, w in enumerate(WORDS)}
    seen = []
    for rank in range(2):
        loader = build_neollm_validation_dataloader(2, rank, tokenizer, job, infinite=True)
        passes = [take(loader, 4)[0] for _ in range(2)]  # two evaluations, 4 batches each
        assert all(torch.equal(a, b) for a, b in zip(*passes))  # the same held-out batches
        rows = [t for x, y in build_neollm_validation_dataloader(2, rank, tokenizer, job)
                for t in torch.cat([x["input"], y[:, -1:]], dim=1).flatten().tolist()]
        seen.append({word_ids[t] for t in rows if t in word_ids})
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(N_DOCS))


def test_validation_defaults(monkeypatch):
    from neollm.data.loader import check_data, validation_source
    from neollm.errors import ConfigError

    job = make_job("wiki_vital_en", "", "--validation.enable")
    assert validation_source(job) == ("wiki_vital_en_validation", "")
    job = make_job("local_text", "x.jsonl", "--validation.enable")
    assert validation_source(job) == ("c4_validation", None)  # no twin: torchtitan's default stays
    with pytest.raises(ConfigError, match="wiki_vital_en_validation, shards_validation"):
        check_data(job)


def test_shuffled_shards_resume_exactly_with_a_new_order_each_pass(corpus, tokenizer):
    from neollm.data.loader import check_data
    from neollm.data.shards import TokenShardDataset, TokenShards
    from neollm.errors import ConfigError

    job = make_job("shards", corpus["shards"], "--data.shuffle_documents", "--data.shuffle_seed", "7")
    seen = [documents_seen(job, tokenizer, rank) for rank in range(2)]
    assert sorted(seen[0]) == list(range(15)) and sorted(seen[1]) == list(range(15, 30))  # same halves
    assert seen[0] != list(range(15)) and seen[1] != list(range(15, 30))  # in another order
    per_epoch = min(len(list(build(job, tokenizer, rank, infinite=False))) for rank in range(2))
    check_resume(job, tokenizer, k=per_epoch - 3, m=8)  # across the pass boundary
    workers = make_job("shards", corpus["shards"], "--data.shuffle_documents", *WORKERS)
    check_resume(workers, tokenizer, k=5, m=4)
    ds = TokenShardDataset(TokenShards(corpus["shards"]), 8, shuffle_seed=7)
    orders = [ds._order(epoch, 0, N_DOCS).tolist() for epoch in (0, 1)]
    assert orders[0] != orders[1] and sorted(orders[1]) == list(range(N_DOCS))
    again = TokenShardDataset(TokenShards(corpus["shards"]), 8, shuffle_seed=7)
    assert again._order(0, 0, N_DOCS).tolist() == orders[0]  # a function of (seed, pass, range)
    with pytest.raises(ConfigError, match="shuffled with seed 7.*in order"):
        TokenShardDataset(TokenShards(corpus["shards"]), 8).load_state_dict(ds.state_dict())
    with pytest.raises(ConfigError, match="shuffle_documents applies to pre-tokenized shards.*'local_text'"):
        check_data(make_job("local_text", corpus["local_text"], "--data.shuffle_documents"))


def test_text_workers_take_every_kth_document(corpus, tokenizer, monkeypatch):
    """Local text with 2 dataloader workers: the loader's first two batches (one from each worker)
    start at documents 0 and 1, neighbours as without workers (a block per worker started the second
    at document 15, half the corpus away); a worker's position saved by the block split is refused."""
    from neollm.data.text import NeoLLMTextDataset
    from neollm.errors import ConfigError

    word_ids = {tokenizer.encode(f" {w}")[0]: i for i, w in enumerate(WORDS)}
    batches, _ = take(build(make_job("local_text", corpus["local_text"], *WORKERS), tokenizer, 0, world=1), 2)
    docs = [{word_ids[t] for t in b.flatten().tolist() if t in word_ids} for b in batches]
    assert docs == [{0}, {1}]
    loader = build(make_job("local_text", corpus["local_text"], *WORKERS), tokenizer, 0)
    take(loader, 3)
    state = loader.state_dict()
    resumed = build(make_job("local_text", corpus["local_text"], *WORKERS), tokenizer, 0)
    resumed.load_state_dict(state)
    take(resumed, 1)  # this version's own positions resume
    dataset = resumed.dataset
    assert isinstance(dataset, NeoLLMTextDataset)
    old = {"token_buffer": [], "sample_idx": 3}
    dataset.load_state_dict(old)  # outside a worker (no workers): the positions mean the same
    monkeypatch.setattr("neollm.data.text.get_worker_info", lambda: type("Worker", (), {"id": 0, "num_workers": 2}))
    with pytest.raises(ConfigError, match="exclude_from_loading dataloader"):
        dataset.load_state_dict(old)


@pytest.mark.parametrize("shuffle", [False, True], ids=["in_order", "shuffled"])
def test_shard_workers_deal_out_the_batches_of_a_loader_without_workers(corpus, tokenizer, shuffle):
    """With 2 dataloader workers each rank's batches are exactly those without workers (the workers
    take whole micro-batches of one stream in turn), so a step's sequences do not depend on the
    number of workers (a worker per block of documents made each batch one block's)."""
    extra = ("--data.shuffle_documents", "--data.shuffle_seed", "5") if shuffle else ()
    for rank in range(2):
        alone, _ = take(build(make_job("shards", corpus["shards"], *extra), tokenizer, rank), 12)
        dealt, _ = take(build(make_job("shards", corpus["shards"], *extra, *WORKERS), tokenizer, rank), 12)
        assert all(torch.equal(a, b) for a, b in zip(alone, dealt)), rank


def test_shard_workers_refuse_another_split_at_resume(corpus, tokenizer):
    """A position saved by 2 workers taking micro-batches of 2 is refused by a run with micro-batches of
    1; a worker's state without the split (saved when each worker read its own block of documents)
    is refused with the way out, in the worker that loads it."""
    from neollm.data.shards import TokenShardDataset, TokenShards
    from neollm.errors import ConfigError

    loader = build(make_job("shards", corpus["shards"], *WORKERS), tokenizer, 0)
    take(loader, 3)
    state = loader.state_dict()
    resumed = build(make_job("shards", corpus["shards"], *WORKERS, "--training.local_batch_size", "1"), tokenizer, 0)
    with pytest.raises(Exception, match="for 2 dataloader workers taking micro-batches of 2"):
        resumed.load_state_dict(state)
        take(resumed, 1)
    ds = TokenShardDataset(TokenShards(corpus["shards"]), 8, local_batch_size=2)
    old = {k: v for k, v in ds.state_dict().items() if k != "workers"}
    ds.load_state_dict(old)  # without workers the old and new positions mean the same
    ds._workers = lambda: (1, 2)  # as in the second of two workers
    with pytest.raises(ConfigError, match="exclude_from_loading dataloader"):
        ds.load_state_dict(old)


@pytest.mark.parametrize("workers", [False, True], ids=["no_workers", "2_workers"])
def test_interleaved_ranks_split_one_stream_the_same_way_for_any_rank_count(corpus, tokenizer, workers):
    """[data] interleave_ranks: 1, 2 and 4 ranks get the same global batches (window i of the one
    stream goes to rank i mod W), so every step's sequences do not depend on the rank count; with
    dataloader workers the batches still come out in stream order; resume is exact; another rank
    count or micro-batch is refused at resume."""
    from neollm.data.loader import check_data
    from neollm.errors import ConfigError

    extra = ("--data.interleave_ranks", "--data.shuffle_documents", "--data.shuffle_seed", "3",
             *(WORKERS if workers else ()))
    job = make_job("shards", corpus["shards"], *extra)
    one, _ = take(build(job, tokenizer, 0, world=1), 8)  # batches of 2 windows
    stream = [row for batch in one for row in batch]  # 16 windows, global order
    if workers:  # the workers' batches interleave back into the stream's order
        alone, _ = take(build(make_job("shards", corpus["shards"], *extra[:4]), tokenizer, 0, world=1), 8)
        assert all(torch.equal(a, b) for a, b in zip(stream, [row for batch in alone for row in batch]))
    for world in (2, 4):
        per_rank = [take(build(job, tokenizer, rank, world=world), 8 // world)[0] for rank in range(world)]
        for rank in range(world):
            rows = [row for batch in per_rank[rank] for row in batch]
            assert all(torch.equal(row, stream[j * world + rank]) for j, row in enumerate(rows)), (world, rank)
        # the first optimizer step (2 windows per rank) trains on the stream's first 2 x world windows
        step_sets = {tuple(sorted(tuple(r.tolist()) for b in (p[0] for p in per_rank) for r in b))}
        assert step_sets == {tuple(sorted(tuple(r.tolist()) for r in stream[: 2 * world]))}
    check_resume(job, tokenizer, k=3, m=4)
    loader = build(job, tokenizer, 0)
    take(loader, 2)
    state = loader.state_dict()
    for other in (make_job("shards", corpus["shards"], *extra[1:]),  # blocks instead of interleaved
                  make_job("shards", corpus["shards"], *extra, "--training.local_batch_size", "1")):
        resumed = build(other, tokenizer, 0)
        with pytest.raises(Exception, match="the checkpoint's data position is for"):
            resumed.load_state_dict(state)
            take(resumed, 1)
    with pytest.raises(ConfigError, match="interleave_ranks applies to pre-tokenized shards.*'local_text'"):
        check_data(make_job("local_text", corpus["local_text"], "--data.interleave_ranks"))


@pytest.fixture(scope="module")
def stream_files(tmp_path_factory):
    """The documents split over 4 jsonl files (a streamed dataset's shards)."""
    root = tmp_path_factory.mktemp("stream")
    files = []
    for k in range(4):
        f = root / f"part{k}.jsonl"
        f.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS[k::4]))
        files.append(str(f))
    return files


def streaming_source(monkeypatch, files):
    from datasets import load_dataset
    from torchtitan.hf_datasets import DatasetConfig
    from torchtitan.hf_datasets.text_datasets import DATASETS

    from neollm.data.sources import text_sample

    monkeypatch.setitem(DATASETS, "stream_files", DatasetConfig(
        path="", loader=lambda path: load_dataset("json", data_files=path.split(","), split="train",
                                                  streaming=True),
        sample_processor=text_sample))
    return ",".join(files)


@pytest.mark.parametrize("workers", [0, 2], ids=["no_workers", "2_workers"])
def test_streamed_dataset_resumes_exactly_a_second_and_third_time(stream_files, tokenizer, monkeypatch,
                                                                  workers):
    """torchtitan #3907: with datasets 5.0 a streamed dataset's state froze after a resume, so a
    second resume restarted at the first document. Three resumes in a row, 2 ranks, with and
    without dataloader workers, through NeoLLM's loader: the batches are the uninterrupted ones."""
    job = make_job("stream_files", streaming_source(monkeypatch, stream_files),
                   "--training.dataloader.num_workers", str(workers))
    for rank in range(2):
        full, _ = take(build(job, tokenizer, rank), 16)
        got, state = [], None
        for chunk in (4, 1, 4, 7):  # start, then three resumes; one checkpoint a batch after a resume, when
            # a worker has not read since its load (its state must be the loaded one, not its stream's start)
            loader = build(job, tokenizer, rank)
            if state is not None:
                loader.load_state_dict(state)
            batches, _ = take(loader, chunk)
            got += batches
            state = loader.state_dict()
        for step, (a, b) in enumerate(zip(full, got)):
            assert torch.equal(a, b), f"rank {rank}, batch {step}"


@pytest.mark.parametrize("workers", [0, 2], ids=["no_workers", "2_workers"])
@pytest.mark.parametrize("source", ["local_text", "stream"])
def test_text_resume_is_exact_across_tokenizer_chunks(corpus, stream_files, tokenizer, monkeypatch, source,
                                                      workers):
    """Text is tokenized ENCODE_CHUNK documents at a time, ahead of the packing; the state must stay
    per document. With chunks of 4 documents (a rank's 15 documents, ~36 batches, span 4 chunks) the
    resume points k = 3, 9, 30 and 37 fall in the first, third and last chunk and in the second pass;
    then 8 more batches == uninterrupted (a stream resumed in its second pass restarted elsewhere while
    ``datasets`` shared one pass counter between the workers)."""
    from neollm.data import text

    monkeypatch.setattr(text, "ENCODE_CHUNK", 4)  # read at call time; forked workers inherit it
    path = corpus["local_text"] if source == "local_text" else streaming_source(monkeypatch, stream_files)
    job = make_job(source if source == "local_text" else "stream_files", path,
                   "--training.dataloader.num_workers", str(workers))
    for k in (3, 9, 30, 37):
        check_resume(job, tokenizer, k=k, m=8)


def test_streamed_ranks_and_workers_read_disjoint_documents(stream_files, tokenizer, monkeypatch):
    job = make_job("stream_files", streaming_source(monkeypatch, stream_files),
                   "--training.dataloader.num_workers", "2")
    seen = [documents_seen(job, tokenizer, rank) for rank in range(2)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(N_DOCS))


def test_streamed_dataset_with_fewer_files_than_workers_is_refused(stream_files, tokenizer, monkeypatch):
    from neollm.errors import ConfigError

    job = make_job("stream_files", streaming_source(monkeypatch, stream_files[:2]),
                   "--training.dataloader.num_workers", "2")
    with pytest.raises(ConfigError, match=r"num_workers = 2, but .* only 1 file"):
        build(job, tokenizer, 0)


def test_datasets_keeps_a_streamed_position_after_resume():
    from neollm.data.text import check_stream_resume

    check_stream_resume()  # raises on a datasets with huggingface/datasets#8308


def test_text_dataset_state_is_a_snapshot_not_the_live_buffer():
    """The state taken after a batch must not change when the dataset goes on: a dataloader
    worker's queue pickles it later, while the generator already extends the token buffer."""
    import copy

    from datasets import Dataset

    from neollm.data.text import NeoLLMTextDataset

    class Words:
        def encode(self, text, add_bos=True, add_eos=True):
            return [len(w) for w in text.split()] + [0]

    docs = Dataset.from_dict({"text": [" ".join(["ab"] * n) for n in (3, 4, 5, 9, 4, 6)]})
    dataset = NeoLLMTextDataset("words", docs, lambda row: row["text"], Words(), seq_len=4)
    batches = iter(dataset)
    next(batches)  # 4 + 5 tokens in, 5 out: 4 left, so the next batch extends that list
    state = dataset.state_dict()
    saved = copy.deepcopy(state)
    next(batches)
    next(batches)
    assert state == saved
    assert state["token_buffer"] is not dataset._token_buffer
