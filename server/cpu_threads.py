"""Keep the engine's thread the only one with an OpenMP worker pool, so that its pool spins instead of sleeping.

torch's CPU builds run their parallel regions on OpenMP (libgomp for the pip wheels). libgomp gives every thread
that ever ran a parallel region a pool of worker threads, kept as long as that thread lives. Between two
regions a pool's workers spin for a while before they sleep, unless libgomp counts more pool threads than CPUs:
then they sleep at once, and every region pays futex wake-ups. One engine step is thousands of small regions.
With the model loaded on one thread (whose pool stays) and the engine stepping on another, that is exactly the
case: on 2 CPUs a decode step over eight adapters took twice as long as the same step on the loading thread
(docs/design.md, BENCHMARKS.md). Hence three rules, which this module implements:

- helper threads that touch tensors (adapter reads and binds) run torch with one thread: no pool is created;
- the thread that starts the engine gives its pool back (`omp_pause_resource_all`, OpenMP 5.0) first;
- the engine's thread sets its thread count itself when it starts (a helper's setting must not leak into it).

Where torch does not run on OpenMP (other backends keep one global pool) all of this is a no-op.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch

from ..adapters.kernels.native import loaded_openmp_runtimes

log = logging.getLogger(__name__)

# omp_pause_resource_t: release the pool's threads; the next region starts a new pool. Asked of libgomp only:
# its pause releases the calling thread's pool alone (LLVM's libomp would pause the whole runtime).
OMP_PAUSE_SOFT = 1


@cache
def uses_openmp() -> bool:
    """True when torch's intra-op parallelism is OpenMP, whose thread counts are per thread."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the body with one torch thread on this thread (no parallel region, so no pool), then restore."""
    if not uses_openmp():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def set_threads(count: int) -> None:
    """Set this thread's torch thread count (OpenMP only: elsewhere the count is global, and left alone)."""
    if uses_openmp() and count != torch.get_num_threads():
        torch.set_num_threads(count)


def release_pool() -> bool:
    """Give back the calling thread's OpenMP worker pool (it comes back if this thread runs torch in parallel
    again). False where there is no OpenMP runtime to ask."""
    functions = _pause_functions()
    for fn in functions:
        fn(OMP_PAUSE_SOFT)
    return bool(functions)


@cache
def _pause_functions() -> tuple:
    """`omp_pause_resource_all` of each libgomp loaded in this process (Linux only)."""
    if not uses_openmp():
        return ()
    functions = []
    for path in loaded_openmp_runtimes():
        try:
            fn = ctypes.CDLL(path).omp_pause_resource_all  # the loaded library: same handle, same pools
        except (OSError, AttributeError):  # not loadable, or a runtime older than OpenMP 5.0
            log.debug("no omp_pause_resource_all in %s", path)
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        functions.append(fn)
    return tuple(functions)
