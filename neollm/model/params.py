"""Parameter accounting: totals and what each technique switch adds to a flavor."""

from __future__ import annotations

import dataclasses

import torch

from neollm.model.args import FLAVORS, NeoLLMModelArgs

SHAPE_FIELDS = {
    "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden_dim", "vocab_size",
    "max_seq_len", "norm_eps", "rope_theta", "tie_embeddings", "init_std", "embedding_init_std",
    "layer_pattern",
    "gdn_num_heads", "gdn_head_dim", "gdn_expand_v", "gdn_conv_size", "gdn_backend",
    "gla_gate_low_rank_dim", "mamba2_expand", "mamba2_head_dim", "mamba2_state_size",
}
SHAPE_FIELDS |= {"rwkv_proj_low_rank_dim", "rwkv_gate_low_rank_dim", "rwkv_backend", "rnn_hidden_dim"}
# Settings of a technique that only matter while its switch is on (no technique of their own).
DEPENDENT_FIELDS = {"routing_directions", "fan_on_gdn", "moe_num_experts", "moe_top_k", "moe_hidden_dim",
                    "moe_aux_loss_coef", "simplegpt_scope", "momentum_first", "polynorm_exclusive_init"}


def technique_switches(args: NeoLLMModelArgs) -> dict[str, object]:
    """Technique fields whose value differs from 'off' (a default NeoLLMModelArgs), with that off value."""
    off = NeoLLMModelArgs()
    return {
        f.name: getattr(off, f.name)
        for f in dataclasses.fields(args)
        if f.name not in SHAPE_FIELDS | DEPENDENT_FIELDS and not f.name.startswith("_")
        and getattr(args, f.name) != getattr(off, f.name)
    }


def count_parameters(args: NeoLLMModelArgs) -> tuple[int, int]:
    """(total, embedding) parameters of the model these args build (on the meta device)."""
    from neollm.model.model import NeoLLM

    with torch.device("meta"):
        model = NeoLLM(args)
    return sum(p.numel() for p in model.parameters()), model.tok_embeddings.weight.numel()


def moe_inactive_parameters(args: NeoLLMModelArgs) -> int:
    """Expert weights a token does not use (mlp_type "moe": E - top_k experts per MoE layer); 0 otherwise."""
    if args.mlp_type != "moe":
        return 0
    per_expert = 3 * args.dim * args.moe_expert_hidden_dim()
    return args.n_layers * (args.moe_num_experts - args.moe_top_k) * per_expert


def all_off(args: NeoLLMModelArgs) -> NeoLLMModelArgs:
    """The same shape with every technique switched off: the flavor's plain baseline."""
    return dataclasses.replace(args, **technique_switches(args))


def technique_breakdown(args: NeoLLMModelArgs) -> dict[str, int]:
    """Parameters each switch adds when turned on alone on the flavor's plain baseline.

    Switches interact (SimpleNorm skips q/k when a QK norm is on; CoLA shrinks every projection
    other techniques add), so these do not sum to the flavor's total: flavor_report prints the
    remainder as "interactions".
    """
    base = all_off(args)
    base_total, _ = count_parameters(base)
    dependent = {name: getattr(args, name) for name in DEPENDENT_FIELDS}
    return {
        name: count_parameters(dataclasses.replace(base, **{name: getattr(args, name)}, **dependent))[0]
        - base_total
        for name in technique_switches(args)
    }


def flavor_report(name: str) -> str:
    args = FLAVORS[name]
    total, embedding = count_parameters(args)
    base_total, _ = count_parameters(all_off(args))
    lines = [f"{name}: {total:,} parameters ({embedding:,} embedding, {total - embedding:,} non-embedding)"]
    inactive = moe_inactive_parameters(args)
    if inactive:
        lines.append(f"  active per token (top-{args.moe_top_k} of {args.moe_num_experts} experts): "
                     f"{total - inactive:,}")
    breakdown = technique_breakdown(args)
    if breakdown:
        lines.append(f"  {'all switches off':<26} {base_total:>12,}")
        for switch, added in breakdown.items():
            lines.append(f"  {switch:<26} {added:>+12,}")
        lines.append(f"  {'interactions':<26} {total - base_total - sum(breakdown.values()):>+12,}")
    return "\n".join(lines)
