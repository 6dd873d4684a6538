"""A preallocated, slot-based KV cache: one slot per running sequence, written in place.

Per layer, K and V are [slots, kv_heads, max_seq_len, head_dim] on the model's device and dtype, allocated
once, so KV memory is bounded and accounted (`nbytes`) before the first request.

The running sequences always occupy slots 0..n-1 (`SlotTable` keeps that invariant): when a sequence
leaves, the sequence in the last slot moves into the hole (one copy of its own tokens). Decode attention
then reads `k[:n, :, :L]`, a view, instead of gathering the active slots out of the cache every step
(docs/design.md has the measurement).
"""

from __future__ import annotations

from typing import Protocol

import torch


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, kv_heads: int, max_seq_len: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        if num_slots < 1 or max_seq_len < 1:
            raise ValueError(f"a KV cache needs at least one slot and one position (got {num_slots}, {max_seq_len})")
        self.num_layers, self.num_slots, self.kv_heads = num_layers, num_slots, kv_heads
        self.max_seq_len, self.head_dim = max_seq_len, head_dim
        shape = (num_slots, kv_heads, max_seq_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """K and V of one token over all layers."""
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def token_bytes(self) -> int:
        return self.bytes_per_token(self.num_layers, self.kv_heads, self.head_dim, self.k[0].dtype)

    @property
    def nbytes(self) -> int:
        """Device memory held by the cache."""
        return self.token_bytes * self.num_slots * self.max_seq_len

    @torch.no_grad()
    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` on every layer."""
        for k, v in zip(self.k, self.v):
            k[dst, :, :length].copy_(k[src, :, :length])
            v[dst, :, :length].copy_(v[src, :, :length])


class SlotOwner(Protocol):
    slot: int  # the slot this sequence's K/V live in (updated by SlotTable when it moves)
    kv_len: int  # positions of the slot in use


class SlotTable:
    """Which sequence owns which slot; keeps the owners packed into slots 0..n-1."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self.owners: list[SlotOwner] = []  # owners[i].slot == i

    def __len__(self) -> int:
        return len(self.owners)

    @property
    def free(self) -> int:
        return self.cache.num_slots - len(self.owners)

    def add(self, owner: SlotOwner) -> int:
        """Give `owner` the next slot (raises if none is free: callers check `free` first)."""
        if not self.free:
            raise RuntimeError("no free KV slot")
        owner.slot = len(self.owners)
        self.owners.append(owner)
        return owner.slot

    def remove(self, owner: SlotOwner) -> None:
        """Free `owner`'s slot; the owner of the last slot moves into it (its K/V are copied)."""
        slot = owner.slot
        if not 0 <= slot < len(self.owners) or self.owners[slot] is not owner:
            raise RuntimeError("slot table out of sync")
        last = self.owners.pop()
        if last is not owner:
            self.cache.copy_slot(last.slot, slot, last.kv_len)
            last.slot = slot
            self.owners[slot] = last
        owner.slot = -1

    def tokens_in_use(self) -> int:
        return sum(o.kv_len for o in self.owners)
