"""CUDA graphs of decode-only steps: one replay instead of hundreds of kernel launches from Python.

On a GPU, eager decode steps are bound by host work: a `base` step of a 1B model is about 4 ms of kernels behind
20-30 ms of Python and launches (docs/design.md §12). A graph records a step's launches once and replays them in
one call. It fixes tensor addresses and shapes, so one graph serves one bucket of (rows b, cache positions L):
- rows: the n running sequences in KV-slot order, padded to b (`row_bucket`) with rows that write their K/V at
  position 0 of the free slots n..b-1; a free slot's contents are never read (a prompt admitted there overwrites
  them from position 0);
- the inputs (token, position and factor-pool slot of every row) are copied into static buffers before a replay;
- attention reads the first L positions of the b slots (`length_bucket`), masked on the device from the positions;
- adapters go through the Triton kernels over the whole factor pool, indexed by each row's pool slot (-1: the
  base model), so the same launches serve any mix of adapters; families without a low-rank delta run eagerly;
- sampling runs after the replay, eagerly, on the graph's output logits.
The engine captures a graph of every row bucket at the shortest extent when it starts (`capture_all`), others
the first time their bucket comes up; all are kept until the factor pool's tensors are reallocated (a module seen
for the first time, a higher rank, more slots), since they recorded the old addresses, and then captured again
as their buckets come up. Steps with a prompt in them, merged weights, or an adapter the kernels cannot serve run eagerly.
"""

from __future__ import annotations

import logging
import time

import torch

from ...adapters import AdaptedModel, BoundAdapter, kernels
from ..kv_cache import KVCache
from .base import CausalLMForward
from .step import StepInput

log = logging.getLogger("loraplex.engine")

LENGTH_BUCKET = 256  # cache positions: a graph reads the first multiple of this that holds every sequence


def row_bucket(n: int, limit: int) -> int:
    """The rows a graph for n decodes runs: the next power of two up to 8, then the next multiple of 8 (a padded
    row costs GPU time, a bucket one capture), at most `limit` (the KV slots)."""
    bucket = 1 << (n - 1).bit_length() if n <= 8 else -(-n // 8) * 8
    return min(bucket, limit)


def length_bucket(longest: int, limit: int) -> int:
    """The cache positions a graph's attention reads for sequences of at most `longest` tokens."""
    return min(-(-longest // LENGTH_BUCKET) * LENGTH_BUCKET, limit)


class DecodeGraphs:
    """The decode steps of one engine (its forward, KV cache and adapted model) as CUDA graphs, engine thread only.

    capture=False runs the same padded, slot-indexed step eagerly with the plain-torch adapter path: what a graph
    replays, without the graph, for tests on machines without a GPU."""

    def __init__(self, forward: CausalLMForward, cache: KVCache, adapted: AdaptedModel, capture: bool = True) -> None:
        self.forward, self.cache, self.adapted = forward, cache, adapted
        self.device = adapted.device
        self.capture = capture
        self.enabled = True  # False after a capture failed: every step runs eagerly from then on
        self.captures = 0
        slots = cache.num_slots
        # per row: token, position, factor-pool slot (-1: none); one copy from the host per step
        self._inputs = torch.zeros(3, slots, dtype=torch.long, device=self.device)
        self._host = torch.zeros(3, slots, dtype=torch.long, pin_memory=self.device.type == "cuda")
        self._rows = torch.arange(slots, device=self.device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool_version = adapted.factor_pool.version
        self._stream: torch.cuda.Stream | None = None  # the stream graphs are captured on (made at the first capture)
        self._memory = None  # the memory pool the graphs share (they never run at once)
        # whether adapter rows can be served (decided once: a graph records the kernels' launches, or none)
        self._kernels = not capture or kernels.usable_in_graphs(self.device, adapted.dtype)

    def adapter_slot(self, bound: BoundAdapter | None, task: int) -> int | None:
        """The factor-pool slot a graph serves (bound, task) from, written on first use; -1 for the base model;
        None if a graph cannot serve it (a family without a low-rank delta, or no Triton kernels here)."""
        if bound is None:
            return -1
        if not (bound.stackable and self.adapted.stacked and self._kernels):
            return None
        return self.adapted.factor_pool.slot(bound, task if bound.task_sensitive else 0)

    def run(self, tokens: list[int], positions: list[int], adapter_slots: list[int]) -> torch.Tensor | None:
        """Logits [n, V] of a decode step of the n sequences in KV slots 0..n-1: slot i's new token tokens[i] at
        position positions[i], served from factor-pool slot adapter_slots[i] (`adapter_slot`). The logits are
        the graph's output buffer, valid until the next call. None if the graph could not be captured (then the
        caller runs the step eagerly, and graphs stay off)."""
        n = len(tokens)
        rows = row_bucket(n, self.cache.num_slots)
        extent = length_bucket(max(positions) + 1, self.cache.max_seq_len)
        pad = rows - n  # padding rows: token 0 at position 0 of a free slot, no adapter
        self._host[:, :rows] = torch.tensor([tokens + [0] * pad, positions + [0] * pad, adapter_slots + [-1] * pad])
        self._inputs.copy_(self._host, non_blocking=True)
        if not self.capture:
            return self._forward(rows, extent)[:n]
        self._drop_stale()
        graph = self._graphs.get((rows, extent)) or self._capture(rows, extent)
        if graph is None:
            return None
        graph[0].replay()
        return graph[1][:n]

    def capture_all(self) -> None:
        """Capture every row bucket at the shortest extent, before any request (the engine does at start): each
        capture costs a forward's host time, which would otherwise fall on the first step of each batch size.
        Writes K/V at position 0 of every KV slot, so only while no sequence holds one."""
        if not self.capture:
            return
        start = time.perf_counter()
        self._drop_stale()
        extent = length_bucket(1, self.cache.max_seq_len)
        self._inputs.zero_()
        self._inputs[2].fill_(-1)  # no adapter rows
        for rows in sorted({row_bucket(n, self.cache.num_slots) for n in range(1, self.cache.num_slots + 1)}):
            if self.enabled and (rows, extent) not in self._graphs:
                self._capture(rows, extent)
        if self.enabled:
            log.info("captured %d CUDA graphs of decode steps in %.2f s", len(self._graphs),
                     time.perf_counter() - start)

    def _drop_stale(self) -> None:
        """Forget the graphs if the factor pool's tensors were reallocated since they were captured."""
        if self.adapted.factor_pool.version != self._pool_version:
            self._graphs.clear()
            self._memory = None  # the old graphs' memory pool goes with them: a capture into it would assert
            self._pool_version = self.adapted.factor_pool.version

    def _forward(self, rows: int, extent: int) -> torch.Tensor:
        """The padded step over the static buffers: logits [rows, V]."""
        ids, positions, index = self._inputs[:, :rows]
        step = StepInput(input_ids=ids, positions=positions, num_decode=rows, decode_rows=None, decode_pos=positions,
                         decode_slots=self._rows[:rows], decode_lens=[], segments=[], logits_rows=self._rows[:rows],
                         extent=extent)
        if not self._kernels:  # only base-model rows come here
            return self.forward(step, self.cache)
        with self.adapted.indexed(index, "triton" if self.capture else "torch"):
            return self.forward(step, self.cache)

    def _capture(self, rows: int, extent: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        start = time.perf_counter()
        current = torch.cuda.current_stream(self.device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        if self._memory is None:
            self._memory = torch.cuda.graph_pool_handle()
        stream = self._stream
        stream.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(stream):
                if not self.captures:  # before the first capture: lazy initialisation,
                    self._forward(rows, extent)  # Triton compilation (no other bucket needs its own warm-up)
                # capture_begin/end rather than torch.cuda.graph, which also synchronises, collects garbage and
                # empties the allocator's cache at every capture: 10-100 ms each in a server's process
                # thread_local: the adapter manager's loader threads may copy to the device meanwhile
                graph.capture_begin(pool=self._memory, capture_error_mode="thread_local")
                try:
                    logits = self._forward(rows, extent)
                finally:
                    graph.capture_end()
        except Exception as exc:  # noqa: BLE001 - an operation that cannot be captured: serve eagerly, say why
            current.wait_stream(stream)
            self.enabled = False
            self._graphs.clear()
            log.warning("capturing a decode step as a CUDA graph failed (%d rows, %d positions); decode steps run "
                        "eagerly from now on: %s: %s", rows, extent, type(exc).__name__, exc)
            return None
        current.wait_stream(stream)
        self.captures += 1
        log.debug("captured a decode step of %d rows over %d positions as a CUDA graph in %.0f ms", rows, extent,
                  1000 * (time.perf_counter() - start))
        self._graphs[(rows, extent)] = (graph, logits)
        return graph, logits
