"""The C decode attention (server/forward/cpu_attention.py) against the torch path, its oracle."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny import prompts, tiny_model

from loraplex.adapters import AdaptedModel
from loraplex.server.forward import SeqRun, build_forward, build_step, cpu_attention, step

needs_kernel = pytest.mark.skipif(cpu_attention._library() is None, reason="no C compiler to build the kernel")


def operands(groups: int, lens: list[int], d: int = 32, seed: int = 0):
    """q [n, KV, G, d] and keys/values as views of a larger cache [slots, KV, S, d] (as the engine's)."""
    gen = torch.Generator().manual_seed(seed)
    n, kv_heads, longest = len(lens), 2, max(lens)
    k_cache, v_cache = torch.randn(2, n + 3, kv_heads, longest + 9, d, generator=gen)
    q = torch.randn(n, kv_heads, groups, d, generator=gen)
    return q, k_cache[:n, :, :longest], v_cache[:n, :, :longest], torch.tensor(lens, dtype=torch.int32)


def torch_path(q, keys, values, lens, scale, window):
    cols = torch.arange(keys.shape[2])[None, :]
    visible = cols < lens[:, None]
    if window is not None:
        visible &= cols >= lens[:, None] - window
    mask = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))[:, None, None, :]
    return step._explicit_attention(q, keys, values, mask, scale, None)


@needs_kernel
@pytest.mark.parametrize("groups", [1, 3], ids=["multi-head", "grouped-query"])
@pytest.mark.parametrize("window", [None, 6], ids=["full", "sliding window"])
@pytest.mark.parametrize("d", [32, 24], ids=["vectors of 16", "any head size"])
def test_the_kernel_equals_the_torch_path(groups, window, d):
    # one key, fewer keys than the window, the longest, and lengths between
    q, keys, values, lens = operands(groups, [1, 5, 37, 12, 37, 30], d)
    assert cpu_attention.usable(q, keys, values)
    want = torch_path(q, keys, values, lens, 0.3, window)
    got = cpu_attention._call(q, keys, values, lens, 0.3, window)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_float32_decode_steps_on_cpu_attend_through_the_passes(monkeypatch):
    model = tiny_model("llama")
    adapted, forward = AdaptedModel(model), build_forward(model)
    cache = forward.new_cache(num_slots=2, max_seq_len=16)
    seqs = prompts([5, 9])
    runs = [SeqRun(ids.tolist(), slot, 0, False) for slot, ids in enumerate(seqs)]
    decode = [SeqRun([7], slot, len(ids), True) for slot, ids in enumerate(seqs)]  # two lengths: keys to hide

    def logits(step_runs):
        with torch.no_grad(), adapted.batch([(None, 0)] * 2, [len(r.tokens) for r in step_runs]):
            return forward(build_step(step_runs, "cpu"), cache)

    logits(runs)
    real_call, calls = cpu_attention._call, []
    monkeypatch.setattr(cpu_attention, "_call", lambda *args: calls.append(args) or real_call(*args))
    monkeypatch.setattr(cpu_attention, "_verdict", True)  # checked here, against the matmuls
    with_passes = logits(decode)
    assert len(calls) == forward.num_layers
    monkeypatch.setattr(cpu_attention, "_enabled", False)
    torch.testing.assert_close(with_passes, logits(decode), rtol=1e-5, atol=1e-5)  # the matmuls' answer
    assert len(calls) == forward.num_layers


@needs_kernel
def test_keys_past_a_sequences_length_are_never_read():
    q, keys, values, lens = operands(3, [4, 9])
    want = cpu_attention._call(q, keys, values, lens, 0.3, None)
    keys[0, :, 4:], values[0, :, 4:] = float("nan"), float("nan")  # another sequence's, or stale, cache rows
    assert torch.equal(cpu_attention._call(q, keys, values, lens, 0.3, None), want)


@needs_kernel
def test_a_wrong_kernel_costs_a_warning_and_the_torch_path(monkeypatch, caplog):
    q, keys, values, lens = operands(3, [3, 8])
    want = torch_path(q, keys, values, lens, 0.3, None)
    monkeypatch.setattr(cpu_attention, "_verdict", None)
    monkeypatch.setattr(cpu_attention, "_call", lambda *args: want + 1.0)  # miscompiled
    with caplog.at_level(logging.WARNING):
        got = cpu_attention.decode_attention(q, keys, values, lens, 0.3, None,
                                             lambda: torch_path(q, keys, values, lens, 0.3, None))
    assert torch.equal(got, want) and "differs from the torch path" in caplog.text
    assert not cpu_attention.usable(q, keys, values)  # for the rest of the process


def test_without_a_compiler_torch_serves(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no library built before
    cpu_attention._library.cache_clear()
    try:
        q, keys, values, _ = operands(3, [2, 3])
        with caplog.at_level(logging.WARNING):
            assert not cpu_attention.usable(q, keys, values)
        assert "not available" in caplog.text
    finally:
        cpu_attention._library.cache_clear()
