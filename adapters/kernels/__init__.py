"""Grouped low-rank delta kernels: out[i] += (x[i] A[g]ᵀ) B[g]ᵀ with g = idx[i] per row (BGMV-style).

On CUDA, with triton importable (it ships with CUDA builds of torch), `lowrank_delta` runs two Triton
kernels (`triton_bgmv`); everywhere else it runs the plain-torch `reference`, which is also the kernels'
test oracle. Triton is optional: nothing here imports it until a kernel is about to run, so CPU installs
and CI never need it.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch

from . import cpu, reference

BACKENDS = ("triton", "torch")
CHOICES = ("auto", "torch", "triton")  # serve --grouped-kernels (`select`)
log = logging.getLogger(__name__)
# In eager steps, off unless asked for (serve --grouped-kernels triton): on an H100 eager steps are bound by host
# work, and two Triton launches per adapted module cost more host time than the torch path's two bmm calls
# (workload W: a32 decode step 62 ms with the kernels, 39 ms without; BENCHMARKS.md, GPU)
_enabled = False
# Inside CUDA graphs of decode steps (server/forward/graphs.py), where launches cost no host time: on unless
# serve --grouped-kernels torch
_in_graphs = True
_verdicts: dict[tuple[torch.device, torch.dtype], bool] = {}  # kernels agree with the reference here
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # of max|reference|


def enable(on: bool) -> None:
    """Let `lowrank_delta` pick the Triton kernels by default, or never (the default)."""
    global _enabled
    _enabled = on


def select(choice: str) -> None:
    """Apply `serve --grouped-kernels`: "auto", the C kernel on CPU, and on CUDA plain torch in eager steps and the
    Triton kernels inside CUDA graphs; "torch", plain torch everywhere (adapter rows then stay out of graphs);
    "triton", the Triton kernels on CUDA in eager steps too (and the C kernel on CPU)."""
    if choice not in CHOICES:
        raise ValueError(f"grouped kernels must be one of {', '.join(CHOICES)}, not {choice!r}")
    global _in_graphs
    enable(choice == "triton")
    cpu.enable(choice != "torch")
    _in_graphs = choice != "torch"


@functools.cache
def triton_available() -> bool:
    """Whether triton can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def uses_triton(x: torch.Tensor) -> bool:
    """Whether `lowrank_delta(x, ...)` may pick the Triton kernels by default: CUDA tensors, triton present,
    not disabled, and not found wrong on this device and dtype by the first-use check."""
    return _enabled and x.is_cuda and triton_available() and _verdicts.get((x.device, x.dtype), True)


def usable_in_graphs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a CUDA graph of a decode step may serve adapter rows through the Triton kernels on (device, dtype):
    CUDA, triton importable, not turned off (--grouped-kernels torch), and found right by the first-use check, run
    here on small inputs if no real ones have run yet. The plain-torch path cannot be captured in a graph: it
    reads how many rows have an adapter back to the host."""
    if not (_in_graphs and device.type == "cuda" and triton_available()):
        return False
    gen = torch.Generator().manual_seed(0)
    x, a, b, out = (torch.randn(shape, generator=gen).to(device, dtype)
                    for shape in ((5, 96), (2, 16, 96), (2, 80, 16), (5, 80)))
    idx = torch.tensor([0, -1, 1, 0, 1], device=device)
    return _first_use_check(x, idx, a, b, out)


def _first_use_check(x: torch.Tensor, idx: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> bool:
    """Run the kernels once against the reference on the first real inputs of each (device, dtype).

    A kernel that fails to compile on some GPU, or computes something else, must cost one warning and the
    plain-torch path, never a failed request: the verdict sticks for the process.
    """
    key = (x.device, x.dtype)
    if key not in _verdicts:
        want = reference.expand(reference.shrink(x, idx, a), idx, b, out.clone()).float()
        try:
            from . import triton_bgmv

            got = triton_bgmv.expand(triton_bgmv.shrink(x, idx, a), idx, b, out.clone()).float()
            error = reference.relative_error(got, want)
            ok = error <= _TOLERANCE.get(x.dtype, 2e-2)
            reason = f"relative error {error:.2e}"
        except Exception as exc:  # noqa: BLE001 - compile or launch failure: fall back, say why
            ok, reason = False, f"{type(exc).__name__}: {exc}"
        _verdicts[key] = ok
        if ok:
            log.info("Triton grouped kernels checked on %s %s (%s)", x.device, x.dtype, reason)
        else:
            log.warning("Triton grouped kernels disagree with the plain-torch path on %s %s (%s); using the "
                        "plain-torch path", x.device, x.dtype, reason)
    return _verdicts[key]


def lowrank_delta(x: torch.Tensor, idx: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
                  backend: str | None = None) -> torch.Tensor:
    """Add every row's low-rank delta to `out` in place and return it.

    x [n, d_in]; idx [n] integer, the group of each row or -1 for none (values must lie in [-1, G): they
    are not checked on the device); A [G, r, d_in]; B [G, d_out, r], already scaled; out [n, d_out].
    Products are summed in fp32 and added to out with one rounding to its dtype.
    backend: None picks "triton" for CUDA tensors when triton is importable, else "torch"; "triton" forces
    the kernels (on CPU tensors too when TRITON_INTERPRET=1 was set before triton was imported).
    """
    if backend not in (None, *BACKENDS):
        raise ValueError(f"backend must be one of {BACKENDS} or None, not {backend!r}")
    _check_shapes(x, idx, a, b, out)
    if backend == "triton" or (backend is None and uses_triton(x) and _first_use_check(x, idx, a, b, out)):
        from . import triton_bgmv  # imports triton

        return triton_bgmv.expand(triton_bgmv.shrink(x, idx, a), idx, b, out)
    return reference.expand(reference.shrink(x, idx, a), idx, b, out)


def _check_shapes(x: torch.Tensor, idx: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    n, d_in = x.shape
    groups, rank, a_in = a.shape
    if (idx.shape != (n,) or idx.is_floating_point() or a_in != d_in or b.shape != (groups, out.shape[1], rank)
            or out.shape[0] != n):
        raise ValueError(f"lowrank_delta shapes: x {tuple(x.shape)}, idx {tuple(idx.shape)} {idx.dtype}, "
                         f"A {tuple(a.shape)}, B {tuple(b.shape)}, out {tuple(out.shape)}")
