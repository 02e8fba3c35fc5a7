"""Wrap a NeoLLM model for training: activation checkpointing, per-block compile, FSDP2/HSDP/DDP.

The model file knows nothing of parallelism; this function is the TrainSpec's ``parallelize_fn``
and follows torchtitan's llama3 order (AC -> compile -> data parallel). It differs from llama3's
in three ways: the tied embedding/head weight lives in the root FSDP unit (one parameter, one
unit); on the CPU (gloo) FSDP2 reduces with plain sums (see neollm.titan_cpu); and DDP sums the
replicas' gradients instead of averaging them (the loss is already divided by the global token
count), as FSDP2 does here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torchtitan.config import TORCH_DTYPE_MAP, JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.models.llama3.infra.parallelize import _op_sac_save_list
from torchtitan.models.llama3.infra.parallelize import apply_ddp as titan_apply_ddp
from torchtitan.tools.logging import logger

from neollm.kernels.attention_epilogue import EPILOGUE_OPS
from neollm.kernels.gdn_ops import GDN_OPS
from neollm.kernels.lucid import LUCID_OPS
from neollm.kernels.polynorm_glu import POLYNORM_OPS
from neollm.kernels.qk_path import QK_PATH_OPS
from neollm.titan_cpu import cpu_wanted, force_sum_reduction

# Selective-op AC keeps these outputs: torchtitan's list (matmuls, attention), Gated DeltaNet's two
# custom ops, whose recompute would rerun the delta rule's whole forward in the backward, and LUCID's
# solve (its Gram matrix and triangular solve; X is [B, Hkv, T, d], the size of V in fp32, and the
# diagonal blocks' inverses, which its backward reuses), the
# fused PolyNorm GLU and attention epilogue (the down and output projections' inputs, which their
# matmuls' backward reads) and the fused q/k path (SDPA's q and k, which SDPA's backward reads).
SAC_SAVE_OPS = (_op_sac_save_list | set(GDN_OPS) | set(LUCID_OPS) | set(POLYNORM_OPS) | set(EPILOGUE_OPS)
                | set(QK_PATH_OPS))


def parallelize_neollm(model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig) -> nn.Module:
    unsupported = {
        "tensor_parallel_degree": parallel_dims.tp,
        "context_parallel_degree": parallel_dims.cp,
        "expert_parallel_degree": parallel_dims.ep,
    }
    for key, degree in unsupported.items():
        if degree > 1:
            raise NotImplementedError(
                f"[parallelism] {key} = {degree}: NeoLLM (~100M parameters) trains with data "
                f"parallelism only (FSDP2/HSDP); set {key} = 1"
            )

    compile_model = job_config.compile.enable and "model" in job_config.compile.components
    checkpoint_blocks(model, job_config.activation_checkpoint, compile_model, job_config.job.dump_folder)
    if compile_model:
        compile_model_for_training(model, job_config.compile, fsdp=parallel_dims.fsdp_enabled)

    if parallel_dims.fsdp_enabled:
        mesh_names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
        apply_fsdp(model, parallel_dims.get_mesh(mesh_names), job_config)
        logger.info("Applied %s to the model", "HSDP" if parallel_dims.dp_replicate_enabled else "FSDP")
    elif parallel_dims.dp_replicate_enabled:
        apply_ddp(model, parallel_dims.get_mesh("dp_replicate"), enable_compile=compile_model)
    return model


def checkpoint_blocks(model: nn.Module, ac_config, compile_model: bool, base_folder: str = "") -> None:
    """torchtitan's activation checkpointing per block (``[activation_checkpoint]``: none, selective
    or full), with NeoLLM's list of ops whose outputs selective-op AC keeps. Before compile."""
    if ac_config.mode != "none":
        apply_ac(model, ac_config, model_compile_enabled=compile_model, op_sac_save_list=SAC_SAVE_OPS,
                 base_folder=base_folder)


# Mixers whose blocks trace whole: attention, and Gated DeltaNet (its fla kernels are the custom ops of
# neollm/kernels/gdn_ops.py). The other fla mixers still call fla under torch.compiler.disable.
FULLGRAPH_MIXERS = frozenset("AD")


def compile_settings(compile_config, fsdp: bool = False) -> tuple[str | None, str]:
    """(torch.compile mode or None for "default", scope) of ``[compile]``, validated."""
    from neollm.config import COMPILE_MODES, COMPILE_SCOPES
    from neollm.errors import ConfigError

    mode = getattr(compile_config, "mode", "default")
    scope = getattr(compile_config, "scope", "blocks")
    if mode not in COMPILE_MODES:
        raise ConfigError(f"[compile] mode {mode!r} is unknown: choose one of {', '.join(COMPILE_MODES)}")
    if scope not in COMPILE_SCOPES:
        raise ConfigError(f"[compile] scope {scope!r} is unknown: choose one of {', '.join(COMPILE_SCOPES)}")
    if scope == "model" and fsdp:
        raise ConfigError(
            '[compile] scope = "model" needs the model unsharded (one GPU, or DDP: '
            'data_parallel_shard_degree = 1): FSDP2 wraps each block; use scope = "blocks"')
    return (None if mode == "default" else mode), scope


def compile_model_for_training(model: nn.Module, compile_config, fsdp: bool = False) -> None:
    """``[compile]``: per block (``scope = "blocks"``) or the whole forward in place
    (``nn.Module.compile``: parameter names and checkpoints unchanged), with ``mode``."""
    mode, scope = compile_settings(compile_config, fsdp)
    backend = compile_config.backend
    if scope == "model":
        model.compile(backend=backend, mode=mode)
        logger.info("Compiled the whole NeoLLM model with torch.compile (backend %s, mode %s)",
                    backend, mode or "default")
        return
    compile_blocks(model, backend, mode)


def compile_blocks(model: nn.Module, backend: str, mode: str | None = None) -> None:
    """torch.compile each block: identical blocks share one compiled graph.

    Attention and Gated DeltaNet blocks compile whole (fullgraph: a graph break is an error). The other
    fla mixers call fla's Triton autograd functions under torch.compiler.disable, and MoE blocks route a
    data-dependent number of tokens to each expert (the CPU expert loop reads the counts on the host),
    so those allow graph breaks.
    """
    for layer_id, block in model.layers.named_children():
        inner = getattr(block, "_checkpoint_wrapped_module", block)
        fullgraph = getattr(inner, "mixer_code", "A") in FULLGRAPH_MIXERS and not getattr(inner, "moe", False)
        model.layers.register_module(layer_id, torch.compile(block, backend=backend, fullgraph=fullgraph,
                                                             mode=mode))
    logger.info("Compiled each NeoLLM block with torch.compile (backend %s, mode %s)", backend, mode or "default")


def _allreduce_sum_hook(process_group, bucket):
    """DDP communication hook: all-reduce a gradient bucket with SUM (DDP's default divides by the
    number of replicas)."""
    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def apply_ddp(model: nn.Module, dp_mesh, enable_compile: bool) -> None:
    """torchtitan's DDP (composable ``replicate``), with gradients summed across replicas.

    The trainer divides the loss by the global token count itself, so each replica's gradient is
    its share of the global one and the right reduction is a sum, as FSDP2 gets with
    ``set_gradient_divide_factor(1.0)`` (apply_fsdp). DDP's default averages: on 4 H100s the
    gradient norm was a quarter of FSDP2's and clipping changed the updates (BENCHMARKS.md)."""
    titan_apply_ddp(model, dp_mesh, enable_compile=enable_compile)
    model.register_comm_hook(dp_mesh.get_group(), _allreduce_sum_hook)


def apply_fsdp(model: nn.Module, mesh, job_config: JobConfig) -> None:
    training = job_config.training
    config = {
        "mesh": mesh,
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=TORCH_DTYPE_MAP[training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[training.mixed_precision_reduce],
        ),
    }
    if training.enable_cpu_offload:
        config["offload_policy"] = CPUOffloadPolicy()
    policy = job_config.parallelism.fsdp_reshard_after_forward
    if policy not in ("default", "always", "never"):
        raise ValueError(
            f"[parallelism] fsdp_reshard_after_forward must be default, always or never, got {policy!r}"
        )
    reshard = policy != "never"
    blocks = list(model.layers.values())
    for index, block in enumerate(blocks):
        # The last block is needed again first in backward: keeping it gathered saves an all-gather.
        last = index == len(blocks) - 1
        fully_shard(block, **config, reshard_after_forward=reshard and not (last and policy == "default"))
    fully_shard(model, **config)  # root unit: embedding (= tied head), final norm
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # The trainer divides the loss by the global token count itself.
            module.set_gradient_divide_factor(1.0)
    if cpu_wanted():
        force_sum_reduction(model)
