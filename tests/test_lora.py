"""LoRA loading: PEFT features we do not serve are refused by name; every supported architecture batches."""

from __future__ import annotations

import json

import pytest
import torch
from families import make_adapter
from tiny import ARCHITECTURES, prompts, right_padded, tiny_model

from loraplex.adapters import AdaptedModel, AdapterFormatError, UnsupportedAdapterError, load_adapter
from loraplex.adapters.io import CONFIG_FILE, WEIGHTS_FILE
from loraplex.adapters.lora import tensor_key
from safetensors.torch import load_file, save_file

MODULE = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def lora_dir(tmp_path):
    adapted = AdaptedModel(tiny_model("llama"))
    make_adapter("lora", adapted, "llama", "ok", tmp_path)
    return tmp_path / "ok"


def edit(path, config_changes=None, add_tensors=None, drop=None):
    config = json.loads((path / CONFIG_FILE).read_text())
    config.update(config_changes or {})
    (path / CONFIG_FILE).write_text(json.dumps(config))
    tensors = load_file(str(path / WEIGHTS_FILE))
    tensors.update(add_tensors or {})
    for key in drop or ():
        tensors.pop(key)
    save_file(tensors, str(path / WEIGHTS_FILE))


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias"),
        ({"bias": "lora_only"}, "bias"),
        ({"lora_bias": True}, "lora_bias"),
        ({"layer_replication": [[0, 1]]}, "layer_replication"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
    ],
)
def test_unsupported_peft_options_are_refused_by_name(lora_dir, changes, named):
    edit(lora_dir, changes)
    with pytest.raises(UnsupportedAdapterError, match=named):
        load_adapter(lora_dir)


@pytest.mark.parametrize(
    "tensor, named",
    [
        ("base_model.model.model.embed_tokens.lora_embedding_A", "embedding"),
        (f"base_model.model.{MODULE}.lora_magnitude_vector", "DoRA"),
        (f"base_model.model.{MODULE}.bias", "bias"),
    ],
)
def test_unsupported_tensors_are_refused_by_name(lora_dir, tensor, named):
    edit(lora_dir, add_tensors={tensor: torch.zeros(4)})
    with pytest.raises(UnsupportedAdapterError, match=named):
        load_adapter(lora_dir)


def test_other_peft_types_are_refused(lora_dir):
    config = json.loads((lora_dir / CONFIG_FILE).read_text())
    del config["adapter_type"]
    config["peft_type"] = "IA3"
    (lora_dir / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(UnsupportedAdapterError, match="IA3"):
        load_adapter(lora_dir)


@pytest.mark.parametrize(
    "changes, named",
    [
        (dict(drop=[tensor_key(MODULE, "B")]), "not both"),
        (dict(config_changes={"r": 8}), "rank"),
        (dict(add_tensors={"something.else": torch.zeros(2)}), "something.else"),
        (dict(add_tensors={tensor_key(MODULE, "A"): torch.zeros(3, 32)}), "lora_A"),
    ],
)
def test_structural_faults_are_refused(lora_dir, changes, named):
    edit(lora_dir, **changes)
    with pytest.raises(AdapterFormatError, match=named):
        load_adapter(lora_dir)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_serves_a_mixed_batch(arch, tmp_path):
    adapted = AdaptedModel(tiny_model(arch))
    bound = [adapted.bind(make_adapter("lora", adapted, arch, f"a{i}", tmp_path, seed=i)) for i in range(2)]
    plan = [(bound[0], 0), (None, 0), (bound[1], 0), (bound[0], 0)]
    seqs = prompts([6, 4, 8, 5], seed=3)
    ids = right_padded(seqs)
    with torch.no_grad(), adapted.batch(plan, ids.shape[1]):
        batch = adapted.model(ids).logits
    for i, (seq, assignment) in enumerate(zip(seqs, plan)):
        with torch.no_grad(), adapted.batch([assignment], len(seq)):
            alone = adapted.model(seq[None]).logits[0]
        assert (batch[i, : len(seq)] - alone).abs().max() <= 1e-5
    # fused c_attn, qkv_proj, gate_up_proj, query_key_value; two-matrix MLPs (GPT-NeoX, StarCoder2, Phi)
    expected_layers = 2 * {"gpt2": 4, "phi3": 4, "gpt_neox": 4, "starcoder2": 6, "phi": 6}.get(arch, 7)
    assert len(adapted.layers) == expected_layers


def test_non_finite_weights_are_refused(lora_dir):
    bad = torch.zeros(4, 32)
    bad[1, 3] = float("nan")
    edit(lora_dir, add_tensors={tensor_key(MODULE, "A"): bad})
    with pytest.raises(AdapterFormatError, match="NaN"):
        load_adapter(lora_dir)
