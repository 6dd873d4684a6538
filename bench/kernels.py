"""Micro-benchmark of the grouped low-rank delta on CUDA: Triton BGMV kernels vs padded bmm vs a per-group loop.

usage: python bench/kernels.py [--rows 1,16,64,256] [--groups 1,8,64] [--ranks 8,16,64] [--d 4096]
                               [--dtype bfloat16] [--reps 100]

One adapted d×d projection at decode shapes: `rows` rows spread over `groups` adapters (contiguous per group,
as the engine orders them), rank r. Times one layer's delta, out += (x Aᵀ)(s·B)ᵀ, three ways:
- kernel: `kernels.lowrank_delta` (adapters/kernels/triton_bgmv.py), in place over the rows;
- bmm: `grouped.grouped_delta` (rows gathered into a padded [G, m, d] layout, two bmm) + index_add_;
- loop: two matmuls and an in-place add per group (what `AdaptedLinear` does for unstacked groups).
The per-step plan (index tensors) is built once outside the timed region, as in the server, where one plan
serves every layer. Median over `reps` runs, timed with CUDA events after warm-up. Prints a markdown table,
with the largest difference of each path from the loop. Needs CUDA and triton; refuses to run otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch

from loraplex.adapters import kernels
from loraplex.adapters.grouped import PaddedRows, grouped_delta

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def median_us(fn: Callable[[], object], reps: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def measure(rows: int, groups: int, rank: int, d: int, dtype: torch.dtype, reps: int) -> dict[str, float]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, d, device="cuda", generator=gen).to(dtype)
    a = (torch.randn(groups, rank, d, device="cuda", generator=gen) / d**0.5).to(dtype)
    b = (torch.randn(groups, d, rank, device="cuda", generator=gen) / rank**0.5).to(dtype)
    out = torch.zeros(rows, d, device="cuda", dtype=dtype)
    bounds = [rows * g // groups for g in range(groups + 1)]  # contiguous, near-equal groups
    group_rows = [torch.arange(s, e) for s, e in zip(bounds, bounds[1:])]
    plan = PaddedRows.build(group_rows, "cuda")
    index = torch.cat([torch.full((len(r),), g, dtype=torch.int32) for g, r in enumerate(group_rows)]).cuda()

    def kernel():
        kernels.lowrank_delta(x, index, a, b, out, backend="triton")

    def bmm():
        out.index_add_(0, plan.rows, grouped_delta(x, (a, b), plan).to(out.dtype))

    def loop():
        for g, (s, e) in enumerate(zip(bounds, bounds[1:])):
            out[s:e] += (x[s:e] @ a[g].t()) @ b[g].t()

    result = {}
    for name, fn in (("loop", loop), ("kernel", kernel), ("bmm", bmm)):
        out.zero_()
        fn()
        if name == "loop":
            reference = out.float().clone()  # .float() of fp32 is the same tensor
            scale = reference.abs().max().item()
        else:
            result[f"{name}_diff"] = (out.float() - reference).abs().max().item() / scale
        result[name] = median_us(fn, reps)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=ints, default=[1, 16, 64, 256])
    parser.add_argument("--groups", type=ints, default=[1, 8, 64])
    parser.add_argument("--ranks", type=ints, default=[8, 16, 64])
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--reps", type=int, default=100)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py needs CUDA: it times Triton kernels on the GPU, and this machine has none",
              file=sys.stderr)
        return 2
    if not kernels.triton_available():
        print("bench/kernels.py needs triton (it ships with CUDA builds of torch)", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, d={args.d}, {args.dtype}, "
          f"median of {args.reps}\n")
    print("| rows | groups | rank | kernel µs | padded bmm µs | loop µs | kernel vs bmm | "
          "kernel diff | bmm diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rows in args.rows:
        for groups in args.groups:
            if groups > rows:  # a decode step has at least one row per adapter in it
                continue
            for rank in args.ranks:
                r = measure(rows, groups, rank, args.d, DTYPES[args.dtype], args.reps)
                print(f"| {rows} | {groups} | {rank} | {r['kernel']:.1f} | {r['bmm']:.1f} | {r['loop']:.1f} | "
                      f"{r['bmm'] / r['kernel']:.2f}× | {r['kernel_diff']:.1e} | {r['bmm_diff']:.1e} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
