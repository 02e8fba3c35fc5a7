"""How fast a data source delivers training tokens through the trainer's own dataloader.

``measure_source`` builds the loader the trainer builds (neollm.data.loader, rank 0 of 1, the
run's tokenizer, seq_len, local batch and ``[training.dataloader]`` settings), lets it start
(worker start-up, the first batches), then times ``batches`` batches. tools/bench_data.py prints
the result beside what a model consumes on the GPU at hand.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass


@dataclass
class SourceSpeed:
    source: str
    path: str | None
    workers: int
    tok_per_s: float
    batches: int


def measure_source(job_config, source: str, path: str | None, batches: int = 50,
                   warmup: int = 5, workers: int | None = None) -> SourceSpeed:
    """Tokens per second (input tokens of the batches) that ``source`` delivers."""
    from neollm.data.loader import build_neollm_dataloader
    from neollm.tokenizer import build_neollm_tokenizer

    job = copy.deepcopy(job_config)
    job.training.dataset, job.training.dataset_path = source, path
    if workers is not None:
        job.training.dataloader.num_workers = workers
    tokenizer = build_neollm_tokenizer(job)
    loader = build_neollm_dataloader(1, 0, tokenizer, job, infinite=True)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    tokens = 0
    start = time.perf_counter()
    for _ in range(batches):
        _, labels = next(it)
        tokens += labels.numel()
    elapsed = time.perf_counter() - start
    del it, loader
    return SourceSpeed(source, path, job.training.dataloader.num_workers, tokens / elapsed, batches)
