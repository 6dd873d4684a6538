"""Shared adapter math in plain torch. This is the CPU path and the oracle for any faster kernel.

Convention (adapter-methods.md §1): x is [n, d_in] (tokens flattened), A is [r, d_in], B is [d_out, r].
"""

from __future__ import annotations

import torch


def lowrank_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """s · (x Aᵀ) Bᵀ.  x [n, d_in], a [r, d_in], b [d_out, r] -> [n, d_out]."""
    u = x @ a.t()  # [n, r]
    if scale != 1.0:
        u = u * scale
    return u @ b.t()  # [n, d_out]


def lowrank_weight(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The dense ΔW = s · B A of a low-rank pair: [d_out, d_in], computed in fp32."""
    return (b.float() @ a.float()) * scale


def softmax_fp32(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax computed in fp32 (as the reference implementations do), returned in the input dtype."""
    return torch.softmax(logits.float(), dim=dim).to(logits.dtype)
