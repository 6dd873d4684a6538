"""GIFT against the paper's formulas written out here in plain torch:
ΔW_ℓ = W_ℓ φ ψ (weight space) and y = (x + (x ψᵀ) φᵀ) Wᵀ + b (activation space), Θ = (φ, ψ) shared over layers."""

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
from loraplex.adapters.gift import GiftAdapter
from loraplex.adapters.lora import BoundLowRank
from loraplex.adapters.linear import base_weight

R = 4


def theta(adapter, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(φ [d_in, r], ψ [r, d_in]) of one Θ."""
    return adapter.tensors[f"gift.{key}.phi"], adapter.tensors[f"gift.{key}.psi"]


def valid_config(**changes) -> dict:
    return {"adapter_type": "gift", "r": R, "target_modules": ["q_proj"], "share_projections": False,
            "scaling": 1.0, **changes}


def valid_tensors(d_in: int = 32) -> dict:
    return {"gift.q_proj.phi": torch.randn(d_in, R), "gift.q_proj.psi": torch.randn(R, d_in)}


def served(adapted: AdaptedModel, bound, module: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of `module` in one forward pass served through `bound`."""
    seen = {}
    hook = adapted.layers[module].register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    try:
        with torch.no_grad(), adapted.batch([(bound, 0)], ids.shape[1]):
            adapted.model(ids)
    finally:
        hook.remove()
    return seen["x"], seen["y"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_weight_is_w_times_identity_plus_phi_psi(arch, tmp_path):
    adapted = AdaptedModel(tiny_model(arch))
    adapter = make_adapter("gift", adapted, arch, "g", tmp_path, seed=5)
    bound = adapted.bind(adapter)
    adapted.merge(bound)
    checked = 0
    for name, layer in adapted.layers.items():
        key = next((t for t in adapter.config.target_modules if name == t or name.endswith("." + t)), None)
        if key is None:
            assert layer.merged_weight is None and name not in bound.modules
            continue
        phi, psi = theta(adapter, key)
        w = base_weight(layer.base).float()  # [d_out, d_in]
        expected = w @ (torch.eye(w.shape[1]) + phi @ psi)
        assert torch.allclose(layer.merged_weight, expected, atol=1e-5), name
        assert torch.linalg.matrix_rank(bound.delta_weight(name, 0)) <= R
        checked += 1
    assert checked == 2 * len(adapter.config.target_modules)


@pytest.mark.parametrize("arch, module", [("llama", "model.layers.1.self_attn.v_proj"),
                                          ("gpt2", "transformer.h.1.attn.c_attn"),
                                          ("gpt2", "transformer.h.0.mlp.c_proj")])
def test_served_output_is_the_activation_space_form(arch, module, tmp_path):
    adapted = AdaptedModel(tiny_model(arch))
    adapter = make_adapter("gift", adapted, arch, "g", tmp_path, seed=2)
    key = next(t for t in adapter.config.target_modules if module.endswith("." + t))
    phi, psi = theta(adapter, key)
    x, y = served(adapted, adapted.bind(adapter), module, prompts([7])[0][None])
    base = adapted.layers[module].base
    x_gift = x + (x @ psi.t()) @ phi.t()  # [.., d_in]
    if arch == "gpt2":  # Conv1D stores W as [d_in, d_out]: y = x W + b
        expected = x_gift @ base.weight + base.bias
    else:
        expected = x_gift @ base.weight.t() + (0 if base.bias is None else base.bias)
    assert torch.allclose(y, expected, atol=1e-5)
    without = x @ base.weight + base.bias if arch == "gpt2" else x @ base.weight.t()
    assert (y - without).abs().max() > 1e-3  # the adapter acts on this layer


def test_gpt2_fused_c_attn_moves_q_k_and_v_and_c_proj_gets_one_theta_per_role(tmp_path):
    adapted = AdaptedModel(tiny_model("gpt2"))
    adapter = make_adapter("gift", adapted, "gpt2", "g", tmp_path, seed=4)
    # c_proj has d_in 32 in attention and 128 in the MLP: one Θ per role, since a Θ fits one d_in
    assert adapter.config.target_modules == ["c_attn", "attn.c_proj", "mlp.c_proj", "c_fc"]
    assert theta(adapter, "mlp.c_proj")[0].shape == (128, R)
    bound = adapted.bind(adapter)
    x = torch.randn(5, 32)
    delta = bound.delta("transformer.h.0.attn.c_attn", x, torch.zeros(5, 96), 0)  # [5, 96]
    assert delta.shape == (5, 96)
    for part in delta.split(32, dim=1):  # q, k and v all receive W φ ψ
        assert part.abs().max() > 1e-3
    with pytest.raises(IncompatibleAdapterError):  # one Θ cannot fit both c_proj widths
        GiftAdapter.create("s", adapted.specs, target_modules=["c_proj"], rank=R, share_projections=True)


def test_shared_projections_use_one_theta_for_all_targets(tmp_path):
    adapted = AdaptedModel(tiny_model("llama"))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]  # all of d_in 32
    adapter = GiftAdapter.create("s", adapted.specs, target_modules=targets, rank=R, share_projections=True)
    randomize(adapter, 9)
    adapter.save(tmp_path / "s")
    adapter = load_adapter(tmp_path / "s")
    assert adapter.config_dict()["share_projections"] is True
    assert set(adapter.tensors) == {"gift.shared.phi", "gift.shared.psi"}
    assert adapter.num_parameters() == 2 * R * 32
    phi, psi = theta(adapter, "shared")
    bound = adapted.bind(adapter)
    assert len(bound.modules) == 2 * len(targets)
    assert len({id(a) for a, _, _ in bound.pairs.values()}) == 1  # one ψ tensor serves every layer
    for name in bound.modules:
        w = base_weight(adapted.layers[name].base)
        assert torch.allclose(bound.delta_weight(name, 0), w @ phi @ psi, atol=1e-6)
    per_layer_b = sum(b.numel() for _, b, _ in bound.pairs.values())
    assert bound.nbytes() == 4 * (per_layer_b + R * 32)
    # a shared Θ has one d_in: adding down_proj (d_in 64) does not fit
    with pytest.raises(IncompatibleAdapterError, match="share_projections"):
        GiftAdapter.create("s", adapted.specs, target_modules=["q_proj", "down_proj"], rank=R, share_projections=True)
    config = {**adapter.config_dict(), "target_modules": ["q_proj", "down_proj"]}
    loaded = GiftAdapter.from_files("s", config, dict(adapter.tensors))
    with pytest.raises(IncompatibleAdapterError, match="down_proj"):
        adapted.bind(loaded)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_fresh_adapter_changes_nothing_and_follows_the_reference_init(arch):
    adapted = AdaptedModel(tiny_model(arch))
    adapter = GiftAdapter.create("fresh", adapted.specs, target_modules=FAMILY_TARGETS[arch], rank=16, seed=1)
    for key in adapter.config.theta_keys():
        phi, psi = theta(adapter, key)
        d_in = phi.shape[0]
        bound = 1 / math.sqrt(d_in)  # nn.Linear(d_in, r): kaiming_uniform(a=√5) = U(±1/√d_in)
        assert phi.shape == (d_in, 16) and psi.shape == (16, d_in)
        assert phi.abs().max() <= bound and phi.abs().max() > 0.8 * bound
        assert abs(phi.std().item() - bound / math.sqrt(3)) < 0.25 * bound / math.sqrt(3)
        assert torch.count_nonzero(psi) == 0
    again = GiftAdapter.create("fresh", adapted.specs, target_modules=FAMILY_TARGETS[arch], rank=16, seed=1)
    other = GiftAdapter.create("fresh", adapted.specs, target_modules=FAMILY_TARGETS[arch], rank=16, seed=2)
    assert all(torch.equal(adapter.tensors[k], again.tensors[k]) for k in adapter.tensors)
    assert not all(torch.equal(adapter.tensors[k], other.tensors[k]) for k in adapter.tensors)
    ids = torch.stack(prompts([6, 6], seed=3))
    bound = adapted.bind(adapter)
    with torch.no_grad():
        with adapted.batch([(None, 0)] * 2, 6):
            base = adapted.model(ids).logits
        with adapted.batch([(bound, 0)] * 2, 6):
            assert torch.equal(adapted.model(ids).logits, base)


def test_parameter_count_is_two_r_d_in_per_theta_for_any_depth():
    counts = []
    for layers in (2, 5):
        model = tiny_model("llama")
        model = type(model)(type(model.config)(**{**model.config.to_dict(), "num_hidden_layers": layers}))
        adapted = AdaptedModel(model)
        adapter = GiftAdapter.create("n", adapted.specs, target_modules=FAMILY_TARGETS["llama"], rank=R)
        counts.append(adapter.num_parameters())
    # q_proj, v_proj, o_proj, up_proj take d_in = hidden 32; down_proj takes intermediate 64
    assert counts == [2 * R * (4 * 32 + 64)] * 2


def test_bind_computes_b_in_fp32_then_casts_and_stays_differentiable(tmp_path):
    model = tiny_model("llama", dtype=torch.bfloat16)
    adapted = AdaptedModel(model)
    adapter = GiftAdapter.create("d", adapted.specs, target_modules=["q_proj", "down_proj"], rank=R)
    randomize(adapter, 3)
    bound = adapted.bind(adapter)
    assert isinstance(bound, BoundLowRank)
    module = "model.layers.0.mlp.down_proj"
    a, b, scale = bound.pairs[module]
    w = base_weight(adapted.layers[module].base)
    assert scale == 1.0 and a.dtype == b.dtype == torch.bfloat16
    assert torch.equal(b, (w.float() @ theta(adapter, "down_proj")[0]).to(torch.bfloat16))
    # a trainer makes Θ require grad and binds again: gradients reach φ and ψ
    for t in adapter.tensors.values():
        t.requires_grad_(True)
    model.float()  # in place: the adapted layers now hold fp32 weights
    bound = adapter.bind(adapted.specs, torch.device("cpu"), torch.float32)
    ids = prompts([5])[0][None]
    with adapted.batch([(bound, 0)], 5):
        adapted.model(ids).logits.float().pow(2).mean().backward()
    for name, t in adapter.tensors.items():
        assert t.grad is not None and t.grad.abs().max() > 0, name


@pytest.mark.parametrize(
    "config, tensors, error, named",
    [
        ({"r": None}, None, AdapterFormatError, "'r'"),
        ({"r": "4"}, None, AdapterFormatError, "'r'"),
        ({"scaling": None}, None, AdapterFormatError, "'scaling'"),
        ({"scaling": 2.0}, None, UnsupportedAdapterError, "scaling"),
        ({"share_projections": "yes"}, None, AdapterFormatError, "share_projections"),
        ({"target_modules": r".*q_proj"}, None, UnsupportedAdapterError, "regex"),
        ({"target_modules": []}, None, AdapterFormatError, "empty"),
        ({"target_modules": ["q_proj", "self_attn.q_proj"]}, None, AdapterFormatError, "same layers"),
        ({"target_modules": ["q_proj", "v_proj"]}, None, AdapterFormatError, "gift.v_proj.phi"),
        ({"adapter_type": "lora"}, None, AdapterFormatError, "adapter_type"),
        ({"gift_parameters": {"block_type": "transformer"}}, None, UnsupportedAdapterError, "simple_block"),
        ({"out_projection_bias": True}, None, UnsupportedAdapterError, "out_projection_bias"),
        ({"share_projections": True}, None, AdapterFormatError, "gift.q_proj.phi"),
        ({}, {"gift.q_proj.bias": torch.zeros(R)}, AdapterFormatError, "gift.q_proj.bias"),
        ({}, {"gift.q_proj.psi": torch.zeros(R, 31)}, AdapterFormatError, "gift.q_proj.psi"),
        ({}, {"gift.q_proj.phi": torch.zeros(32, R + 1)}, AdapterFormatError, "gift.q_proj.phi"),
    ],
)
def test_bad_files_are_refused_by_name(config, tensors, error, named):
    files = valid_tensors()
    files.update(tensors or {})
    with pytest.raises(error, match=named):
        GiftAdapter.from_files("bad", valid_config(**config), files)


def test_bind_refuses_unmatched_targets_and_wrong_widths():
    adapted = AdaptedModel(tiny_model("llama"))
    GiftAdapter.from_files("ok", valid_config(), valid_tensors())  # the baseline is valid
    no_layer = GiftAdapter.from_files("x", valid_config(target_modules=["c_attn"]),
                                      {"gift.c_attn.phi": torch.randn(32, R), "gift.c_attn.psi": torch.randn(R, 32)})
    with pytest.raises(IncompatibleAdapterError, match="c_attn"):
        adapted.bind(no_layer)
    wide = GiftAdapter.from_files("w", valid_config(), valid_tensors(d_in=48))
    with pytest.raises(IncompatibleAdapterError, match="q_proj"):
        adapted.bind(wide)
    with pytest.raises(UnsupportedAdapterError, match="lora_alpha"):
        GiftAdapter.create("o", adapted.specs, target_modules=["q_proj"], rank=R, lora_alpha=8)
