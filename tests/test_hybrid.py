"""Hybrid (layer-level LoRA attention fusion): the math against an independent plain-torch formula, the
init, the parameter count, sources copied from LoRAs, and the family's own refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from families import FAMILY_TARGETS, TASKS, randomize
from tiny import prompts, tiny_model

from loraplex.adapters import AdaptedModel, AdapterFormatError, UnsupportedAdapterError, load_adapter
from loraplex.adapters.hybrid import HybridAdapter
from loraplex.adapters.io import CONFIG_FILE, WEIGHTS_FILE
from loraplex.adapters.lora import LoraAdapter

LLAMA_Q = "model.layers.0.self_attn.q_proj"


def reference_delta(adapter: HybridAdapter, module: str, x: torch.Tensor, h: torch.Tensor, task: int,
                    alpha: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight from the spec, in float64 (but the fp32 softmax), with the unfolded keys o_k K_tᵀ.

    Returns (Δ [n, d_out], α [n, K]); `alpha` overrides the attention weights."""
    cfg, ts = adapter.config, adapter.tensors
    x, h = x.double(), h.double()
    o = torch.stack([
        s.scaling * (x @ ts[f"sources.{k}.{module}.lora_A"].double().T) @ ts[f"sources.{k}.{module}.lora_B"].double().T
        for k, s in enumerate(cfg.sources)
    ], dim=1)  # [n, K, d_out]
    query = ts[f"fusion.{task}.{module}.query"].double()
    key = ts[f"fusion.{task}.{module}.key"].double()
    value = ts[f"fusion.{task}.{module}.value"].double()  # [K, d_out]
    q = h @ query.T  # [n, d_a]
    keys = o @ key.T  # [n, K, d_a]
    scores = torch.einsum("na,nka->nk", q, keys) / (math.sqrt(cfg.attention_dim) * cfg.temperature)
    if alpha is None:  # the spec's softmax_fp32: scores rounded to fp32, softmax in fp32
        alpha = torch.softmax(scores.float(), dim=-1)
    return torch.einsum("nk,nkd->nd", alpha.double(), value[None] * o), alpha


def new_hybrid(adapted: AdaptedModel, arch: str = "llama", seed: int = 0, std: float = 0.15, **options) -> HybridAdapter:
    adapter = HybridAdapter.create("h", adapted.specs, target_modules=FAMILY_TARGETS[arch], rank=4, tasks=TASKS,
                                   seed=seed, **options)
    randomize(adapter, seed + 1, std)
    return adapter


def new_lora(adapted: AdaptedModel, name: str, rank: int, seed: int, targets=("q_proj", "v_proj"), **options) -> LoraAdapter:
    lora = LoraAdapter.create(name, adapted.specs, target_modules=list(targets), rank=rank, seed=seed, **options)
    randomize(lora, seed + 50, 0.3)
    return lora


def inputs(module_spec, n: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, module_spec.in_features, generator=gen), torch.randn(n, module_spec.out_features, generator=gen)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_delta_matches_the_formula(arch):
    adapted = AdaptedModel(tiny_model(arch))
    adapter = new_hybrid(adapted, arch, attention_dim=8, temperature=0.7)
    exact = adapter.bind(adapted.specs, torch.device("cpu"), torch.float64)  # only the softmax runs in fp32
    served = adapted.bind(adapter)
    for module in sorted(served.modules):
        x, h = inputs(adapted.specs[module])
        for task in range(len(TASKS)):
            expected, alpha = reference_delta(adapter, module, x, h, task)
            assert (alpha - 1 / len(TASKS)).abs().max() > 0.05  # the attention is far from uniform here
            scale = expected.abs().max().item()
            got = exact.delta(module, x.double(), h.double(), task)
            torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-7 * scale)
            got = served.delta(module, x, h, task)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_layer_output_is_base_plus_fusion_with_base_output_as_query(arch):
    """Inside the model: the query reads h = the layer's base output, and the layer adds exactly Δ."""
    adapted = AdaptedModel(tiny_model(arch))
    adapter = new_hybrid(adapted, arch)
    bound = adapted.bind(adapter)
    module = sorted(bound.modules)[0]
    layer = adapted.layers[module]
    seen = {}
    hook = layer.register_forward_hook(lambda mod, args, out: seen.update(x=args[0].clone(), y=out.clone()))
    ids = prompts([6])[0][None]
    with torch.no_grad(), adapted.batch([(bound, 2)], ids.shape[1]):
        adapted.model(ids)
    hook.remove()
    x = seen["x"].reshape(-1, layer.in_features)
    with torch.no_grad():
        h = layer.base(x)
    expected, _ = reference_delta(adapter, module, x, h, 2)
    torch.testing.assert_close(seen["y"].reshape(h.shape).double(), h.double() + expected, rtol=1e-5, atol=1e-5)


def test_uniform_attention_gives_the_mean_of_the_value_gained_sources():
    adapted = AdaptedModel(tiny_model("llama"))
    adapter = new_hybrid(adapted)
    for key, tensor in adapter.tensors.items():
        if key.endswith(".query"):
            tensor.zero_()
    bound = adapted.bind(adapter)
    x, h = inputs(adapted.specs[LLAMA_Q])
    ts = adapter.tensors
    gained = [
        ts[f"fusion.1.{LLAMA_Q}.value"][k]
        * (s.scaling * (x @ ts[f"sources.{k}.{LLAMA_Q}.lora_A"].T) @ ts[f"sources.{k}.{LLAMA_Q}.lora_B"].T)
        for k, s in enumerate(adapter.config.sources)
    ]
    torch.testing.assert_close(bound.delta(LLAMA_Q, x, h, 1), torch.stack(gained).mean(0), rtol=1e-5, atol=1e-6)


def test_init_is_lora_per_task_plus_near_uniform_fusion():
    adapted = AdaptedModel(tiny_model("llama"))
    adapter = HybridAdapter.create("h", adapted.specs, target_modules=["q_proj", "up_proj"], rank=4, tasks=TASKS, seed=3)
    cfg = adapter.config
    assert [s.name for s in cfg.sources] == TASKS and all(s.r == 4 and s.scaling == 2.0 for s in cfg.sources)
    assert (cfg.attention_dim, cfg.temperature, cfg.fusion_dropout) == (16, 1.0, 0.0)
    query_key = []
    for key, t in adapter.tensors.items():
        if key.endswith("lora_A"):
            bound = 1 / math.sqrt(t.shape[1])
            assert t.abs().max() <= bound and t.abs().max() > 0.8 * bound  # kaiming-uniform(a=sqrt(5))
        elif key.endswith("lora_B"):
            assert torch.count_nonzero(t) == 0
        elif key.endswith(".value"):
            assert torch.equal(t, torch.ones(len(TASKS), t.shape[1]))
        else:
            query_key.append(t.flatten())
    stacked = torch.cat(query_key)
    assert abs(stacked.mean()) < 0.002 and 0.018 < stacked.std() < 0.022  # N(0, 0.02)
    # B = 0: the new adapter does nothing; with trained sources, the fresh fusion is about their mean
    bound = adapted.bind(adapter)
    x, h = inputs(adapted.specs[LLAMA_Q])
    assert torch.count_nonzero(bound.delta(LLAMA_Q, x, h, 0)) == 0
    for key, t in adapter.tensors.items():
        if key.startswith("sources."):
            t.normal_(0, 0.3)
    fused, alpha = reference_delta(adapter, LLAMA_Q, x, h, 0)
    assert (alpha - 1 / len(TASKS)).abs().max() < 0.05
    mean, _ = reference_delta(adapter, LLAMA_Q, x, h, 0, alpha=torch.full_like(alpha, 1 / len(TASKS)))
    assert (fused - mean).abs().max() < 0.1 * mean.abs().max()
    torch.testing.assert_close(adapted.bind(adapter).delta(LLAMA_Q, x, h, 0).double(), fused, rtol=1e-4, atol=1e-5)


def test_parameter_count_formula():
    adapted = AdaptedModel(tiny_model("llama"))
    loras = [new_lora(adapted, "s0", 2, 0), new_lora(adapted, "s1", 5, 1)]
    adapter = HybridAdapter.create("h", adapted.specs, target_modules=["q_proj", "v_proj"], rank=4, tasks=TASKS,
                                   seed=0, sources=loras, attention_dim=6)
    d_a, num_tasks, ranks = 6, len(TASKS), [2, 5]
    expected = 0
    for module in (m for m in adapted.specs if m.endswith(("q_proj", "v_proj"))):
        d_in, d_out = adapted.specs[module].in_features, adapted.specs[module].out_features
        expected += sum(r * (d_in + d_out) for r in ranks) + num_tasks * (2 * d_a * d_out + len(ranks) * d_out)
    assert adapter.num_parameters() == expected
    assert adapter.rank == 5


def test_single_source_hybrid_is_its_lora_exactly(tmp_path):
    adapted = AdaptedModel(tiny_model("llama"))
    # rsLoRA and an alpha_pattern: the per-module scalings must be carried over exactly
    lora = new_lora(adapted, "src", 3, 4, use_rslora=True)
    lora.config.alpha_pattern["v_proj"] = 11.0
    hybrid = new_hybrid_from(adapted, [lora], tasks=["x", "y"])
    hybrid.save(tmp_path / "h")
    hybrid = load_adapter(tmp_path / "h")
    assert hybrid.config.sources[0].name == "src"
    b_lora, b_hybrid = adapted.bind(lora), adapted.bind(hybrid)
    for module in sorted(b_lora.modules):
        x, h = inputs(adapted.specs[module])
        for task in (0, 1):
            want = b_lora.delta(module, x, h, 0)
            torch.testing.assert_close(b_hybrid.delta(module, x, h, task), want, rtol=1e-5, atol=1e-6)
    ids = prompts([7])[0][None]
    with torch.no_grad():
        with adapted.batch([(b_lora, 0)], 7):
            want = adapted.model(ids).logits
        with adapted.batch([(b_hybrid, 1)], 7):
            got = adapted.model(ids).logits
    assert (got - want).abs().max() <= 1e-5


def new_hybrid_from(adapted: AdaptedModel, loras: list[LoraAdapter], tasks=TASKS) -> HybridAdapter:
    adapter = HybridAdapter.create("h", adapted.specs, target_modules=["q_proj", "v_proj"], rank=4, tasks=tasks,
                                   seed=1, sources=loras)
    gen = torch.Generator().manual_seed(9)
    for key, t in adapter.tensors.items():  # trained-looking fusion; the sources stay the LoRAs' own
        if key.startswith("fusion.") and not key.endswith(".value"):
            t.copy_(torch.randn(t.shape, generator=gen) * 0.3)
    return adapter


@pytest.mark.parametrize("forced", [0, 1])
def test_forced_attention_reproduces_each_source(forced, monkeypatch):
    adapted = AdaptedModel(tiny_model("llama"))
    loras = [new_lora(adapted, "s0", 2, 0), new_lora(adapted, "s1", 5, 1, lora_alpha=3.0)]
    hybrid = new_hybrid_from(adapted, loras)
    bound = adapted.bind(hybrid)
    source = adapted.bind(loras[forced])

    def one_hot(scores, dim=-1):
        return torch.nn.functional.one_hot(torch.full(scores.shape[:-1], forced), scores.shape[-1]).to(scores.dtype)

    monkeypatch.setattr("loraplex.adapters.hybrid.bound.softmax_fp32", one_hot)
    for module in sorted(source.modules):
        x, h = inputs(adapted.specs[module])
        torch.testing.assert_close(bound.delta(module, x, h, 2), source.delta(module, x, h, 0), rtol=1e-5, atol=1e-6)


def test_target_tasks_select_their_own_fusion():
    adapted = AdaptedModel(tiny_model("llama"))
    adapter = new_hybrid(adapted)
    x, h = inputs(adapted.specs[LLAMA_Q])
    before = [adapted.bind(adapter).delta(LLAMA_Q, x, h, t) for t in range(len(TASKS))]
    assert (before[0] - before[1]).abs().max() > 1e-3 and (before[1] - before[2]).abs().max() > 1e-3
    adapter.tensors[f"fusion.1.{LLAMA_Q}.key"].mul_(-3.0)  # only task 1's fusion changes
    after = [adapted.bind(adapter).delta(LLAMA_Q, x, h, t) for t in range(len(TASKS))]
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    assert (after[1] - before[1]).abs().max() > 1e-3


def test_sources_with_different_modules_are_refused(tmp_path):
    adapted = AdaptedModel(tiny_model("llama"))
    both, only_q = new_lora(adapted, "a", 2, 0), new_lora(adapted, "b", 2, 1, targets=("q_proj",))
    with pytest.raises(AdapterFormatError, match="same modules"):
        HybridAdapter.create("h", adapted.specs, target_modules=["q_proj", "v_proj"], rank=2, tasks=TASKS,
                             sources=[both, only_q])
    # on disk: source 1 lacks a module that source 0 adapts, or adapts one that source 0 does not
    adapter = new_hybrid(adapted)
    adapter.save(tmp_path / "h")
    config = json.loads((tmp_path / "h" / CONFIG_FILE).read_text())
    drop = f"sources.1.{LLAMA_Q}.lora_A"
    with pytest.raises(AdapterFormatError, match=drop.replace(".", r"\.")):
        HybridAdapter.from_files("h", config, {k: v for k, v in adapter.tensors.items() if k != drop})
    extra = {**adapter.tensors, "sources.1.model.layers.0.self_attn.k_proj.lora_A": torch.zeros(4, 32)}
    with pytest.raises(AdapterFormatError, match="unexpected tensor"):
        HybridAdapter.from_files("h", config, extra)


def test_bad_configs_and_shapes_are_refused(tmp_path):
    adapted = AdaptedModel(tiny_model("llama"))
    adapter = new_hybrid(adapted)
    config, tensors = adapter.config_dict(), adapter.tensors
    sources = config["sources"]
    cases = [
        ({**config, "value_projection": "full"}, tensors, UnsupportedAdapterError, "value_projection"),
        ({**config, "attention_dim": 0}, tensors, AdapterFormatError, "attention_dim"),
        ({**config, "temperature": -1.0}, tensors, AdapterFormatError, "temperature"),
        ({**config, "fusion_dropout": 1.0}, tensors, AdapterFormatError, "fusion_dropout"),
        ({**config, "sources": [{"name": "a", "r": 4}] + sources[1:]}, tensors, AdapterFormatError, "scaling"),
        ({**config, "sources": sources[:2]}, tensors, AdapterFormatError, "value"),  # K mismatch with the tensors
        ({**config, "sources": [{**sources[0], "r": 3}] + sources[1:]}, tensors, AdapterFormatError, "lora_A"),
        ({**config, "attention_dim": 8}, tensors, AdapterFormatError, "query"),
        ({**config, "target_modules": ["q_proj"]}, tensors, AdapterFormatError, "target_modules"),
        ({**config, "adapter_type": "lora"}, tensors, AdapterFormatError, "adapter_type"),
        (config, {**tensors, f"fusion.0.{LLAMA_Q}.value": torch.ones(2, 32)}, AdapterFormatError, "value"),
        (config, {**tensors, f"fusion.3.{LLAMA_Q}.value": torch.ones(3, 32)}, AdapterFormatError, "fusion.3"),
    ]
    for bad_config, bad_tensors, error, part in cases:
        with pytest.raises(error, match=part):
            HybridAdapter.from_files("h", bad_config, bad_tensors)
    # and a LoRA whose rank differs by module cannot be one source
    lora = new_lora(adapted, "a", 3, 0)
    lora.config.rank_pattern["v_proj"] = 2
    lora.factors = {m: (a[:2], b[:, :2]) if "v_proj" in m else (a, b) for m, (a, b) in lora.factors.items()}
    with pytest.raises(UnsupportedAdapterError, match="ranks"):
        HybridAdapter.create("h", adapted.specs, target_modules=["q_proj", "v_proj"], rank=2, tasks=TASKS, sources=[lora])


def test_bind_is_differentiable_and_fusion_dropout_acts_in_training():
    adapted = AdaptedModel(tiny_model("llama"))
    adapter = new_hybrid(adapted)
    for t in adapter.tensors.values():
        t.requires_grad_(True)
    bound = adapted.bind(adapter)
    x, h = inputs(adapted.specs[LLAMA_Q])
    bound.delta(LLAMA_Q, x, h, 1).square().sum().backward()
    for kind in ("sources.0", "sources.2", "fusion.1"):
        for key in (k for k in adapter.tensors if k.startswith(kind) and LLAMA_Q in k):
            assert adapter.tensors[key].grad is not None and adapter.tensors[key].grad.abs().sum() > 0, key
    assert all(adapter.tensors[k].grad is None for k in adapter.tensors if k.startswith("fusion.0"))
    with torch.no_grad():
        served = bound.delta(LLAMA_Q, x, h, 1)
        bound.dropout = 0.5
        torch.manual_seed(0)
        dropped = bound.delta(LLAMA_Q, x, h, 1)
    assert (dropped - served).abs().max() > 1e-4


def test_bf16_binding_follows_fp32():
    adapted = AdaptedModel(tiny_model("llama"))
    adapter = new_hybrid(adapted)
    x, h = inputs(adapted.specs[LLAMA_Q])
    full = adapter.bind(adapted.specs, torch.device("cpu"), torch.float32).delta(LLAMA_Q, x, h, 0)
    half = adapter.bind(adapted.specs, torch.device("cpu"), torch.bfloat16).delta(LLAMA_Q, x.bfloat16(), h.bfloat16(), 0)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, rtol=0.05, atol=0.05 * full.abs().max().item())


def test_saved_files_hold_the_documented_format(tmp_path):
    adapted = AdaptedModel(tiny_model("llama"))
    new_hybrid(adapted).save(tmp_path / "h")
    config = json.loads((tmp_path / "h" / CONFIG_FILE).read_text())
    assert config["adapter_type"] == "hybrid" and config["tasks"] == TASKS
    assert config["sources"] == [{"name": t, "r": 4, "scaling": 2.0} for t in TASKS]
    assert (tmp_path / "h" / WEIGHTS_FILE).is_file()
    loaded = load_adapter(tmp_path / "h")
    assert loaded.tensors[f"fusion.2.{LLAMA_Q}.value"].shape == (3, 32)
    assert loaded.tensors[f"sources.1.{LLAMA_Q}.lora_B"].shape == (32, 4)
