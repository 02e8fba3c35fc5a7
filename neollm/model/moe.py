"""mlp_type "moe": a sparse mixture of SwiGLU experts with token-choice top-k routing and the Switch
Transformer load-balancing loss (Fedus et al., arXiv 2101.03961).

For the N tokens x_t of a micro-batch (every position, padding included), E experts and k = moe_top_k:

    p_t    = softmax(W_r x_t)                       router probabilities [E], in >= fp32, W_r: dim -> E, no bias
    S_t    = top-k indices of p_t
    g_t,i  = p_t,i / sum_{j in S_t} p_t,j  (k > 1)  renormalised over the chosen experts (Mixtral / GShard)
    g_t,i  = p_t,i                         (k = 1)  Switch's gate: renormalising one expert would make it 1 and
                                                     leave the router no gradient from the language-model loss
    y_t    = sum_{i in S_t} g_t,i * E_i(x_t)        E_i(x) = W2_i (SiLU(W1_i x) * W3_i x), hidden moe_hidden_dim

    aux    = E * sum_i f_i * P_i,   f_i = |{(t, s): S_t[s] = i}| / (N k)   share of the N k routed slots
                                    P_i = mean_t p_t,i                      mean router probability

Switch defines f_i for k = 1 (fraction of tokens); dividing the slot count by N k generalises it so that
sum_i f_i = 1 for every k, and aux = 1 when routing is perfectly balanced (f_i = P_i = 1/E) whatever k is.
(HF Mixtral's variant divides by N and equals k there.) f is a count (no gradient); the router learns balance
through P. As in Switch every MoE layer adds its own term: the model adds
moe_aux_loss_coef * sum_layers aux * (valid tokens) to its summed loss, so after the trainer divides by the
valid-token count the objective is CE_mean + moe_aux_loss_coef * sum_layers aux (neollm/model/model.py); in
eval mode (validation) the model returns the cross-entropy alone.

Expert size: moe_hidden_dim = 0 means ffn_hidden_dim // k, so the k active experts hold the dense SwiGLU's
3 * dim * ffn_hidden_dim weights (FLOPs per token match the dense model's, plus the router's dim * E); total
FFN parameters are E / k times the dense ones. Init: W1, W3, W_r ~ N(0, init_std), W2 ~ N(0, out_std) (the
GPT-2 residual scaling the dense MLP uses). The experts are torchtitan's ``GroupedExperts`` ([E, hidden, dim]
weights w1/w3, [E, dim, hidden] w2): on CUDA its padded grouped GEMM (``torch._grouped_mm``, which computes in
bf16), elsewhere its per-expert loop (a host sync for the split sizes, hence a graph break under
torch.compile). torchtitan's own ``MoE`` module is not used: its router returns only the chosen scores (the
loss needs the full p_t), it balances with a bias instead of an auxiliary loss, and by default it scales
expert *inputs* by the gate (score_before_experts), which for a SwiGLU expert is not the weighted sum of expert
outputs above.
No shared expert, no capacity limit (no token is dropped), no dropout inside the experts (the block's
sublayer dropout still applies). CoLA, SimpleNorm and learnable multipliers do not reach the experts. The
expert weights are 3-D: weight decay applies to them, but Conda (neollm/optim/conda.py) projects only 2-D
matrices, so under Conda they get its plain Adam step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchtitan.models.moe.moe import GroupedExperts, _run_experts_for_loop, _run_experts_grouped_mm
from torchtitan.models.moe.utils import indices_padding_wrapper

from neollm.model.linear import Linear

if TYPE_CHECKING:  # annotations only: args.py imports flops.py, which imports this module
    from neollm.model.args import NeoLLMModelArgs

_grouped_mm_padded = indices_padding_wrapper(_run_experts_grouped_mm)


def load_balancing_loss(probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Switch aux loss E * sum_i f_i P_i from router probabilities [N, E] and chosen experts [N, k]."""
    num_experts = probs.shape[-1]
    slots = F.one_hot(indices.reshape(-1), num_experts).sum(0)
    f = slots.to(probs.dtype) / indices.numel()
    return num_experts * torch.dot(f, probs.mean(0))


class MoE(nn.Module):
    """Top-k routed SwiGLU experts; ``forward`` returns ``(output, aux_loss)`` (see the module docstring)."""

    def __init__(self, args: NeoLLMModelArgs) -> None:
        super().__init__()
        self.num_experts = args.moe_num_experts
        self.top_k = args.moe_top_k
        self.hidden_dim = args.moe_expert_hidden_dim()
        self.router = Linear(args.dim, self.num_experts, bias=False)
        self.experts = GroupedExperts(args.dim, self.hidden_dim, self.num_experts, use_grouped_mm=False)

    def init_weights(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.router.weight, mean=0.0, std=init_std)
        nn.init.normal_(self.experts.w1, mean=0.0, std=init_std)
        nn.init.normal_(self.experts.w3, mean=0.0, std=init_std)
        nn.init.normal_(self.experts.w2, mean=0.0, std=out_std)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, dim] -> (gates [N, k] fp32, chosen experts [N, k], router probabilities [N, E] fp32)."""
        logits = self.router(x)
        probs = F.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        top, indices = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            top = top / top.sum(dim=-1, keepdim=True)
        return top, indices, probs

    def _run_experts(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        e = self.experts
        if x.is_cuda:
            return _grouped_mm_padded(e.w1, e.w2, e.w3, x, tokens_per_expert)
        return _run_experts_for_loop(e.w1, e.w2, e.w3, x, tokens_per_expert)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        gates, indices, probs = self.route(x)
        aux = load_balancing_loss(probs, indices)

        flat = indices.reshape(-1)  # slot t * k + s -> expert
        order = torch.argsort(flat, stable=True)  # slots grouped by expert
        tokens_per_expert = F.one_hot(flat, self.num_experts).sum(0)
        expert_out = self._run_experts(x[order // self.top_k], tokens_per_expert)
        per_slot = torch.empty_like(expert_out)
        per_slot[order] = expert_out
        out = (per_slot.view(-1, self.top_k, shape[-1]).to(gates.dtype) * gates.unsqueeze(-1)).sum(1)
        return out.to(x.dtype).reshape(shape), aux
