"""Choosing the next token of every row of a batch: greedy, temperature, top-k, top-p, per-request seeds.

Rows are independent: each sampled row draws its noise from its own `torch.Generator`, seeded once per
request, so a seeded request produces the same tokens whatever else shares its batch. Sampling uses the
exponential race (argmax p_i / E_i with E_i ~ Exp(1), distributed as p): no `multinomial`, no host sync.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

from .forward.step import device_tensor
from .request import InvalidRequestError, SamplingParams


def validate(params: SamplingParams) -> None:
    """Raise InvalidRequestError naming the first bad parameter (limits that need the engine are checked there)."""
    if not isinstance(params.temperature, (int, float)) or not 0 <= params.temperature < math.inf:  # NaN too
        raise InvalidRequestError(f"temperature must be finite and >= 0, got {params.temperature!r}")
    if not isinstance(params.top_p, (int, float)) or not 0.0 <= params.top_p <= 1.0:
        raise InvalidRequestError(f"top_p must be in [0, 1], got {params.top_p!r}")
    if not _is_int(params.top_k) or params.top_k < 0:  # above the vocabulary it keeps every token
        raise InvalidRequestError(f"top_k must be an integer >= 0, got {params.top_k!r}")
    if params.seed is not None and (not _is_int(params.seed) or not 0 <= params.seed < 2**64):
        raise InvalidRequestError(f"seed must be an integer in [0, 2**64), got {params.seed!r}")
    if params.max_new_tokens is not None and (not _is_int(params.max_new_tokens) or params.max_new_tokens < 0):
        raise InvalidRequestError(f"max_new_tokens must be an integer >= 0, got {params.max_new_tokens!r}")
    if isinstance(params.stop, str) or not all(isinstance(s, str) for s in params.stop):
        raise InvalidRequestError("stop must be a list of strings")
    if any(s == "" for s in params.stop):
        raise InvalidRequestError("stop strings must not be empty")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class RowSampler:
    """The sampling state of one request: its parameters and its own random generator."""

    temperature: float
    top_k: int  # 0 = off
    top_p: float  # 0 or 1 = off
    generator: torch.Generator | None  # None for greedy rows

    @staticmethod
    def create(params: SamplingParams, device: torch.device) -> "RowSampler":
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=device)
            # torch seeds are 64-bit; an unseeded request gets a fresh random seed of its own
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            generator.manual_seed(seed % 2**64)
        return RowSampler(float(params.temperature), int(params.top_k), float(params.top_p), generator)

    @property
    def greedy(self) -> bool:
        return self.generator is None


def sample(logits: torch.Tensor, samplers: list[RowSampler]) -> torch.Tensor:
    """logits [B, V] (any float dtype), one sampler per row -> next tokens [B] (long, on logits' device)."""
    tokens = torch.argmax(logits, dim=-1)  # [B]; greedy rows are done
    rows = [i for i, s in enumerate(samplers) if not s.greedy]
    if not rows:
        return tokens
    chosen = [samplers[i] for i in rows]
    device = logits.device
    index = device_tensor(rows, device) if len(rows) < len(samplers) else None
    sub = logits[index] if index is not None else logits
    sub = sub.float()  # [m, V]
    temps = device_tensor([s.temperature for s in chosen], device, torch.float32)  # [m]
    # shifted so that the largest logit is 0 before dividing: with a tiny temperature, logits / T would
    # overflow to inf and the softmax to NaN (then argmax picks token 0); (l - max) / T stays <= 0
    sub = (sub - sub.amax(dim=-1, keepdim=True)) / temps[:, None]
    if any(s.top_k > 0 or 0.0 < s.top_p < 1.0 for s in chosen):
        sub = _filter_top_k_top_p(sub, [s.top_k for s in chosen], [s.top_p for s in chosen])
    probs = torch.softmax(sub, dim=-1)  # [m, V]
    noise = torch.stack([torch.empty_like(probs[0]).exponential_(1.0, generator=s.generator) for s in chosen])
    picked = torch.argmax(probs / noise, dim=-1)  # [m]
    if index is None:
        return picked
    tokens[index] = picked
    return tokens


def _filter_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Set every token outside each row's top-k and top-p nucleus to -inf. logits [m, V] fp32."""
    m, vocab = logits.shape
    device = logits.device
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [m, V]
    ranks = torch.arange(vocab, device=device)[None, :]  # [1, V]
    k = device_tensor([kk if kk > 0 else vocab for kk in top_k], device)[:, None]  # [m, 1]
    drop = ranks >= k  # [m, V]
    off = 2.0  # a mass never reached
    p = device_tensor([pp if 0.0 < pp < 1.0 else off for pp in top_p], device, torch.float32)[:, None]  # [m, 1]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # probability mass strictly above each token
    drop |= (before >= p) & (ranks > 0)  # keep the smallest prefix whose mass reaches p (never empty)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
