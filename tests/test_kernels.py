"""The grouped low-rank delta kernels (adapters/kernels/) against their plain-torch oracle.

(a) Always: the torch reference equals a per-row float64 formula, and the kernel layout (each row's pool slot)
    wired into a model equals the per-group loop.
(b) With triton installed: the Triton kernels run in Triton's interpreter on CPU tensors, in a subprocess
    (TRITON_INTERPRET must be set before triton is imported, and must not leak into the CUDA tests), and
    equal the reference. This file is that subprocess's script: `TRITON_INTERPRET=1 python test_kernels.py`
    prints one JSON result per case.
(c) On CUDA (marked gpu): the compiled kernels equal the reference, and a whole mixed batch equals the loop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from families import FAMILY_TARGETS, TASKS, make_adapter
from tiny import prompts, tiny_model

from loraplex.adapters import AdaptedModel, kernels
from loraplex.adapters.kernels import reference

NO_TRITON = "triton is not installed (CPU installs and CI need not have it)"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# max |kernel - reference| allowed, as a fraction of max |reference|: fp32 sums in another order; half
# precision outputs may round to the neighbouring value (1 ulp is at most 2^-7 of the value in bf16)
TOLERANCE = {"float32": 1e-5, "bfloat16": 2**-7, "float16": 2**-10}
# (rows, d_in, d_out, rank, groups, dtype): odd sizes, ranks below and above the block sizes
CASES = [
    (7, 33, 19, 1, 1, "float32"),
    (12, 131, 77, 8, 3, "float32"),
    (9, 200, 129, 16, 8, "float32"),
    (10, 97, 65, 64, 5, "float32"),
    (6, 130, 70, 80, 4, "float32"),  # r > both kernels' rank blocks: tiled shrink, looped expand
    (12, 131, 77, 16, 8, "bfloat16"),
    (10, 97, 65, 64, 5, "bfloat16"),
    (9, 131, 77, 16, 6, "float16"),
]


def make_case(rows: int, d_in: int, d_out: int, rank: int, groups: int, dtype: str, seed: int = 0):
    """Random inputs where every group and the -1 row (no adapter) occur; x and out are strided views."""
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    x = torch.randn(d_in + 3, rows, generator=gen).to(dt)[1 : d_in + 1].t()  # non-contiguous [rows, d_in]
    a = (torch.randn(groups, rank, d_in, generator=gen) / d_in**0.5).to(dt)
    b = torch.randn(groups, d_out, rank, generator=gen).to(dt)
    idx = torch.randint(-1, groups, (rows,), generator=gen)
    idx[: groups + 1] = torch.arange(-1, groups)
    idx = idx[torch.randperm(rows, generator=gen)].to(torch.int32 if seed % 2 == 0 else torch.int64)
    out = torch.randn(rows, 2 * d_out, generator=gen).to(dt)[:, ::2]  # non-contiguous [rows, d_out]
    return x, idx, a, b, out


def per_row(x, idx, a, b, out) -> torch.Tensor:
    """The definition, one row at a time in float64."""
    expected = out.double().clone()
    for i, g in enumerate(idx.tolist()):
        if g >= 0:
            expected[i] += (x[i].double() @ a[g].double().t()) @ b[g].double().t()
    return expected


# (a) always -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_equals_the_per_row_formula(case):
    x, idx, a, b, out = make_case(*case, seed=1)
    before = out.clone()
    got = kernels.lowrank_delta(x, idx, a, b, out)  # CPU tensors: the reference
    assert got is out  # in place
    expected = per_row(x, idx, a, b, before)
    tol = max(TOLERANCE[case[-1]], 1e-6) * expected.abs().max().item()
    assert (got.double() - expected).abs().max().item() <= tol
    assert torch.equal(got[idx < 0], before[idx < 0])  # rows without an adapter untouched
    u = kernels.reference.shrink(x, idx, a)
    assert u.dtype == torch.float32 and not u[idx < 0].any()


def test_lowrank_delta_refuses_mismatched_shapes_and_unknown_backends():
    x, idx, a, b, out = make_case(4, 16, 8, 2, 2, "float32")
    with pytest.raises(ValueError, match="shapes"):
        kernels.lowrank_delta(x, idx[:3], a, b, out)
    with pytest.raises(ValueError, match="shapes"):
        kernels.lowrank_delta(x, idx, a, b.transpose(1, 2), out)
    with pytest.raises(ValueError, match="shapes"):
        kernels.lowrank_delta(x, idx.float(), a, b, out)
    with pytest.raises(ValueError, match="backend"):
        kernels.lowrank_delta(x, idx, a, b, out, backend="cuda")
    assert not kernels.uses_triton(x)  # CPU tensors never take the kernels by default


def test_stacked_rows_carry_their_pool_slot(tmp_path):
    """The kernels' layout: each row's factor-pool slot, -1 for rows the stacked path does not serve."""
    adapted = AdaptedModel(tiny_model("llama"))
    a, b = (adapted.bind(make_adapter("lora", adapted, "llama", n, tmp_path, seed=i)) for i, n in enumerate("ab"))
    with torch.no_grad(), adapted.batch([(b, 0), (None, 0), (a, 0), (b, 0)], 1) as ctx:
        pass
    slot_a, slot_b = adapted.factor_pool.slot_of(a, 0), adapted.factor_pool.slot_of(b, 0)
    assert ctx.stacked.slot_index.tolist() == [slot_b, -1, slot_a, slot_b] and slot_a != slot_b
    assert ctx.stacked.slot_index.dtype == torch.int32


TARGETED_LAYERS = 2 * len(FAMILY_TARGETS["llama"])  # the tiny llama has 2 decoder layers


def mixed_batch_logits(adapted: AdaptedModel, tmp_path, arch: str = "llama") -> dict[bool, torch.Tensor]:
    """Logits of one decode step: a base row, then two rounds of six adapters (five stackable; multi-task
    ones on two tasks), so groups own scattered rows. {True: the stacked path, False: the per-group loop}."""
    bound = [adapted.bind(make_adapter(f, adapted, arch, f"{f}{i}", tmp_path, seed=i))
             for i, f in enumerate(["lora", "lora", "gift", "mtl_lora", "r_lora", "lora"])]
    plan = [(None, 0)] + [(b, t % len(TASKS) if b.adapter.multi_task else 0) for t in range(2) for b in bound]
    ids = torch.stack(prompts([1] * len(plan), seed=4)).to(adapted.device)
    results = {}
    for stacked in (False, True):
        adapted.stacked = stacked
        with torch.no_grad(), adapted.batch(plan, 1) as ctx:
            results[stacked] = adapted.model(ids).logits.float().cpu()
        assert (ctx.stacked is not None) == stacked
    return results


def counting(monkeypatch, **fixed) -> list[int]:
    """Count the calls of kernels.lowrank_delta (with `fixed` keyword arguments), as the model makes them."""
    calls: list[int] = []
    original = kernels.lowrank_delta

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs, **fixed)

    monkeypatch.setattr(kernels, "lowrank_delta", spy)
    return calls


def test_kernel_layout_in_a_model_equals_the_loop(tmp_path, monkeypatch):
    """The CUDA wiring (per-row group index, in-place add) with the torch reference in place of the kernels."""
    monkeypatch.setattr(kernels, "uses_triton", lambda x: True)
    calls = counting(monkeypatch, backend="torch")
    results = mixed_batch_logits(AdaptedModel(tiny_model("llama")), tmp_path)
    assert len(calls) == TARGETED_LAYERS
    assert (results[True] - results[False]).abs().max() <= 1e-5


# (b) Triton's interpreter, on CPU ------------------------------------------------------------------------


def interpreter_main() -> None:
    """Run every case through the Triton kernels in the interpreter; print one JSON line per case."""
    from loraplex.adapters.kernels import reference, triton_bgmv

    assert os.environ.get("TRITON_INTERPRET") == "1"
    for case in CASES:
        x, idx, a, b, out = make_case(*case)
        before = out.clone()
        u_kernel, u_ref = triton_bgmv.shrink(x, idx, a), reference.shrink(x, idx, a)
        got = kernels.lowrank_delta(x, idx, a, b, out, backend="triton")
        expected = kernels.lowrank_delta(x, idx, a, b, before.clone(), backend="torch")
        print(json.dumps({
            "case": list(case),
            "u_error": (u_kernel - u_ref).abs().max().item() / u_ref.abs().max().item(),
            "u_zero_where_no_adapter": not u_kernel[idx < 0].any().item(),
            "error": (got.float() - expected.float()).abs().max().item() / expected.float().abs().max().item(),
            "untouched_where_no_adapter": torch.equal(got[idx < 0], before[idx < 0]),
            "in_place": got is out,
        }))
    # the whole model: the stacked path through the kernels (forced on CPU tensors) against the loop
    import tempfile

    kernels.uses_triton = lambda x: True
    with tempfile.TemporaryDirectory() as tmp:
        from pathlib import Path

        results = mixed_batch_logits(AdaptedModel(tiny_model("llama")), Path(tmp))
    print(json.dumps({"model_error": (results[True] - results[False]).abs().max().item()}))


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=180,
                         cwd=os.path.dirname(__file__))
    if run.returncode != 0 and "only 0-dimensional arrays can be converted to Python scalars" in run.stderr:
        # triton 3.6's interpreter converts a 1-element array to an int, which numpy >= 2.5 refuses (seen on the GPU
        # image: numpy 2.5.2, triton 3.6.0); the compiled kernels are tested on CUDA beside it (-m gpu)
        pytest.skip("this triton's interpreter does not run under this numpy (only 0-dimensional arrays ...)")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return {"cases": {tuple(r["case"]): r for r in lines if "case" in r},
            "model_error": next(r["model_error"] for r in lines if "model_error" in r)}


@pytest.mark.skipif(not kernels.triton_available(), reason=NO_TRITON)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_kernels_in_the_interpreter_equal_the_reference(case, interpreted):
    result = interpreted["cases"][case]
    assert result["u_error"] <= 1e-5 and result["u_zero_where_no_adapter"]  # u is fp32 for every dtype
    assert result["error"] <= TOLERANCE[case[-1]]
    assert result["untouched_where_no_adapter"] and result["in_place"]


@pytest.mark.skipif(not kernels.triton_available(), reason=NO_TRITON)
def test_triton_kernels_in_the_interpreter_serve_a_model_like_the_loop(interpreted):
    assert interpreted["model_error"] <= 1e-5


# (c) CUDA -------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.triton_available()),
                                reason="needs CUDA and triton")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_kernels_on_cuda_equal_the_reference(case, monkeypatch):
    monkeypatch.setattr(kernels, "_enabled", True)  # serve --grouped-kernels triton
    x, idx, a, b, out = (t.cuda() for t in make_case(*case))
    assert kernels.uses_triton(x)
    before = out.clone()
    got = kernels.lowrank_delta(x, idx, a, b, out)
    expected = kernels.lowrank_delta(x, idx, a, b, before.clone(), backend="torch")
    assert got is out
    error = (got.float() - expected.float()).abs().max().item() / expected.float().abs().max().item()
    assert error <= TOLERANCE[case[-1]]
    assert torch.equal(got[idx < 0], before[idx < 0])


@pytest.mark.gpu
@needs_cuda
def test_a_mixed_batch_on_cuda_through_the_kernels_equals_the_loop(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "_enabled", True)  # serve --grouped-kernels triton
    calls = counting(monkeypatch)
    results = mixed_batch_logits(AdaptedModel(tiny_model("llama").cuda()), tmp_path)
    assert len(calls) == TARGETED_LAYERS  # the stacked path went through the kernels in every targeted layer
    assert (results[True] - results[False]).abs().max() <= 1e-4


if __name__ == "__main__":
    interpreter_main()


class _FakeKernels:
    """Stands in for `triton_bgmv` (no triton here): the reference, optionally off by a constant, or failing."""

    def __init__(self, offset: float = 0.0, fail: bool = False) -> None:
        self.offset, self.fail = offset, fail

    def shrink(self, x, idx, a):
        if self.fail:
            raise RuntimeError("PTX compilation failed")
        return reference.shrink(x, idx, a)

    def expand(self, u, idx, b, out):
        return reference.expand(u, idx, b, out).add_(self.offset)


@pytest.mark.parametrize("fake, verdict", [(_FakeKernels(), True), (_FakeKernels(offset=0.5), False),
                                           (_FakeKernels(fail=True), False)], ids=["agree", "wrong", "fail"])
def test_first_use_check_keeps_wrong_or_failing_kernels_off_the_serving_path(monkeypatch, caplog, fake, verdict):
    monkeypatch.setitem(sys.modules, "loraplex.adapters.kernels.triton_bgmv", fake)
    monkeypatch.setattr(kernels, "triton_bgmv", fake, raising=False)
    monkeypatch.setattr(kernels, "_verdicts", {})
    monkeypatch.setattr(kernels, "_enabled", True)  # serve --grouped-kernels triton
    x, idx, a, b, out = make_case(6, 33, 19, 8, 3, "float32", seed=3)
    assert kernels._first_use_check(x, idx, a, b, out) is verdict
    assert kernels._verdicts == {(x.device, x.dtype): verdict}
    assert ("using the plain-torch path" in caplog.text) is not verdict
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # as if on CUDA
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    assert kernels.uses_triton(x) is verdict
    kernels.enable(False)  # serve --grouped-kernels torch (monkeypatch restores the flag)
    assert not kernels.uses_triton(x)
