"""Plain-torch grouped low-rank delta: the oracle of the Triton kernels and their stand-in off CUDA.

Same signatures and semantics as `triton_bgmv.shrink` / `expand`: per row i with group g = idx[i] >= 0,
u[i] = x[i] A[g]ᵀ and out[i] += u[i] B[g]ᵀ, products summed in fp32; rows with idx[i] = -1 get u[i] = 0 and
leave out[i] untouched. Gather-based (A[idx] is one [r, d_in] copy per row), so simple rather than fast.
"""

from __future__ import annotations

import torch


def shrink(x: torch.Tensor, idx: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """u [n, r] fp32 = x[i] @ A[idx[i]]ᵀ per row; x [n, d_in], idx [n] (-1: no adapter), A [G, r, d_in]."""
    u = torch.zeros(x.shape[0], a.shape[1], dtype=torch.float32, device=x.device)
    rows = (idx >= 0).nonzero().squeeze(1)
    if rows.numel():
        xs = x.index_select(0, rows).float().unsqueeze(1)  # [m, 1, d_in]
        a_rows = a.index_select(0, idx.index_select(0, rows).long()).float()  # [m, r, d_in]
        u.index_copy_(0, rows, torch.bmm(xs, a_rows.transpose(1, 2)).squeeze(1))
    return u


def expand(u: torch.Tensor, idx: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[i] += u[i] @ B[idx[i]]ᵀ in place (added in fp32, rounded once to out's dtype); B [G, d_out, r]
    already scaled. Rows with idx -1 are left as they are. Returns out."""
    rows = (idx >= 0).nonzero().squeeze(1)
    if rows.numel():
        b_rows = b.index_select(0, idx.index_select(0, rows).long()).float()  # [m, d_out, r]
        delta = torch.bmm(u.index_select(0, rows).float().unsqueeze(1), b_rows.transpose(1, 2)).squeeze(1)
        out.index_copy_(0, rows, (out.index_select(0, rows).float() + delta).to(out.dtype))
    return out


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| over max |want|: how a kernel's first-use check compares it with this oracle."""
    return (got.float() - want.float()).abs().max().item() / max(want.float().abs().max().item(), 1e-6)
