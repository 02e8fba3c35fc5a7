"""NeoLLM's additions to torchtitan's JobConfig (merged by ``[job] custom_config_module``).

torchtitan merges these dataclasses field by field into its own, so ``[model] vocab_size``
sits beside torchtitan's ``[model]`` keys in the same TOML table.
"""

from dataclasses import dataclass, field


@dataclass
class Model:
    vocab_size: int = 0
    """Embedding rows. 0 keeps the flavor's size. It must cover the tokenizer's largest id;
    a size padded to a multiple of 64 or 128 keeps the tied head's matmul aligned."""

    allow_vocab_mismatch: bool = False
    """Allow an embedding larger than the tokenizer needs (its largest id + 1) beyond padding
    to a multiple of 64 or 128. Off: such a vocab_size is refused before step 1."""

    overrides: list[str] = field(default_factory=list)
    """Change single model fields of the flavor: ["layer_pattern=DA", "gpas=false", ...]. Each
    "field=value" names a NeoLLMModelArgs field (neollm/model/args.py) and is read by its type
    (bool true/false, int, float, str). On the command line: --model.overrides a=b c=d. Used by
    tools/ablate.py to swap one module at a time (neollm/model/overrides.py)."""


@dataclass
class Loss:
    impl: str = "auto"
    """"auto" ("fused" on CUDA, "chunked" elsewhere), "cce" (Cut Cross-Entropy: least memory, slower), "fused" (chunked
    matmuls with the gradient formed in the forward pass; neollm/loss/fused_linear_ce.py), "chunked" or "logits" (the whole
    logits materialised, compiled on CUDA, as torchtitan's stock loss: more memory; BENCHMARKS.md has the numbers)."""

    z_loss: float = 0.0
    """Weight of the z-loss, z_loss * logsumexp(logits)^2 per token (0 = off)."""

    chunk_size: int = 4096
    """Tokens per logits chunk on the chunked path (peak memory: chunk_size x vocab fp32)."""


@dataclass
class Optimizer:
    """NeoLLM's keys in ``[optimizer]`` (torchtitan's name, lr, beta1, beta2, eps, weight_decay,
    implementation stay). ``name`` may be "AdamW", "Adam", "AdEMAMix" or "Conda"
    (neollm/optim). Weight decay applies only to matrices not flagged ``_no_weight_decay``.
    ``implementation`` for our optimizers (no fused kernels): AdEMAMix batches with foreach ops unless
    "for-loop"; Conda batches (foreach ops, batched projections) with "foreach", not with "for-loop",
    and with "fused" (torchtitan's default) on CUDA only."""

    beta3: float = 0.9999
    """AdEMAMix: slow-EMA coefficient (paper/official default 0.9999; seed 000 uses 0.999)."""

    alpha: float = 2.0
    """AdEMAMix: weight of the slow EMA in the update (official code default 2; seed 000: 5)."""

    t_alpha: int = 0
    """AdEMAMix: steps of linear alpha warm-up from 0 (0 = none; seed 000: 5000)."""

    t_beta3: int = 0
    """AdEMAMix: steps of beta3 warm-up from beta1, linear in half-life (0 = none; seed 000: 5000)."""

    conda_update_proj_gap: int = 500
    """Conda: recompute each matrix's SVD basis every this many steps (and at the first)."""

    conda_scale: float = 0.25
    """Conda: multiplier of the back-projected matrix update."""

    conda_correct_bias: bool = True
    """Conda: Adam bias correction lr * sqrt(1 - beta2^t) / (1 - beta1^t)."""

    conda_version: str = "2025-10-26"
    """Conda: the author's Conda_optimizer.py by commit date: "2025-10-26" (first, 'std') or "2026-04-16"
    (latest: m/v bias correction, U for square matrices, cautious weight decay before the step)."""

    conda_precision: str = "ieee"
    """Conda: the projections' fp32 matmuls on a GPU: "ieee" (the reference's) or "tf32" (tensor cores,
    a relative error of order 1e-3 in the update by TF32's rounding; +4.4% tok/s for NeoLLM-135M on an H100,
    its loss A/B not yet run; neollm/optim/conda.py)."""

    conda_basis: str = "svd"
    """Conda: where the SVDs of each basis refresh (every conda_update_proj_gap steps) run: "svd" one
    after another on the device (the reference; 2.1 s a refresh for NeoLLM-135M on an H100), "svd-batched"
    one batched SVD per matrix shape, "svd-cpu" on the host's CPU threads; the same bases up to rounding
    and signs (neollm/optim/conda.py)."""


@dataclass
class LRScheduler:
    """NeoLLM's key in ``[lr_scheduler]`` (torchtitan's warmup_steps, total_steps, decay_ratio,
    decay_type, min_lr_factor stay)."""

    start_lr_factor: float | None = None
    """Warm up linearly from start_lr_factor x lr (the first step's LR) to lr over warmup_steps,
    then decay to min_lr_factor x lr at total_steps (neollm/optim/schedule.py). Unset: torchtitan's
    schedule unchanged (warm-up from lr / warmup_steps). Seed 000: 0.5 (3e-4 -> 6e-4)."""


@dataclass
class Data:
    """NeoLLM's data keys. The source itself is torchtitan's ``[training] dataset`` /
    ``dataset_path`` (and ``[validation] dataset`` / ``dataset_path``): see neollm/data."""

    max_doc_tokens_factor: int = 0
    """Truncate every document to max_doc_tokens_factor x seq_len tokens, its end-of-document
    token included (seed 000: 4). 0 keeps documents whole. Applies to every source (text read
    on the fly and pre-tokenized shards), in training and in validation (with that seq_len)."""

    holdout_fraction: float = 0.01
    """Share of a stream's documents held out for validation, by a hash of each document's text
    (neollm/data/holdout.py; seed 000: 1%). Applies to ``fineweb_edu``, which skips them, and
    ``fineweb_edu_validation``, which yields only them. 0 = hold nothing out."""

    shuffle_documents: bool = False
    """Pre-tokenized shards (``[training] dataset = "shards"``): read each rank's (and worker's)
    documents in a new order every pass, from shuffle_seed and the pass number (exact resume).
    Off: shard order. Text sources read in file order (tokenize them to shuffle)."""

    shuffle_seed: int = 0
    """Seed of shuffle_documents' permutations."""

    interleave_ranks: bool = False
    """Pre-tokenized shards: every data-parallel rank walks the same packed stream of all documents
    and keeps every W-th window (rank r: windows r, r + W, ...), so a step trains on the same
    global batch of sequences whatever the number of ranks, and 1 and N GPUs take the same steps
    (up to reduction order). Off: rank r reads the r-th contiguous block of documents (no rank
    reads another's tokens). Training only; validation keeps the blocks."""


@dataclass
class Guard:
    """What a bad training loss does (neollm/faults.py). Checked every step on the device (one
    scalar all-reduce per step). "stop" reads the verdict without waiting for the device (the
    run stops, naming the bad step, a step or a few later, always before a checkpoint is saved);
    "skip" reads it before the optimizer step: one host sync per step. "off" removes it."""

    on_bad_loss: str = "stop"
    """"stop": end the run with an error naming the step (no checkpoint of the bad step);
    "skip": drop the batch (no optimizer step; the LR schedule still advances); "off"."""

    max_loss_ratio: float = 0.0
    """A loss over max_loss_ratio x the running mean of the last `window` good losses is bad
    (e.g. 3.0). 0 = only NaN/inf are bad."""

    window: int = 50
    """Good losses in the running mean."""

    warmup_steps: int = 10
    """Good losses needed before the spike test applies."""

    max_consecutive_skips: int = 10
    """With "skip": stop after this many bad steps in a row."""


@dataclass
class Monitor:
    """NeoLLM's run monitoring (neollm/monitor.py), beside torchtitan's [metrics]."""

    jsonl: bool = True
    """Append every logged metric (full precision) to <dump_folder>/metrics.jsonl (rank 0)."""

    technique_scalars: bool = True
    """Log per-technique scalars (GPAS gates, PolyNorm weights, gate biases) at each log step."""

    progress: bool = True
    """Print a progress line (step / total, elapsed, ETA) at each log step."""

    data_wait_warn: float = 0.05
    """Warn at a log step when the steps since the last one spent more than this share of their
    wall time waiting for the dataloader (0 = never)."""


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_SCOPES = ("blocks", "model")


@dataclass
class Compile:
    """NeoLLM's keys in ``[compile]`` (torchtitan's enable, components, backend stay); levers for
    small per-GPU batches, whose steps are bound by the host's kernel launches
    (neollm/parallelize.py: compile_model)."""

    mode: str = "default"
    """torch.compile mode: "default"; "reduce-overhead" (CUDA graphs: each compiled graph is
    replayed as one launch); "max-autotune" (autotuned kernels and CUDA graphs);
    "max-autotune-no-cudagraphs"."""

    scope: str = "blocks"
    """"blocks": each block compiled alone (identical blocks share one graph; works with FSDP2).
    "model": the whole forward, the fused loss included, compiled as one (fewer graphs and
    launches; one GPU or DDP only: FSDP2's per-block hooks split it anyway)."""


@dataclass
class JobConfig:
    model: Model = field(default_factory=Model)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    loss: Loss = field(default_factory=Loss)
    data: Data = field(default_factory=Data)
    guard: Guard = field(default_factory=Guard)
    monitor: Monitor = field(default_factory=Monitor)
    compile: Compile = field(default_factory=Compile)
