"""MTL-LoRA against the paper's formula (adapter-methods.md §2), its init, parameter count and refusals."""

from __future__ import annotations

import math

import pytest
import torch
from families import FAMILY_TARGETS, TASKS, make_adapter, randomize
from tiny import prompts, right_padded, tiny_model
from transformers.pytorch_utils import Conv1D

from loraplex.adapters import AdaptedModel, AdapterFormatError, UnsupportedAdapterError, load_adapter
from loraplex.adapters.io import read_config, read_tensors
from loraplex.adapters.mtl_lora import MtlLoraAdapter

Q = "model.layers.0.self_attn.q_proj"


def paper_delta_weight(adapter: MtlLoraAdapter, module: str, task: int) -> torch.Tensor:
    """ΔW_t = s · Σ_i softmax(ω_t/τ)_i B_i · Λ_t · A, straight from the paper's equation (§2.1, §2.5)."""
    cfg = adapter.config_dict()
    a = adapter.tensors[f"{module}.lora_A"].double()  # [r, d_in]
    lam = adapter.tensors[f"{module}.lora_lambda"][task].double()  # [r, r] or [r]
    if cfg["lambda_format"] == "diagonal":
        lam = torch.diag(lam)
    b = adapter.tensors[f"{module}.lora_B"].double()  # [n, d_out, r]
    omega = adapter.tensors[f"{module}.lora_omega"][task].double()  # [n]
    weights = torch.exp(omega / cfg["temperature"]) / torch.exp(omega / cfg["temperature"]).sum()
    mixed = sum(weights[i] * b[i] for i in range(b.shape[0]))  # [d_out, r]
    return cfg["scaling"] * mixed @ lam @ a  # [d_out, d_in]


def logits(adapted: AdaptedModel, ids: torch.Tensor, plan) -> torch.Tensor:
    with torch.no_grad(), adapted.batch(plan, ids.shape[1]):
        return adapted.model(ids).logits


@pytest.mark.parametrize("lambda_format", ["full", "diagonal"])
def test_delta_is_the_paper_formula(lambda_format, tmp_path):
    adapted = AdaptedModel(tiny_model("llama"))
    adapter = make_adapter("mtl_lora", adapted, "llama", "m", tmp_path, lambda_format=lambda_format,
                           scaling=1.7, temperature=0.5, num_b=2)
    bound = adapted.bind(adapter)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    for task in range(len(TASKS)):
        expected = (x.double() @ paper_delta_weight(adapter, Q, task).t()).float()  # Σ π_i B_i Λ_t A x, per row
        got = bound.delta(Q, x, torch.zeros(5, 32), task)
        assert (got - expected).abs().max() < 1e-5
        assert (bound.delta_weight(Q, task) - paper_delta_weight(adapter, Q, task).float()).abs().max() < 1e-6
    assert bound.delta("model.layers.0.self_attn.k_proj", x, torch.zeros(5, 16), 0) is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_served_logits_equal_base_with_paper_weights_added(arch, tmp_path):
    """End to end: serving task t equals a plain model whose weights got the paper's ΔW_t added."""
    adapted = AdaptedModel(tiny_model(arch))
    adapter = make_adapter("mtl_lora", adapted, arch, "m", tmp_path, seed=4)
    bound = adapted.bind(adapter)
    ids = prompts([7])[0][None]
    for task in (0, 2):
        oracle = tiny_model(arch)
        with torch.no_grad():
            for module in {k.rsplit(".", 1)[0] for k in adapter.tensors}:
                layer = oracle.get_submodule(module)
                delta = paper_delta_weight(adapter, module, task).float()
                layer.weight += delta.t() if isinstance(layer, Conv1D) else delta
            expected = oracle(ids).logits
        assert (logits(adapted, ids, [(bound, task)]) - expected).abs().max() < 1e-5


def test_tasks_differ_only_through_their_lambda_and_omega(tmp_path):
    adapted = AdaptedModel(tiny_model("llama"))
    adapter = make_adapter("mtl_lora", adapted, "llama", "m", tmp_path)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    bound = adapted.bind(adapter)
    deltas = [bound.delta(Q, x, None, t) for t in range(len(TASKS))]
    for i in range(len(TASKS)):
        for j in range(i):
            assert (deltas[i] - deltas[j]).abs().max() > 1e-3
    # copy task 0's Λ and ω onto task 1: the two tasks then behave identically (A and B_i are shared)
    for param in ("lora_lambda", "lora_omega"):
        tensor = adapter.tensors[f"{Q}.{param}"]
        tensor[1] = tensor[0]
    bound = adapted.bind(adapter)
    assert torch.equal(bound.delta(Q, x, None, 0), bound.delta(Q, x, None, 1))
    assert not torch.equal(bound.delta(Q, x, None, 0), bound.delta(Q, x, None, 2))


def test_diagonal_format_end_to_end(tmp_path):
    adapted = AdaptedModel(tiny_model("llama"))
    diag = make_adapter("mtl_lora", adapted, "llama", "d", tmp_path, seed=5, lambda_format="diagonal")
    assert read_config(tmp_path / "d")["lambda_format"] == "diagonal"
    assert diag.tensors[f"{Q}.lora_lambda"].shape == (len(TASKS), 4)
    bound = adapted.bind(diag)
    plan = [(bound, 2), (None, 0), (bound, 0), (bound, 1)]
    seqs = prompts([6, 4, 8, 5], seed=3)
    batch = logits(adapted, right_padded(seqs), plan)
    for i, (seq, assignment) in enumerate(zip(seqs, plan)):
        assert (batch[i, : len(seq)] - logits(adapted, seq[None], [assignment])[0]).abs().max() <= 1e-5
    # the same adapter written with full Λ_t = diag(λ_t) serves the same logits
    full_tensors = {k: torch.diag_embed(v) if k.endswith("lora_lambda") else v.clone() for k, v in diag.tensors.items()}
    full = MtlLoraAdapter.from_files("f", {**diag.config_dict(), "lambda_format": "full"}, full_tensors)
    ids = torch.stack(prompts([5, 5], seed=4))
    bound_full = adapted.bind(full)
    for task in range(len(TASKS)):
        served = logits(adapted, ids, [(bound, task)] * 2)
        assert (served - logits(adapted, ids, [(bound_full, task)] * 2)).abs().max() <= 1e-5
    unmerged = logits(adapted, ids, [(bound, 1)] * 2)
    adapted.merge(bound, 1)
    assert (logits(adapted, ids, [(bound, 1)] * 2) - unmerged).abs().max() <= 1e-5
    adapted.unmerge()


@pytest.mark.parametrize("lambda_format", ["full", "diagonal"])
def test_create_is_the_papers_init(lambda_format):
    adapted = AdaptedModel(tiny_model("llama"))
    adapter = MtlLoraAdapter.create("i", adapted.specs, target_modules=["q_proj", "down_proj"], rank=4,
                                    tasks=TASKS, lambda_format=lambda_format)
    cfg = adapter.config_dict()
    assert cfg["scaling"] == cfg["lora_alpha"] / cfg["r"] == 2.0
    assert cfg["temperature"] == 0.1 and cfg["dropout"] == 0.05 and cfg["num_b"] == 3
    modules = {k.rsplit(".", 1)[0] for k in adapter.tensors}
    assert len(modules) == 4  # q_proj and down_proj in both layers
    for module in modules:
        a = adapter.tensors[f"{module}.lora_A"]
        assert a.abs().max() <= 1 / math.sqrt(a.shape[1]) and a.std() > 0.3 / math.sqrt(a.shape[1])
        lam = adapter.tensors[f"{module}.lora_lambda"]
        eye = torch.ones(3, 4) if lambda_format == "diagonal" else torch.eye(4).expand(3, 4, 4)
        assert torch.equal(lam, eye)
        assert torch.equal(adapter.tensors[f"{module}.lora_B"], torch.zeros(3, adapted.specs[module].out_features, 4))
        omega = adapter.tensors[f"{module}.lora_omega"]
        assert omega.shape == (3, 3) and omega.abs().max() <= 1 / math.sqrt(3) and omega.std() > 0
    # B = 0: the new adapter leaves the model's output unchanged, for every task
    bound = adapted.bind(adapter)
    ids = prompts([5])[0][None]
    base = logits(adapted, ids, [(None, 0)])
    assert all(torch.equal(logits(adapted, ids, [(bound, t)]), base) for t in range(3))
    # explicit scaling wins over α/r; seeds differ
    other = MtlLoraAdapter.create("j", adapted.specs, target_modules=["q_proj"], rank=4, tasks=TASKS, seed=1,
                                  lora_alpha=8, scaling=0.25)
    assert other.config_dict()["scaling"] == 0.25
    assert not torch.equal(other.tensors[f"{Q}.lora_A"], adapter.tensors[f"{Q}.lora_A"])


@pytest.mark.parametrize("lambda_format", ["full", "diagonal"])
def test_num_parameters_is_the_spec_formula(lambda_format):
    adapted = AdaptedModel(tiny_model("llama"))
    r, n, tasks = 4, 2, ["a", "b", "c", "d", "e"]
    adapter = MtlLoraAdapter.create("p", adapted.specs, target_modules=["q_proj", "k_proj", "up_proj"], rank=r,
                                    tasks=tasks, num_b=n, lambda_format=lambda_format)
    t = len(tasks)
    core = t * r if lambda_format == "diagonal" else t * r * r
    # spec §2.7: r·d_in + T·r² (T·r if diagonal) + n·r·d_out + T·n per adapted linear
    per_layer = [(32, 32), (32, 16), (32, 64)]  # (d_in, d_out) of q_proj, k_proj, up_proj in tiny Llama
    expected = 2 * sum(r * d_in + core + n * r * d_out + t * n for d_in, d_out in per_layer)
    assert adapter.num_parameters() == expected


def test_bind_is_differentiable_and_dropout_applies_to_x(tmp_path):
    adapted = AdaptedModel(tiny_model("llama"))
    adapter = make_adapter("mtl_lora", adapted, "llama", "g", tmp_path)
    for tensor in adapter.tensors.values():
        tensor.requires_grad_(True)
    bound = adapted.bind(adapter)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    bound.delta(Q, x, None, 1).square().sum().backward()
    for param in ("lora_A", "lora_lambda", "lora_B", "lora_omega"):
        grad = adapter.tensors[f"{Q}.{param}"].grad
        assert grad is not None and grad.abs().sum() > 0, param
    assert adapter.tensors[f"{Q}.lora_lambda"].grad[0].abs().sum() == 0  # task 0's Λ took no part
    # the trainer's dropout acts on x before A, as nn.Dropout(p) does in the released code
    bound.dropout = 0.5
    torch.manual_seed(9)
    expected = torch.nn.functional.dropout(x, 0.5).double() @ paper_delta_weight(adapter, Q, 1).detach().t()
    torch.manual_seed(9)
    got = bound.delta(Q, x, None, 1)
    assert (got.detach() - expected.float()).abs().max() < 1e-5
    bound.dropout = 0.0
    assert (bound.delta(Q, x, None, 1) - got).abs().max() > 1e-3


def saved(tmp_path, **options):
    adapted = AdaptedModel(tiny_model("llama"))
    make_adapter("mtl_lora", adapted, "llama", "s", tmp_path, **options)
    return read_config(tmp_path / "s"), read_tensors(tmp_path / "s")


def test_lambda_or_omega_with_fewer_tasks_than_the_config_is_refused(tmp_path):
    config, tensors = saved(tmp_path)
    for param in ("lora_lambda", "lora_omega"):
        short = dict(tensors, **{f"{Q}.{param}": tensors[f"{Q}.{param}"][:2]})
        with pytest.raises(AdapterFormatError, match=param):
            MtlLoraAdapter.from_files("s", config, short)
    config_d, tensors_d = saved(tmp_path, lambda_format="diagonal")
    with pytest.raises(AdapterFormatError, match="lora_lambda"):  # a full Λ under a diagonal config
        MtlLoraAdapter.from_files("s", config_d, dict(tensors_d, **{f"{Q}.lora_lambda": tensors[f"{Q}.lora_lambda"]}))
    assert MtlLoraAdapter.from_files("s", config, tensors).tasks == TASKS


def test_bad_configs_and_tensors_are_refused(tmp_path):
    config, tensors = saved(tmp_path)
    bad_configs = [  # (error, message part, config)
        (UnsupportedAdapterError, "lambda_format", {**config, "lambda_format": "block"}),
        (UnsupportedAdapterError, "tunable_scaler", {**config, "tunable_scaler": True}),
        (AdapterFormatError, "scaling", {k: v for k, v in config.items() if k != "scaling"}),
        (AdapterFormatError, "temperature", {**config, "temperature": "0.1"}),
        (AdapterFormatError, "temperature", {**config, "temperature": 0.0}),
        (AdapterFormatError, "lora_B", {**config, "num_b": 2}),  # the file holds 3 B matrices
        (AdapterFormatError, "'r'", {**config, "r": 0}),
        (AdapterFormatError, "tasks", {**config, "tasks": ["alpha", 3, "gamma"]}),
        (AdapterFormatError, "mystery", {**config, "mystery": 1}),
        (AdapterFormatError, "target_modules", {**config, "target_modules": ["q_proj"]}),  # v_proj tensors too
    ]
    for error, part, bad in bad_configs:
        with pytest.raises(error, match=part):
            MtlLoraAdapter.from_files("s", bad, tensors)
    with pytest.raises(AdapterFormatError, match="lora_omega"):
        MtlLoraAdapter.from_files("s", config, {k: v for k, v in tensors.items() if k != f"{Q}.lora_omega"})
    with pytest.raises(AdapterFormatError, match="lora_C"):
        MtlLoraAdapter.from_files("s", config, {**tensors, f"{Q}.lora_C": torch.zeros(2)})
    with pytest.raises(AdapterFormatError, match="lora_B"):
        MtlLoraAdapter.from_files("s", config, {**tensors, f"{Q}.lora_B": torch.zeros(3, 32, 5)})
    adapted = AdaptedModel(tiny_model("llama"))
    with pytest.raises(UnsupportedAdapterError, match="lambda_format"):
        MtlLoraAdapter.create("c", adapted.specs, target_modules=["q_proj"], rank=4, tasks=TASKS, lambda_format="block")
    with pytest.raises(UnsupportedAdapterError, match="mystery"):
        MtlLoraAdapter.create("c", adapted.specs, target_modules=["q_proj"], rank=4, tasks=TASKS, mystery=1)


def test_saved_config_is_explicit(tmp_path):
    config, _ = saved(tmp_path, scaling=0.5, temperature=0.8, num_b=2)
    assert config == {
        "adapter_type": "mtl_lora", "tasks": TASKS, "r": 4, "lora_alpha": 8.0, "scaling": 0.5, "num_b": 2,
        "temperature": 0.8, "lambda_format": "full", "target_modules": FAMILY_TARGETS["llama"], "dropout": 0.05,
    }
    adapter = load_adapter(tmp_path / "s")
    randomize(adapter, 1)  # in-place changes reach the next bind: nothing derived is cached on the adapter
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    got = AdaptedModel(tiny_model("llama")).bind(adapter).delta(Q, x, None, 0)
    assert (got - (x.double() @ paper_delta_weight(adapter, Q, 0).t()).float()).abs().max() < 1e-5
