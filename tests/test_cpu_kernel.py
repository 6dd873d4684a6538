"""The C grouped kernel (adapters/kernels/cpu.py) against the plain-torch grouped path, its oracle."""

from __future__ import annotations

import logging

import pytest
import torch

from loraplex.adapters.grouped import add_stacked_deltas, plan_runs
from loraplex.adapters.kernels import cpu, native
from loraplex.server import cpu_threads

needs_kernel = pytest.mark.skipif(cpu._library() is None, reason="no C compiler to build the kernel")


def pool(slots: int, d_in: int, d_out: int, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [P, r, d_in], B [P, d_out, r]) as views of contiguous Aᵀ and Bᵀ, like the factor pool's; the upper half
    of the rank is zero in odd slots, as for an adapter of lower rank."""
    gen = torch.Generator().manual_seed(seed)
    at = torch.randn(slots, d_in, rank, generator=gen)
    bt = torch.randn(slots, rank, d_out, generator=gen)
    at[1::2, :, rank // 2:] = 0
    bt[1::2, rank // 2:] = 0
    return at.transpose(1, 2), bt.transpose(1, 2)


def composition(sizes: dict[int, int], shuffle: bool, seed: int = 0) -> tuple[tuple[tuple[int, torch.Tensor], ...], int]:
    """(slot, rows) per group: group sizes by slot, rows in slot order or scattered over the batch."""
    total = sum(sizes.values())
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(total)
    groups, start = [], 0
    for slot, n in sizes.items():
        groups.append((slot, order[start:start + n].sort().values))
        start += n
    return tuple(groups), total


def torch_path(out, x, factors, groups) -> torch.Tensor:
    into = out.clone()
    add_stacked_deltas(into, x, factors, plan_runs(list(groups), "cpu"))
    return into


@needs_kernel
@pytest.mark.parametrize("shuffle", [False, True], ids=["slot order", "scattered rows"])
@pytest.mark.parametrize("d_in, d_out", [(48, 40), (40, 24)])
def test_the_kernel_equals_the_torch_path(shuffle, d_in, d_out):
    # uneven groups (every tile size and remainder), slots with gaps, a lower-rank adapter, strided x
    sizes = {0: 1, 1: 3, 2: 1, 5: 19, 6: 2, 9: 1, 11: 7}
    groups, n = composition(sizes, shuffle)
    factors = pool(12, d_in, d_out, rank=8)
    x = torch.randn(n, d_in + 5)[:, :d_in]  # a row stride of d_in + 5
    out = torch.randn(n, d_out)
    want = torch_path(out, x, factors, groups)
    got = out.clone()
    assert cpu.usable(x, got, factors)
    cpu._call(x, got, factors, cpu.GroupLayout.build(groups))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("rank", [8, 24], ids=["part of a rank chunk", "a chunk and a part"])
def test_a_row_gets_the_same_bits_whatever_else_is_in_the_batch(rank):
    # groups of 1 to 7 rows go through the kernel's tiles of 4, 2 and 1 rows; 72 outputs are two chunks and a tail
    factors = pool(8, 40, 72, rank=rank)
    x = torch.randn(40, 40)
    alone = torch.zeros(40, 72)
    for row in range(28):
        cpu._call(x, alone, factors, cpu.GroupLayout.build(((3, torch.tensor([row])),)))
    mixed = torch.zeros(40, 72)
    sizes = range(1, 8)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    cpu._call(x, mixed, factors, cpu.GroupLayout.build(
        tuple((3, torch.arange(start, start + size)) for start, size in zip(starts, sizes)) +
        ((0, torch.tensor([28, 29])),)))
    assert torch.equal(alone[:28], mixed[:28])
    assert not alone[28:].any()  # rows in no group are not touched
    assert mixed[28:30].all() and not mixed[30:].any()


@needs_kernel
def test_a_wrong_kernel_costs_a_warning_and_the_torch_path(monkeypatch, caplog):
    groups, n = composition({0: 2, 2: 3}, shuffle=False)
    factors = pool(4, 16, 8, rank=4)
    x, out = torch.randn(n, 16), torch.zeros(n, 8)
    want = torch_path(out, x, factors, groups)
    monkeypatch.setattr(cpu, "_verdict", None)
    monkeypatch.setattr(cpu, "_call", lambda x, out, factors, layout: out.add_(1.0))  # miscompiled
    reference = lambda into: add_stacked_deltas(into, x, factors, plan_runs(list(groups), "cpu"))  # noqa: E731
    with caplog.at_level(logging.WARNING):
        cpu.lowrank_delta(x, out, factors, cpu.GroupLayout.build(groups), reference)
    assert torch.equal(out, want) and "differs from the torch path" in caplog.text
    assert not cpu.usable(x, out, factors)  # for the rest of the process


def test_without_a_compiler_the_torch_path_serves(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no library built before
    cpu._library.cache_clear()
    cpu._max_rank.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert not cpu.usable(torch.zeros(2, 4), torch.zeros(2, 4), pool(2, 4, 4, rank=2))
        assert "not available" in caplog.text
    finally:
        cpu._library.cache_clear()
        cpu._max_rank.cache_clear()


@needs_kernel
@pytest.mark.skipif(not cpu_threads.uses_openmp(), reason="torch does not run on OpenMP here")
def test_the_kernel_runs_on_torchs_openmp_runtime_not_a_second_one():
    torch.ones(256, 256).sum()  # torch's libgomp is mapped by now
    assert len(native.loaded_openmp_runtimes()) == 1
    factors = pool(2, 8, 8, rank=4)
    cpu._call(torch.randn(3, 8), torch.zeros(3, 8), factors, cpu.GroupLayout.build(((1, torch.arange(3)),)))
    assert len(native.loaded_openmp_runtimes()) == 1
