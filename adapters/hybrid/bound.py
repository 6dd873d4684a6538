"""Layer-level attention fusion of K source LoRAs, laid out for serving.

For the rows of target task t at one adapted linear (x [n, d_in], base output h [n, d_out]):

    o_k    = s_k (x A_kᵀ) B_kᵀ                       [n, d_out]   source k's LoRA delta
    q      = h Q_tᵀ                                  [n, d_a]
    key_k  = o_k K_tᵀ                                [n, d_a]
    α      = softmax_k(q·key_k / (√d_a · T))         [n, K]       (fp32; dropout on the scores in training)
    Δ      = Σ_k α_k (V_{t,k} ⊙ o_k)                 [n, d_out]

Nothing d_out-wide is built per source. With u = x [s_1 A_1; …; s_K A_K]ᵀ [n, R] (one shrink, R = Σ r_k)
and the bind-time folds KB_t = K_t [B_1 … B_K] [d_a, R] and BV_t = [V_{t,1}⊙B_1 … V_{t,K}⊙B_K] [d_out, R]:

    q·key_k = Σ_{j∈k} u_j (q KB_t)_j                  a segment sum over source k's rank slots j
    Δ       = (u ⊙ α expanded to R) BV_tᵀ            one rank-R expand

so a token costs one rank-R shrink, one d_out→d_a query, one d_a→R product and one rank-R expand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..base import Adapter, BoundAdapter
from ..ops import softmax_fp32


@dataclass(frozen=True)
class FusedModule:
    """One module's serving tensors (all on the model's device and dtype)."""

    a_scaled: torch.Tensor  # [R, d_in]: the stacked s_k A_k
    segments: torch.Tensor  # [R, K]: one-hot, rank slot j -> its source k
    # per target task t: (Q_t [d_a, d_out], KB_t [d_a, R], BV_t [d_out, R])
    tasks: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]

    def nbytes(self) -> int:
        tensors = [self.a_scaled, self.segments] + [x for task in self.tasks for x in task]
        return sum(x.numel() * x.element_size() for x in tensors)


class BoundFusion(BoundAdapter):
    """Per-token attention over K source-LoRA deltas, with the fusion parameters of the request's task."""

    def __init__(self, adapter: Adapter, modules: dict[str, FusedModule], attention_dim: int, temperature: float) -> None:
        super().__init__(adapter, frozenset(modules))
        self.fused = modules
        self.score_scale = 1.0 / (math.sqrt(attention_dim) * temperature)

    def delta(self, module: str, x: torch.Tensor, h: torch.Tensor, task: int) -> torch.Tensor | None:
        fused = self.fused.get(module)
        if fused is None:
            return None
        query, kb, bv = fused.tasks[task]
        u = x @ fused.a_scaled.t()  # [n, R]: all K shrinks in one matmul, scalings folded in
        q = h @ query.t()  # [n, d_a]
        scores = ((u * (q @ kb)) @ fused.segments) * self.score_scale  # [n, K]
        if self.dropout:  # AdapterFusion's dropout on the attention scores, training only
            scores = torch.nn.functional.dropout(scores, self.dropout)
        alpha = softmax_fp32(scores, dim=-1)  # [n, K]
        return (u * (alpha @ fused.segments.t())) @ bv.t()  # [n, d_out]

    def nbytes(self) -> int:
        return sum(m.nbytes() for m in self.fused.values())
