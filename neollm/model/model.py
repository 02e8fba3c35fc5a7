"""NeoLLM: token embedding -> decoder blocks -> final RMSNorm -> (tied) LM head.

Parallelism lives outside (neollm/parallelize.py). Attribute names follow torchtitan's
conventions (``tok_embeddings``, ``layers`` as a ModuleDict, ``norm``, ``output``) so its
activation-checkpointing, compile and float8 helpers apply unchanged. With tied embeddings
there is no ``output`` module: the head multiplies by ``tok_embeddings.weight`` directly, which
keeps the single shared parameter in one FSDP unit.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchtitan.protocols.model import ModelProtocol

from neollm.loss import IGNORE_INDEX, LossSettings, linear_cross_entropy_sum
from neollm.model.args import FLAVORS, NeoLLMModelArgs
from neollm.model.block import Block
from neollm.model.rope import rope_cache


class NeoLLM(ModelProtocol):
    def __init__(self, model_args: NeoLLMModelArgs) -> None:
        super().__init__(model_args)
        self.model_args = model_args
        self.tok_embeddings = nn.Embedding(model_args.vocab_size, model_args.dim)
        self.layers = nn.ModuleDict(
            {str(i): Block(i, code, model_args) for i, code in enumerate(model_args.layer_types())}
        )
        self.norm = nn.RMSNorm(model_args.dim, eps=model_args.norm_eps)
        self.output = (
            None if model_args.tie_embeddings
            else nn.Linear(model_args.dim, model_args.vocab_size, bias=False)
        )
        self.register_buffer("rope", self._rope_table(), persistent=False)
        self.loss_settings = LossSettings()  # the trainer sets the run's [loss] section
        self.last_moe_aux_loss: torch.Tensor | None = None  # sum over layers, last forward with labels (MoE)

    def _rope_table(self, device: torch.device | None = None) -> torch.Tensor:
        a = self.model_args
        return rope_cache(a.head_dim, a.max_seq_len, a.rope_theta, device=device)

    def init_buffers(self, buffer_device: torch.device | None = None) -> None:
        """The non-persistent buffers (RoPE's table, each block's LNS constant), which no checkpoint holds."""
        self.rope = self._rope_table(buffer_device or self.tok_embeddings.weight.device)
        for block in self.layers.values():
            block.init_buffers()

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """Fill the weights after ``to_empty`` (the trainer builds the model on ``meta``)."""
        self.init_buffers(buffer_device)
        nn.init.normal_(self.tok_embeddings.weight, mean=0.0,
                        std=self.model_args.embedding_init_std or self.model_args.init_std)
        for block in self.layers.values():
            block.init_weights()
        self.norm.reset_parameters()
        if self.output is not None:
            nn.init.normal_(self.output.weight, mean=0.0, std=self.model_args.init_std)

    def head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab]; with labels [B, T], the summed loss instead.

        With labels the head runs through neollm.loss (fused or Cut Cross-Entropy on CUDA), so the
        [B*T, vocab] logits are never materialised. With mlp_type "moe" the summed loss also holds
        moe_aux_loss_coef * (sum of the layers' load-balancing losses) * (valid tokens): divided by the
        valid-token count (the trainer's step) it is CE_mean + coef * aux (neollm/model/moe.py). Only in
        training mode: in eval mode (validation) the loss is the cross-entropy alone, comparable across FFNs.
        """
        if tokens.shape[1] > self.model_args.max_seq_len:
            raise ValueError(
                f"sequence length {tokens.shape[1]} exceeds the model's max_seq_len "
                f"{self.model_args.max_seq_len} ([training] seq_len)"
            )
        h = self.tok_embeddings(tokens)
        args = self.model_args
        balance = labels is not None and self.training and args.mlp_type == "moe" and args.moe_aux_loss_coef > 0
        aux_total = None
        for block in self.layers.values():
            if balance:
                h, aux = block(h, self.rope, return_aux=True)
                aux_total = aux if aux_total is None else aux_total + aux
            else:
                h = block(h, self.rope)
        h = self.norm(h)
        if labels is None:
            return F.linear(h, self.head_weight())
        loss = linear_cross_entropy_sum(h, self.head_weight(), labels, self.loss_settings)
        if aux_total is not None:
            self.last_moe_aux_loss = aux_total.detach()
            valid = (labels != IGNORE_INDEX).sum()
            loss = loss + args.moe_aux_loss_coef * aux_total * valid
        return loss


def build_model(flavor: str | NeoLLMModelArgs, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, **overrides) -> NeoLLM:
    """A freshly initialised model of ``flavor`` (name or args) with ``overrides`` applied,
    in eval mode. Parameters in ``dtype``; the RoPE table stays fp32."""
    if isinstance(flavor, str):
        if flavor not in FLAVORS:
            raise ValueError(f"unknown flavor {flavor!r}; known: {sorted(FLAVORS)}")
        args = FLAVORS[flavor]
    else:
        args = flavor
    args = dataclasses.replace(args, **overrides)
    device = torch.device(device)
    with torch.device("meta"):
        model = NeoLLM(args)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    model.to(dtype)
    model.rope = model._rope_table(device)
    model.requires_grad_(False)
    return model.eval()
