"""Triton BGMV kernels for the grouped low-rank delta: y[i] += (x[i] A[g]ᵀ) B[g]ᵀ with g = idx[i] per row.

Importing this module imports triton; `loraplex.adapters.kernels` does so only when a kernel is about to run.

Layout (the pool of `factor_pool.FactorPool`, any strides):
    x    [n, d_in]        activations, fp32 / bf16 / fp16
    idx  [n] int          the slot of each row, -1 where the row has no stacked adapter
    A    [G, r, d_in]     down projections of G slots, zero-padded to the largest rank r
    B    [G, d_out, r]    up projections, already multiplied by each adapter's scale
    u    [n, r] fp32      the intermediate (rank-space) activations
    out  [n, d_out]       the base output, added to in place

shrink, grid (n, cdiv(r, BLOCK_R)): program (i, t) loads g = idx[i]; if g < 0 it stores zeros into its
    tile of u[i] and stops. Otherwise it walks d_in in BLOCK_K steps, loading x[i, k:k+BLOCK_K] and the
    [BLOCK_R, BLOCK_K] tile of A[g], accumulating their products in fp32, and stores the row sums as
    u[i, t*BLOCK_R : (t+1)*BLOCK_R].
expand, grid (n, cdiv(d_out, BLOCK_N)): program (i, t) loads g = idx[i]; if g < 0 it stops (the row keeps
    its base output). Otherwise it walks r in BLOCK_R steps, loading u[i, j:j+BLOCK_R] and the
    [BLOCK_N, BLOCK_R] tile of B[g], accumulating in fp32, then adds the sums to out[i, t*BLOCK_N : ...]
    and rounds once to out's dtype.

Every load is masked, so d_in, d_out and r need not be multiples of the blocks. Each program reads its
group's factors straight from the stacks: no padded copy of the rows and no per-row copy of A or B. Rows
of one group re-read the same factors, which stay in L2 at decode sizes (a few rows per group). Block
sizes were chosen by timing on an H100 (below).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Timed on an H100 under CUDA-graph replay (one llama1b layer's 7 modules, 64 rows over 32 adapters, rank 16, bf16):
# shrink 89 µs a layer with blocks of 128 and 4 warps, 32 µs with 512; expand 1 warp a little faster than 4
SHRINK_BLOCK_K = 512
SHRINK_MAX_BLOCK_R = 32
SHRINK_WARPS = 4
EXPAND_BLOCK_N = 128
EXPAND_MAX_BLOCK_R = 64
EXPAND_WARPS = 1
MIN_BLOCK_R = 16  # lower ranks are masked rather than given tiny (1-wide) blocks


@triton.jit
def _shrink_kernel(x_ptr, idx_ptr, a_ptr, u_ptr, rank, d_in,
                   stride_xm, stride_xk, stride_ag, stride_ar, stride_ak, stride_um, stride_ur,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    u_ptrs = u_ptr + row * stride_um + offs_r * stride_ur
    g = tl.load(idx_ptr + row).to(tl.int64)
    if g < 0:
        tl.store(u_ptrs, tl.zeros([BLOCK_R], dtype=tl.float32), mask=mask_r)
        return
    x_row = x_ptr + row * stride_xm
    a_tile = a_ptr + g * stride_ag + offs_r[:, None] * stride_ar
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < d_in
        xk = tl.load(x_row + offs_k * stride_xk, mask=mask_k, other=0.0).to(tl.float32)
        ak = tl.load(a_tile + offs_k[None, :] * stride_ak, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        acc += ak.to(tl.float32) * xk[None, :]
    tl.store(u_ptrs, tl.sum(acc, axis=1), mask=mask_r)


@triton.jit
def _expand_kernel(u_ptr, idx_ptr, b_ptr, out_ptr, rank, d_out,
                   stride_um, stride_ur, stride_bg, stride_bn, stride_br, stride_om, stride_on,
                   BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(idx_ptr + row).to(tl.int64)
    if g < 0:
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < d_out
    u_row = u_ptr + row * stride_um
    b_tile = b_ptr + g * stride_bg + offs_n[:, None] * stride_bn
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        ur = tl.load(u_row + offs_r * stride_ur, mask=mask_r, other=0.0).to(tl.float32)
        br = tl.load(b_tile + offs_r[None, :] * stride_br, mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        acc += tl.sum(br.to(tl.float32) * ur[None, :], axis=1)
    out_ptrs = out_ptr + row * stride_om + offs_n * stride_on
    base = tl.load(out_ptrs, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (base + acc).to(out_ptr.dtype.element_ty), mask=mask_n)


def shrink(x: torch.Tensor, idx: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """u [n, r] fp32 = x[i] @ A[idx[i]]ᵀ per row (0 where idx is -1); see the module docstring."""
    n, d_in = x.shape
    rank = a.shape[1]
    u = torch.empty(n, rank, dtype=torch.float32, device=x.device)
    if n == 0 or rank == 0:
        return u.zero_()
    block_r = min(max(triton.next_power_of_2(rank), MIN_BLOCK_R), SHRINK_MAX_BLOCK_R)
    _shrink_kernel[(n, triton.cdiv(rank, block_r))](
        x, idx, a, u, rank, d_in,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2), u.stride(0), u.stride(1),
        BLOCK_R=block_r, BLOCK_K=SHRINK_BLOCK_K, num_warps=SHRINK_WARPS)
    return u


def expand(u: torch.Tensor, idx: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[i] += u[i] @ B[idx[i]]ᵀ in place, rows with idx -1 untouched; returns out."""
    n, d_out = out.shape
    rank = b.shape[2]
    if n == 0 or rank == 0:
        return out
    block_r = min(max(triton.next_power_of_2(rank), MIN_BLOCK_R), EXPAND_MAX_BLOCK_R)
    _expand_kernel[(n, triton.cdiv(d_out, EXPAND_BLOCK_N))](
        u, idx, b, out, rank, d_out,
        u.stride(0), u.stride(1), b.stride(0), b.stride(1), b.stride(2), out.stride(0), out.stride(1),
        BLOCK_N=EXPAND_BLOCK_N, BLOCK_R=block_r, num_warps=EXPAND_WARPS)
    return out
