"""One engine step as the forward sees it: a packed batch of new tokens and where their K/V live.

Rows are the new tokens of every sequence, concatenated (no padding). Two kinds of sequence share a step:
- decodes: one new token each, their slots are exactly 0..n-1 (SlotTable keeps running sequences packed),
  so all of them attend together through the view `cache.k[layer][:n, :, :L]`;
- segments: several new tokens of one sequence (a prompt, or a chunk of one after `past` cached tokens),
  each attending to its own slot; prompts of equal length side by side form a block, which attends in one call.
The engine chooses the row order (rows grouped by adapter, so that every adapter group is one slice);
`decode_rows` maps slot order to row order when the two differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from ..kv_cache import KVCache
from . import cpu_attention


@dataclass(frozen=True)
class SeqRun:
    """The new tokens of one sequence in a step (engine -> `build_step`)."""

    tokens: Sequence[int]
    slot: int
    past: int  # tokens of this sequence already in its slot
    decode: bool  # True: one token of a running sequence (its slot is < the number of decodes)


@dataclass(frozen=True)
class Segment:
    row: int  # first row of the run
    length: int
    slot: int
    past: int


@dataclass(frozen=True)
class PromptBlock:
    """`count` whole prompts of `length` tokens each in consecutive rows from `row`: one K/V write and one attention
    call per layer serve them all, where one per prompt cost host time (the engine puts equal prompts side by
    side; on a GPU a burst of 64 prompts was ~5 000 small operations a step)."""

    row: int
    length: int
    slots: tuple[int, ...]
    slot_index: torch.Tensor  # [count] the slots on the device

    def segments(self) -> list[Segment]:
        """The prompts one by one, for what one call cannot do (soft-capping, a window shorter than a prompt)."""
        return [Segment(self.row + i * self.length, self.length, slot, 0) for i, slot in enumerate(self.slots)]


@dataclass
class StepInput:
    input_ids: torch.Tensor  # [N] long
    positions: torch.Tensor  # [N] long
    num_decode: int
    decode_rows: torch.Tensor | None  # [n] row of slot s's token; None: slot s is row s
    decode_pos: torch.Tensor | None  # [n] position written for slot s (= kv length - 1)
    decode_slots: torch.Tensor | None  # [n] = arange(n), the slots written (made once per step, not per layer)
    decode_lens: list[int]  # [n] kv length of slot s after this step (host copy)
    segments: list[Segment]
    logits_rows: torch.Tensor  # [B] the row whose logits each sequence needs, in run order
    # a CUDA graph's step (graphs.py): decode attention reads this many cache positions, always masked on the device
    # from `decode_pos` (`decode_lens` is then unused), so that nothing depends on the host's lengths
    extent: int | None = None
    blocks: list[PromptBlock] = field(default_factory=list)  # prompts attended together (not in `segments`)
    _masks: dict = field(default_factory=dict, repr=False)
    _lengths: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def decode_lengths(self) -> torch.Tensor:
        """[n] int32 on the host: `decode_lens` as the CPU decode attention reads it (made once per step)."""
        if self._lengths is None:
            self._lengths = torch.tensor(self.decode_lens, dtype=torch.int32)
        return self._lengths

    def decode_extent(self) -> int:
        """The cache positions decode attention reads: the longest sequence, or a graph's fixed extent."""
        return self.extent if self.extent is not None else max(self.decode_lens)

    def decode_mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor | None:
        """[n, 1, 1, L] additive mask of `dtype` (0 = attend, -inf = hidden) for the decode view, or None when
        every key is visible. Made once per step and shared by every layer: given a bool mask, SDPA would
        convert it to this on every call."""
        key = (window, dtype)
        if key not in self._masks:
            longest = self.decode_extent()
            if self.extent is None and min(self.decode_lens) == longest and (window is None or longest <= window):
                self._masks[key] = None
            else:
                device = self.input_ids.device
                cols = torch.arange(longest, device=device)[None, :]  # [1, L]
                kv = (self.decode_pos + 1)[:, None]  # [n, 1], already on the device
                mask = cols < kv
                if window is not None:
                    mask &= cols >= kv - window
                additive = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))
                self._masks[key] = additive[:, None, None, :]
        return self._masks[key]


def build_step(runs: Sequence[SeqRun], device: torch.device | str) -> StepInput:
    """Pack `runs` (in row order) into a StepInput on `device`; each run needs the logits of its last token."""
    ids: list[int] = []
    positions: list[int] = []
    decode_by_slot: dict[int, tuple[int, int]] = {}  # slot -> (row, position)
    segments: list[Segment] = []
    last_rows: list[int] = []
    for run in runs:
        row, length = len(ids), len(run.tokens)
        if length == 0:
            raise ValueError("a sequence in a step needs at least one new token")
        ids.extend(run.tokens)
        positions.extend(range(run.past, run.past + length))
        if run.decode:
            if length != 1:
                raise ValueError("a decode run has exactly one token")
            decode_by_slot[run.slot] = (row, run.past)
        else:
            segments.append(Segment(row, length, run.slot, run.past))
        last_rows.append(row + length - 1)
    n = len(decode_by_slot)
    if sorted(decode_by_slot) != list(range(n)):
        raise ValueError(f"decode slots must be 0..{n - 1}, got {sorted(decode_by_slot)}")
    blocks, segments = _prompt_blocks(segments, device)
    rows = [decode_by_slot[s][0] for s in range(n)]
    pos = [decode_by_slot[s][1] for s in range(n)]
    return StepInput(
        input_ids=device_tensor(ids, device),
        positions=device_tensor(positions, device),
        num_decode=n,
        decode_rows=None if rows == list(range(n)) else device_tensor(rows, device),
        decode_pos=device_tensor(pos, device) if n else None,
        decode_slots=torch.arange(n, device=device) if n else None,
        decode_lens=[p + 1 for p in pos],
        segments=segments,
        blocks=blocks,
        logits_rows=device_tensor(last_rows, device),
    )


def _prompt_blocks(segments: list[Segment], device: torch.device | str) -> tuple[list[PromptBlock], list[Segment]]:
    """(runs of two or more whole prompts of equal length in consecutive rows, the segments in none of them)."""
    blocks, singles, i = [], [], 0
    while i < len(segments):
        first, j = segments[i], i + 1
        while (j < len(segments) and first.past == 0 and segments[j].past == 0
               and segments[j].length == first.length and segments[j].row == segments[j - 1].row + first.length):
            j += 1
        if j - i >= 2:
            slots = tuple(seg.slot for seg in segments[i:j])
            blocks.append(PromptBlock(first.row, first.length, slots, device_tensor(slots, device)))
        else:
            singles.append(first)
        i = j
    return blocks, singles


def device_tensor(values: Sequence, device: torch.device | str, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A small host list as a tensor on `device`. On CUDA it goes through pinned memory, so that the copy is
    asynchronous: a copy from pageable memory would wait for the GPU to finish its queued work."""
    tensor = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def attend(step: StepInput, cache: KVCache, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Write this step's K/V into the cache and attend. q [N, H, d], k/v [N, KV, d] -> [N, H, d].

    window: sliding-window attention (a key at position j is visible from position i iff i - window < j <= i).
    softcap: attention logit soft-capping (Gemma-2), which SDPA cannot do: see `_explicit_attention`.
    """
    kc, vc = cache.k[layer], cache.v[layer]  # [slots, KV, S, d]
    n = step.num_decode
    if n == q.shape[0] and step.decode_rows is None:  # decodes only, rows in slot order: nothing to scatter
        out = None
    else:
        out = torch.empty_like(q)
    if n:
        rows = step.decode_rows
        qd, kd, vd = (q[:n], k[:n], v[:n]) if rows is None else (q[rows], k[rows], v[rows])  # slot order
        kc[step.decode_slots, :, step.decode_pos] = kd  # [n, KV, d] written at each slot's own position
        vc[step.decode_slots, :, step.decode_pos] = vd
        length = step.decode_extent()
        # grouped-query attention without expanding K/V: the G = H / KV query heads that share a KV head
        # take the place of the query-length dimension (one new token each, so no causal mask is needed)
        kv_heads = kc.shape[1]
        qg = qd.reshape(n, kv_heads, -1, qd.shape[-1])  # [n, KV, G, d]
        keys, values = kc[:n, :, :length], vc[:n, :, :length]  # [n, KV, L, d]
        if softcap is None and not (q.device.type == "cpu" and q.dtype == torch.float32):
            o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=step.decode_mask(window, q.dtype),
                                               scale=scale)
        elif softcap is None and step.extent is None and cpu_attention.usable(qg, keys, values):  # compiled passes
            o = cpu_attention.decode_attention(
                qg, keys, values, step.decode_lengths(), scale, window,
                lambda: _explicit_attention(qg, keys, values, step.decode_mask(window, q.dtype), scale, None))
        else:  # on CPU in fp32, two matmuls beat SDPA's flash kernel at these shapes (1.4-2.4x; docs/design.md §2)
            o = _explicit_attention(qg, keys, values, step.decode_mask(window, q.dtype), scale, softcap)
        o = o.reshape(qd.shape)  # [n, H, d]
        if out is None:
            return o
        if rows is None:
            out[:n] = o
        else:
            out[rows] = o
    segments = list(step.segments)
    for block in step.blocks:
        if softcap is None and (window is None or block.length <= window):
            _attend_block(block, q, k, v, kc, vc, out, scale)
        else:
            segments.extend(block.segments())
    for seg in segments:
        r = slice(seg.row, seg.row + seg.length)
        end = seg.past + seg.length
        kt, vt = k[r].transpose(0, 1), v[r].transpose(0, 1)  # [KV, T, d]
        kc[seg.slot, :, seg.past:end] = kt
        vc[seg.slot, :, seg.past:end] = vt
        if seg.past == 0:
            keys, values = kt[None], vt[None]  # [1, KV, T, d]: no need to read back what was just written
        else:
            keys, values = kc[seg.slot, :, :end][None], vc[seg.slot, :, :end][None]
        mask = _segment_mask(seg, window, q.device)
        if softcap is None:
            o = F.scaled_dot_product_attention(
                q[r].transpose(0, 1)[None], keys, values,  # [1, H, T, d]
                attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True,
            )[0]  # [H, T, d]
        else:
            if mask is None:
                mask = torch.ones(seg.length, seg.length, dtype=torch.bool, device=q.device).tril()
            kv_heads, d = keys.shape[1], q.shape[-1]
            qg = q[r].transpose(0, 1).reshape(kv_heads, -1, seg.length, d)  # [KV, G, T, d]
            o = _explicit_attention(qg, keys[0, :, None], values[0, :, None], mask, scale, softcap)
            o = o.reshape(-1, seg.length, d)  # [H, T, d]
        out[r] = o.transpose(0, 1)
    return out


def _attend_block(block: PromptBlock, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor,
                  vc: torch.Tensor, out: torch.Tensor, scale: float) -> None:
    """Write the block's K/V into its slots and attend causally, all prompts in one call. q [N, H, d], k/v
    [N, KV, d]; kc/vc [slots, KV, S, d]; the block's rows of out [N, H, d] are written."""
    b, t = len(block.slots), block.length
    r = slice(block.row, block.row + b * t)
    kt = k[r].reshape(b, t, *k.shape[1:]).transpose(1, 2)  # [B, KV, T, d]
    vt = v[r].reshape(b, t, *v.shape[1:]).transpose(1, 2)
    kc[:, :, :t].index_copy_(0, block.slot_index, kt)
    vc[:, :, :t].index_copy_(0, block.slot_index, vt)
    qt = q[r].reshape(b, t, *q.shape[1:]).transpose(1, 2)  # [B, H, T, d]
    o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)  # [B, H, T, d]
    out[r] = o.transpose(1, 2).reshape(b * t, *q.shape[1:])


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                        softcap: float | None) -> torch.Tensor:
    """Attention as two matmuls, for what SDPA cannot do (soft-capped scores, softcap * tanh(scores / softcap),
    before the mask, as HF's eager Gemma-2 attention does) or does slower (fp32 decode on CPU).
    q [..., G, T, d], k/v [..., 1 or G, S, d] (KV heads broadcast over their G query heads), mask broadcastable
    to [..., G, T, S]: bool (True = attend) or additive (0 or -inf); every query sees some key."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores.add_(mask)
    return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(q.dtype), v)


def _segment_mask(seg: Segment, window: int | None, device: torch.device) -> torch.Tensor | None:
    """[T, past+T] bool for a run after `past` cached tokens; None when plain causal attention does it."""
    end = seg.past + seg.length
    if seg.past == 0 and (window is None or seg.length <= window):
        return None
    qpos = torch.arange(seg.past, end, device=device)[:, None]  # [T, 1]
    kpos = torch.arange(end, device=device)[None, :]  # [1, past+T]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    return mask
