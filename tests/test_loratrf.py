"""LoRATRF (spec §5.2 interim task-aware filter): math, init, parameter count, refusals."""

from __future__ import annotations

import math

import pytest
import torch
from families import FAMILY_TARGETS, make_adapter, randomize
from tiny import prompts, tiny_model

from loraplex.adapters import (
    AdaptedModel,
    AdapterFormatError,
    IncompatibleAdapterError,
    UnsupportedAdapterError,
    load_adapter,
)
from loraplex.adapters.lora import LoraAdapter
from loraplex.adapters.loratrf import INTERPRETATION, LoraTRFAdapter

MODULE = "model.layers.0.self_attn.q_proj"


def logits(adapted: AdaptedModel, ids: torch.Tensor, bound) -> torch.Tensor:
    with torch.no_grad(), adapted.batch([(bound, 0)] * ids.shape[0], ids.shape[1]):
        return adapted.model(ids).logits


def reference_delta(x: torch.Tensor, a, b, f, c, s: float) -> torch.Tensor:
    """Spec §5.2 written out per token in float64: y_i = s · B (σ(F u_i + c) ⊙ u_i), u_i = A x_i."""
    x, a, b, f, c = (t.double() for t in (x, a, b, f, c))
    rows = []
    for xi in x:
        u = a @ xi  # [r]
        gate = 1.0 / (1.0 + torch.exp(-(f @ u + c)))  # [r]
        rows.append(s * (b @ (gate * u)))  # [d_out]
    return torch.stack(rows)


def tensors_of(adapter: LoraTRFAdapter, module: str):
    return [adapter.tensors[f"{module}.{p}"] for p in ("lora_A", "lora_B", "filter_weight", "filter_bias")]


@pytest.fixture
def llama():
    return AdaptedModel(tiny_model("llama"))


def test_create_is_the_spec_init(llama):
    adapter = LoraTRFAdapter.create("t", llama.specs, target_modules=["q_proj", "down_proj"], rank=4, lora_alpha=8)
    targeted = sorted(m for m in llama.specs if m.endswith(("q_proj", "down_proj")))
    assert sorted(adapter.factors) == targeted
    for module in targeted:
        a, b, f, c = tensors_of(adapter, module)
        d_in = llama.specs[module].in_features
        assert a.shape == (4, d_in) and a.abs().max() <= 1 / math.sqrt(d_in) and a.std() > 0.2 / math.sqrt(d_in)
        assert b.shape == (llama.specs[module].out_features, 4) and not b.any()
        assert f.shape == (4, 4) and not f.any()
        assert torch.equal(c, torch.full((4,), 4.0))
    config = adapter.config_dict()
    assert config["adapter_type"] == "loratrf" and config["scaling"] == 8 / 4 and config["dropout"] == 0.05
    assert config["filter_bias_init"] == 4.0 and config["interpretation"] == INTERPRETATION
    # seeded: the same seed gives the same A, another seed another A
    again = LoraTRFAdapter.create("t", llama.specs, target_modules=["q_proj", "down_proj"], rank=4, lora_alpha=8)
    other = LoraTRFAdapter.create("t", llama.specs, target_modules=["q_proj", "down_proj"], rank=4, seed=1)
    assert all(torch.equal(adapter.tensors[k], again.tensors[k]) for k in adapter.tensors)
    assert not torch.equal(adapter.tensors[f"{MODULE}.lora_A"], other.tensors[f"{MODULE}.lora_A"])
    with pytest.raises(UnsupportedAdapterError, match="use_rslora"):
        LoraTRFAdapter.create("t", llama.specs, target_modules=["q_proj"], rank=4, use_rslora=True)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_num_parameters_is_the_spec_formula(arch):
    adapted = AdaptedModel(tiny_model(arch))
    r = 3
    adapter = LoraTRFAdapter.create("n", adapted.specs, target_modules=FAMILY_TARGETS[arch], rank=r)
    expected = sum(
        r * (spec.in_features + spec.out_features) + r * r + r
        for name, spec in adapted.specs.items()
        if name.rsplit(".", 1)[-1] in FAMILY_TARGETS[arch]
    )
    assert adapter.num_parameters() == expected > 0


def test_delta_matches_the_spec_formula(llama, tmp_path):
    adapter = make_adapter("loratrf", llama, "llama", "f", tmp_path, seed=5)
    bound = llama.bind(adapter)
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(0))
    s = adapter.config.scaling
    for module in (MODULE, "model.layers.1.mlp.down_proj"):
        a, b, f, c = tensors_of(adapter, module)
        x_in = torch.randn(7, a.shape[1], generator=torch.Generator().manual_seed(1))
        got = bound.delta(module, x_in, torch.zeros(7, b.shape[0]), 0)
        want = reference_delta(x_in, a, b, f, c, s)
        assert got.abs().max() > 1e-3
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert bound.delta("model.layers.0.self_attn.k_proj", x, torch.zeros(7, 16), 0) is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_zero_filter_reduces_to_lora_with_gated_b(arch, tmp_path):
    """F = 0: f = σ(c) for every token, so the model equals a plain LoRA whose B is B · diag(σ(c))."""
    adapted = AdaptedModel(tiny_model(arch))
    trf = make_adapter("loratrf", adapted, arch, "z", tmp_path, seed=2)
    for module in trf.factors:
        trf.tensors[f"{module}.filter_bias"].copy_(torch.linspace(-2.0, 3.0, trf.rank))  # distinct gates
    s, r = trf.config.scaling, trf.rank
    lora_tensors = {}
    for module in trf.factors:
        a, b, _, c = tensors_of(trf, module)
        lora_tensors[f"base_model.model.{module}.lora_A.weight"] = a.clone()
        lora_tensors[f"base_model.model.{module}.lora_B.weight"] = b * torch.sigmoid(c)  # B · diag(σ(c))
    lora = LoraAdapter.from_files("plain", {"peft_type": "LORA", "r": r, "lora_alpha": s * r,
                                            "target_modules": FAMILY_TARGETS[arch]}, lora_tensors)
    ids = torch.stack(prompts([6, 6], seed=4))
    with_filter = logits(adapted, ids, adapted.bind(trf))
    plain = logits(adapted, ids, adapted.bind(lora))
    assert (with_filter - plain).abs().max() > 1e-4  # randomized F ≠ 0: not that LoRA
    for module in trf.factors:
        trf.tensors[f"{module}.filter_weight"].zero_()
    reduced = logits(adapted, ids, adapted.bind(trf))
    assert (reduced - plain).abs().max() <= 1e-5
    assert (reduced - logits(adapted, ids, None)).abs().max() > 1e-3  # and it really acts


def test_filter_makes_the_delta_input_dependent(llama, tmp_path):
    """F ≠ 0: the gate changes with x, so delta is not linear in x (no fixed ΔW exists); F = 0: linear."""
    adapter = make_adapter("loratrf", llama, "llama", "d", tmp_path, seed=3)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    h = torch.zeros(5, 32)
    bound = llama.bind(adapter)
    once, twice = bound.delta(MODULE, x, h, 0), bound.delta(MODULE, 2 * x, h, 0)
    assert (twice - 2 * once).abs().max() > 1e-3 * once.abs().max()
    adapter.tensors[f"{MODULE}.filter_weight"].zero_()
    bound = llama.bind(adapter)
    torch.testing.assert_close(bound.delta(MODULE, 2 * x, h, 0), 2 * bound.delta(MODULE, x, h, 0))


def test_merge_is_refused_and_changes_nothing(llama, tmp_path):
    bound = llama.bind(make_adapter("loratrf", llama, "llama", "m", tmp_path))
    assert not bound.mergeable
    with pytest.raises(UnsupportedAdapterError):
        bound.delta_weight(MODULE, 0)
    with pytest.raises(UnsupportedAdapterError):
        llama.merge(bound, 0)
    assert llama.merged is None and all(layer.merged_weight is None for layer in llama.layers.values())


def test_training_dropout_acts_on_x(llama, tmp_path):
    adapter = make_adapter("loratrf", llama, "llama", "p", tmp_path, seed=4)
    bound = llama.bind(adapter)
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(3))
    served = bound.delta(MODULE, x, x, 0)
    bound.dropout = 0.5
    torch.manual_seed(9)
    dropped = bound.delta(MODULE, x, x, 0)
    torch.manual_seed(9)
    x_dropped = torch.nn.functional.dropout(x, 0.5)
    torch.testing.assert_close(dropped.double(), reference_delta(x_dropped, *tensors_of(adapter, MODULE), adapter.config.scaling))
    assert (dropped - served).abs().max() > 1e-4


def test_bind_is_differentiable(llama, tmp_path):
    adapter = make_adapter("loratrf", llama, "llama", "g", tmp_path, seed=6)
    for t in adapter.tensors.values():
        t.requires_grad_(True)
    ids = prompts([5])[0][None]
    bound = llama.bind(adapter)
    with llama.batch([(bound, 0)], ids.shape[1]):
        llama.model(ids).logits.square().mean().backward()
    for param in ("lora_A", "lora_B", "filter_weight", "filter_bias"):
        grad = adapter.tensors[f"{MODULE}.{param}"].grad
        assert grad is not None and grad.abs().max() > 0, param


# ---- strict loading ----

def _files(llama):
    adapter = LoraTRFAdapter.create("b", llama.specs, target_modules=["q_proj"], rank=4)
    randomize(adapter, 0)
    return adapter.config_dict(), dict(adapter.tensors)


@pytest.mark.parametrize("edit, error, part", [
    (lambda c, t: c.pop("scaling"), AdapterFormatError, "'scaling'"),
    (lambda c, t: c.pop("interpretation"), AdapterFormatError, "'interpretation'"),
    (lambda c, t: c.update(r="4"), AdapterFormatError, "'r'"),
    (lambda c, t: c.update(r=0), AdapterFormatError, "'r'"),
    (lambda c, t: c.update(r=2), AdapterFormatError, "lora_A"),
    (lambda c, t: c.update(dropout=1.0), AdapterFormatError, "'dropout'"),
    (lambda c, t: c.update(target_modules=["k_proj"]), AdapterFormatError, "target_modules"),
    (lambda c, t: c.update(target_modules=7), AdapterFormatError, "target_modules"),
    (lambda c, t: c.update(interpretation="output-space edit (RED/ReFT)"), UnsupportedAdapterError, "interpretation"),
    (lambda c, t: c.update(filter_type="cosine"), UnsupportedAdapterError, "filter_type"),
    (lambda c, t: t.pop(f"{MODULE}.filter_bias"), AdapterFormatError, f"{MODULE}.filter_bias"),
    (lambda c, t: t.update({f"{MODULE}.filter_weight": torch.zeros(4, 3)}), AdapterFormatError, "filter_weight"),
    (lambda c, t: t.update({f"{MODULE}.filter_bias": torch.zeros(4, 1)}), AdapterFormatError, "filter_bias"),
    (lambda c, t: t.update({f"{MODULE}.lora_B": torch.zeros(32, 3)}), AdapterFormatError, "lora_B"),
    (lambda c, t: t.update({f"{MODULE}.lora_C": torch.zeros(4)}), AdapterFormatError, "lora_C"),
    (lambda c, t: t.clear(), AdapterFormatError, "no loratrf tensors"),
])
def test_bad_files_are_refused_naming_the_problem(llama, edit, error, part):
    config, tensors = _files(llama)
    LoraTRFAdapter.from_files("b", config, dict(tensors))  # the unedited files load
    edit(config, tensors)
    with pytest.raises(error) as info:
        LoraTRFAdapter.from_files("b", config, tensors)
    assert part in str(info.value)


def test_adapter_for_another_base_is_refused(llama, tmp_path):
    adapter = make_adapter("loratrf", llama, "llama", "w", tmp_path)
    gpt2 = AdaptedModel(tiny_model("gpt2"))
    with pytest.raises(IncompatibleAdapterError):
        gpt2.bind(load_adapter(tmp_path / "w"))
    assert adapter.task_ids() == ["w"]
