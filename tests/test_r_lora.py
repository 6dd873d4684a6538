"""R-LoRA (adapter-methods.md §3): the math against the spec's per-head formula, the init, the offset, refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from families import FAMILY_TARGETS, TASKS, make_adapter, randomize
from tiny import prompts, tiny_model

from loraplex.adapters import AdaptedModel, AdapterFormatError, load_adapter
from loraplex.adapters.context import BatchContext
from loraplex.adapters.io import CONFIG_FILE, read_tensors, write_adapter_dir
from loraplex.adapters.linear import LinearSpec
from loraplex.adapters.r_lora import RLoraAdapter


def spec_delta(x, t, s, offset=True):
    """The spec's formula, head by head (§3.1, §3.5): s·Σ_i g_i (x Aᵀ) B_iᵀ + (x A⁰ᵀ) B_offᵀ."""
    g = torch.softmax(x @ t["lora_router"].t(), dim=-1)  # [n, N]
    u = x @ t["lora_A"].t()  # [n, r]
    y = sum(g[:, i: i + 1] * (u @ t["lora_B"][i].t()) for i in range(t["lora_B"].shape[0])) * s
    if offset:
        y = y + (x @ t["offset_A"].t()) @ t["offset_B"].t()
    return y


def layers(d_in: int, d_out: int, names=("m",)) -> dict[str, LinearSpec]:
    return {n: LinearSpec(n, d_in, d_out, lambda: torch.zeros(d_out, d_in)) for n in names}


def module_tensors(adapter, module):
    return {p: adapter.tensors[f"{module}.{p}"] for p in adapter.modules[module]}


@pytest.mark.parametrize("offset", [True, False])
def test_delta_equals_per_head_formula(offset, tmp_path):
    adapted = AdaptedModel(tiny_model("llama"))
    adapter = make_adapter("r_lora", adapted, "llama", "r", tmp_path, seed=4, num_heads=3, offset=offset)
    bound = adapter.bind(adapted.specs, torch.device("cpu"), torch.float64)
    x = torch.randn(11, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    module = "model.layers.1.self_attn.q_proj"
    t = {k: v.double() for k, v in module_tensors(adapter, module).items()}
    expected = spec_delta(x, t, adapter.config.scaling, offset)
    got = bound.delta(module, x, torch.zeros(11, 32, dtype=torch.float64), 0)
    assert (got - expected).abs().max() < 1e-5  # the softmax runs in fp32 (§3.1), the reference in fp64
    assert expected.abs().max() > 1e-2
    assert bound.delta("model.layers.0.self_attn.k_proj", x, x, 0) is None  # not targeted


def test_fresh_adapter_with_uniform_router_is_zero():
    adapted = AdaptedModel(tiny_model("llama"))
    adapter = RLoraAdapter.create("z", adapted.specs, target_modules=FAMILY_TARGETS["llama"], rank=4, tasks=TASKS,
                                  num_heads=4, lora_alpha=32.0)
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(1))
    module = "model.layers.0.mlp.up_proj"
    bound = adapted.bind(adapter)
    assert bound.delta(module, x, x, 0).abs().max() > 1e-3  # kaiming router: gates are not uniform
    for key, tensor in adapter.tensors.items():
        if key.endswith("lora_router"):
            tensor.zero_()
    bound = adapted.bind(adapter)
    for m in bound.modules:
        x_m = torch.randn(9, adapted.specs[m].in_features, generator=torch.Generator().manual_seed(2))
        assert bound.delta(m, x_m, x_m, 0).abs().max() < 1e-6, m
    # without the offset the same adapter would move the model: the offset is what cancels it
    t = module_tensors(adapter, module)
    assert spec_delta(x, t, adapter.config.scaling, offset=False).abs().max() > 1e-3


def test_init_follows_paper_table_1():
    d_in, d_out, r, n, gamma = 512, 256, 16, 3, 64.0
    adapter = RLoraAdapter.create("i", layers(d_in, d_out), target_modules=["m"], rank=r, tasks=TASKS, seed=5,
                                  num_heads=n, lora_alpha=32.0)
    t = module_tensors(adapter, "m")
    stable = d_out**0.25 / math.sqrt(gamma)
    assert adapter.config.scaling == 32.0 / math.sqrt(r) and adapter.config.init_gamma == gamma
    assert abs(t["lora_A"].std().item() / (stable / math.sqrt(d_in)) - 1) < 0.03
    for i in range(n):
        assert abs(t["lora_B"][i].std().item() / (stable / math.sqrt(d_out)) - 1) < 0.05
        assert abs(t["lora_B"][i].mean().item()) < 0.05 * stable / math.sqrt(d_out)
    assert not torch.allclose(t["lora_B"][0], t["lora_B"][1])  # heads drawn independently
    bound = 1 / math.sqrt(d_in)  # kaiming-uniform(a=√5)
    assert t["lora_router"].abs().max() <= bound and t["lora_router"].abs().max() > 0.95 * bound
    assert torch.equal(t["offset_A"], t["lora_A"])
    assert torch.allclose(t["offset_B"], -(adapter.config.scaling / n) * t["lora_B"].sum(0))
    other = RLoraAdapter.create("i", layers(d_in, d_out), target_modules=["m"], rank=r, tasks=TASKS, seed=6)
    assert not torch.equal(other.tensors["m.lora_A"], t["lora_A"])
    explicit = RLoraAdapter.create("e", layers(8, 8), target_modules=["m"], rank=2, tasks=TASKS, scaling=0.5)
    assert explicit.config.scaling == 0.5


def test_num_parameters_counts_trainable_tensors_only():
    specs = {**layers(24, 40, ["a.q"]), **layers(40, 16, ["b.v"])}
    r, n = 4, 3
    adapter = RLoraAdapter.create("p", specs, target_modules=["q", "v"], rank=r, tasks=TASKS, num_heads=n)
    expected = sum(r * d_in + n * r * d_out + n * d_in for d_in, d_out in [(24, 40), (40, 16)])
    assert adapter.num_parameters() == expected
    assert sum(t.numel() for t in adapter.tensors.values()) == expected + sum(r * (di + do) for di, do in [(24, 40), (40, 16)])


def test_routing_varies_per_token(tmp_path):
    adapted = AdaptedModel(tiny_model("llama"))
    adapter = make_adapter("r_lora", adapted, "llama", "v", tmp_path, seed=2)
    bound = adapted.bind(adapter)
    module = "model.layers.0.mlp.down_proj"
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    g = bound.gates(module, x)
    assert g.shape == (16, adapter.config.num_heads)
    assert torch.allclose(g.sum(-1), torch.ones(16))
    assert (g - g.mean(0)).abs().max() > 0.05  # the mixture differs from token to token
    # and a fixed mixture (the mean gate for every token) does not reproduce the delta
    t = module_tensors(adapter, module)
    u = x @ t["lora_A"].t()
    fixed = adapter.config.scaling * sum(g.mean(0)[i] * (u @ t["lora_B"][i].t()) for i in range(g.shape[1]))
    fixed = fixed + (x @ t["offset_A"].t()) @ t["offset_B"].t()
    assert (bound.delta(module, x, x, 0) - fixed).abs().max() > 1e-3


def test_task_index_does_not_change_outputs(tmp_path):
    adapted = AdaptedModel(tiny_model("gpt2"))
    bound = adapted.bind(make_adapter("r_lora", adapted, "gpt2", "t", tmp_path))
    assert bound.task_sensitive is False
    ids = torch.stack(prompts([6, 6, 6], seed=4))
    with torch.no_grad():
        runs = []
        for task in range(len(TASKS)):
            with adapted.batch([(bound, task)] * 3, ids.shape[1]):
                runs.append(adapted.model(ids).logits)
        with adapted.batch([(bound, 0), (bound, 1), (bound, 2)], ids.shape[1]) as ctx:
            mixed = adapted.model(ids).logits
    assert len(ctx.groups) == 1  # one group of rows for all tasks
    assert all(torch.equal(runs[0], run) for run in runs[1:])
    assert (mixed - runs[0]).abs().max() <= 1e-5
    assert len(BatchContext.build([(bound, 0), (bound, 2)], 4).groups) == 1


def test_multi_head_dropout_masks_each_head_independently():
    """A = B_i = I, s = 1, uniform gates over 2 heads, p = ½: y = ½(m₁ + m₂)⊙x/(1−p) = (m₁ + m₂)⊙x. Independent
    masks give y/x ∈ {0, 1, 2} with shares ¼, ½, ¼; one shared mask would never give 1, no dropout always 1."""
    adapter = RLoraAdapter.create("d", layers(4, 4), target_modules=["m"], rank=4, tasks=TASKS, num_heads=2,
                                  scaling=1.0, offset=False)
    adapter.tensors["m.lora_A"].copy_(torch.eye(4))
    adapter.tensors["m.lora_B"].copy_(torch.eye(4).expand(2, 4, 4))
    adapter.tensors["m.lora_router"].zero_()
    bound = adapter.bind(layers(4, 4), torch.device("cpu"), torch.float32)
    x = torch.rand(512, 4) + 1.0
    assert torch.allclose(bound.delta("m", x, x, 0), x)  # serving: no dropout
    bound.dropout = 0.5
    torch.manual_seed(0)
    ratio = bound.delta("m", x, x, 0) / x  # ½(m₁ + m₂)·2 ∈ {0, 1, 2}
    assert torch.allclose(ratio, ratio.round(), atol=1e-5)
    share = [(ratio.round() == k).float().mean().item() for k in (0, 1, 2)]
    assert all(abs(s - e) < 0.05 for s, e in zip(share, [0.25, 0.5, 0.25])), share


def test_bind_is_differentiable(tmp_path):
    adapted = AdaptedModel(tiny_model("llama"))
    adapter = make_adapter("r_lora", adapted, "llama", "g", tmp_path)
    for t in adapter.tensors.values():
        t.requires_grad_(True)
    bound = adapted.bind(adapter)
    module = "model.layers.0.self_attn.v_proj"
    bound.delta(module, torch.randn(3, 32), None, 0).square().sum().backward()
    for p in ("lora_A", "lora_B", "lora_router"):
        assert adapter.tensors[f"{module}.{p}"].grad.abs().max() > 0, p


def _saved(tmp_path, **options):
    adapted = AdaptedModel(tiny_model("llama"))
    make_adapter("r_lora", adapted, "llama", "s", tmp_path, **options)
    path = tmp_path / "s"
    return path, json.loads((path / CONFIG_FILE).read_text()), read_tensors(path)


def _refused(path, config, tensors, message):
    write_adapter_dir(path, config, tensors)
    with pytest.raises(AdapterFormatError) as info:
        load_adapter(path)
    assert message in str(info.value)


def test_offset_false_loads_without_offset_tensors(tmp_path):
    path, config, tensors = _saved(tmp_path, offset=False)
    assert config["offset"] is False
    assert not any(".offset_" in k for k in tensors)
    adapter = load_adapter(path)
    assert set(adapter.tensors) == set(tensors)
    # offset tensors are refused where the config says there are none, and required where it says there are
    module = "model.layers.0.self_attn.q_proj"
    extra = {**tensors, f"{module}.offset_A": tensors[f"{module}.lora_A"].clone()}
    _refused(path, config, extra, "offset is false")
    _refused(path, {**config, "offset": True}, tensors, "offset_A")


def test_head_count_mismatches_are_refused(tmp_path):
    path, config, tensors = _saved(tmp_path, num_heads=3)
    module = "model.layers.1.mlp.up_proj"
    _refused(path, {**config, "num_heads": 2}, tensors, "num_heads")
    fewer = dict(tensors)
    fewer[f"{module}.lora_B"] = tensors[f"{module}.lora_B"][:2].clone()
    _refused(path, config, fewer, "B heads")
    router = dict(tensors)
    router[f"{module}.lora_router"] = tensors[f"{module}.lora_router"][:2].clone()
    _refused(path, config, router, "lora_router")


def test_other_format_errors_are_refused(tmp_path):
    path, config, tensors = _saved(tmp_path)
    module = "model.layers.0.mlp.down_proj"
    _refused(path, {k: v for k, v in config.items() if k != "scaling"}, tensors, "scaling")
    _refused(path, {**config, "r": "4"}, tensors, "'r'")
    _refused(path, {**config, "r": 2}, tensors, "lora_A")
    _refused(path, config, {k: v for k, v in tensors.items() if k != f"{module}.lora_router"}, "lora_router")
    _refused(path, config, {**tensors, f"{module}.lora_C": tensors[f"{module}.lora_A"].clone()}, "unexpected")
    _refused(path, {**config, "target_modules": ["q_proj"]}, tensors, "target_modules")
    wrong = dict(tensors)
    wrong[f"{module}.offset_B"] = torch.zeros(5, 4)
    _refused(path, config, wrong, "offset_B")


def test_randomized_adapter_round_trips_and_keeps_scaling(tmp_path):
    adapted = AdaptedModel(tiny_model("llama"))
    adapter = RLoraAdapter.create("k", adapted.specs, target_modules=["up_proj"], rank=2, tasks=TASKS,
                                  num_heads=2, scaling=0.75, dropout=0.2, init_gamma=32.0)
    randomize(adapter, 0)
    adapter.save(tmp_path / "k")
    loaded = load_adapter(tmp_path / "k")
    assert loaded.config == adapter.config
    assert loaded.config_dict()["scaling"] == 0.75 and loaded.config_dict()["num_heads"] == 2
    assert loaded.task_ids()[: len(TASKS)] == TASKS
