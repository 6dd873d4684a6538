"""Keep freed activations in the process heap while the engine steps on the CPU, and give them back when it idles.

On the CPU a step's activations are host memory, and a prefill step's are large: [512 tokens, 1536] floats is
3 MiB, and one step of `smol135` allocates and frees hundreds of such tensors. glibc's malloc hands free memory
at the top of a heap back to the kernel once it exceeds M_TRIM_THRESHOLD (by default twice the largest block it
has freed, so a few MiB here), and serves blocks past M_MMAP_THRESHOLD with a fresh mapping. Either way the next
step's tensors fault their pages in again: measured on a 2-vCPU VM, 68 000 minor faults (270 MB) in every
512-token prefill step, 140-460 ms of system time in a 0.9-1.1 s step. With the thresholds raised the same
steps fault a few hundred pages at most, and the process keeps about 25 MB more (BENCHMARKS.md).

So the engine, when it runs on the CPU, raises both thresholds once (`retain_freed_memory`) and trims the heaps
when it goes idle (`release_free_memory`): memory freed by a burst is reused by the burst's next steps and given
back after it. glibc only; a no-op elsewhere, and where the user set glibc's own MALLOC_*_ variables.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# blocks up to this size come from the heap (glibc's own ceiling for its dynamic threshold: larger blocks are
# still mapped and unmapped, and are rare); free memory up to this much stays at the top of a heap
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 512 << 20
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

_retaining = False


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has `mallopt` and `malloc_trim`), else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        return libc
    except (OSError, AttributeError, TypeError):
        return None


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); True if they are raised now."""
    global _retaining
    if _retaining:
        return True
    libc = _glibc()
    if libc is None:
        return False
    user = [name for name in USER_SETTINGS if name in os.environ]
    if user:
        log.info("malloc thresholds left as set by %s", ", ".join(user))
        return False
    _retaining = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not _retaining:
        log.warning("glibc refused the malloc thresholds: CPU steps fault their activations' pages in every time")
    return _retaining


def release_free_memory() -> None:
    """Give the heaps' free memory back to the kernel (`malloc_trim`), if `retain_freed_memory` kept it."""
    if _retaining:
        _glibc().malloc_trim(0)
