"""Decode attention on the CPU in float32 as two compiled passes over the KV cache (`cpu_attention.c`).

In a `base` decode step at batch 64 of a 135M model, the attention's batched matmuls (3 query heads by up to a few
hundred keys, 192 of them a layer) took about 15% of the step, reading the cache at about 10 GB/s (docs/design.md
§2). The C passes read each sequence's keys, then its values, once for all the query heads that share them.

Optional like the grouped kernel (adapters/kernels/cpu.py): compiled on first use (adapters/kernels/native.py);
without a compiler, or if the first-use check against the torch path fails, the torch path serves after one
warning.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path

import torch

from ...adapters.kernels import native

SOURCE = Path(__file__).with_name("cpu_attention.c")
_enabled = True
_verdict: bool | None = None  # the first-use check against the torch path (None: not run yet)


def enable(on: bool) -> None:
    """Let decode steps on CPU float32 use the C passes (the default), or never."""
    global _enabled
    _enabled = on


def usable(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether `decode_attention` can serve these operands: enabled, float32 CPU tensors with each key and value a
    contiguous row, the library built, and not found wrong by the first-use check."""
    d = keys.shape[-1]
    return (_enabled and _verdict is not False and q.device.type == "cpu"
            and q.dtype == keys.dtype == values.dtype == torch.float32 and keys.stride() == values.stride()
            and keys.stride(-1) == 1 and keys.stride(-2) == d and _library() is not None)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lens: torch.Tensor, scale: float,
                     window: int | None, reference: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Attention of one new token per sequence: q [n, KV, G, d]; keys, values [n, KV, L, d] (views of the cache);
    lens [n] int32, the keys each sequence sees (its last `window`, if given) -> [n, KV, G, d].
    `reference()` computes the same with torch: the first call checks the kernel against it, and it serves if the
    kernel is wrong."""
    global _verdict
    if _verdict is None:
        got, want = _call(q, keys, values, lens, scale, window), reference()
        _verdict = native.agrees("the C decode attention", got, want)
        return got if _verdict else want
    return _call(q, keys, values, lens, scale, window) if _verdict else reference()


def _call(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lens: torch.Tensor, scale: float,
          window: int | None) -> torch.Tensor:
    lib = _library()
    q = q.contiguous()
    n, kv_heads, groups, d = q.shape
    length = keys.shape[2]
    slot_stride, head_stride = keys.stride(0), keys.stride(1)
    scores = torch.empty(n, kv_heads, groups, length)
    lib.decode_scores(q.data_ptr(), keys.data_ptr(), slot_stride, head_stride, lens.data_ptr(), n, kv_heads, groups,
                      d, length, window or 0, scale, scores.data_ptr())
    probs = scores.softmax(-1)
    out = torch.empty_like(q)
    lib.decode_values(probs.data_ptr(), values.data_ptr(), slot_stride, head_stride, lens.data_ptr(), n, kv_heads,
                      groups, d, length, window or 0, out.data_ptr())
    return out


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled passes, built on first use; None (after one warning) where they cannot be built."""
    lib = native.load(SOURCE, "the C decode attention", "torch serves it")
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    shape = [ptr, i64, i64, ptr, i64, i64, i64, i64, i64, i64]  # cache, its strides, lens, n, KV, G, d, L, window
    lib.decode_scores.argtypes = [ptr, *shape, ctypes.c_float, ptr]
    lib.decode_values.argtypes = [ptr, *shape, ptr]
    lib.decode_scores.restype = lib.decode_values.restype = None
    return lib
