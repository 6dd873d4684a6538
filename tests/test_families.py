"""The properties every adapter family must have, checked for each registered `adapter_type`."""

from __future__ import annotations

import json

import pytest
import torch
from families import TASKS, make_adapter
from tiny import prompts, right_padded, tiny_model

from loraplex.adapters import (
    AdaptedModel,
    AdapterError,
    AdapterFormatError,
    IncompatibleAdapterError,
    UnknownTaskError,
    UnsupportedAdapterError,
    adapter_class,
    adapter_types,
    load_adapter,
)
from loraplex.adapters.io import CONFIG_FILE, WEIGHTS_FILE

FAMILIES = adapter_types()


def logits(adapted: AdaptedModel, ids: torch.Tensor, assignments) -> torch.Tensor:
    with torch.no_grad(), adapted.batch(assignments, ids.shape[1]):
        return adapted.model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_batch_equals_each_request_alone(family, arch, tmp_path):
    adapted = AdaptedModel(tiny_model(arch))
    bound = [adapted.bind(make_adapter(family, adapted, arch, f"{family}{i}", tmp_path, seed=i)) for i in range(2)]
    n_tasks = len(TASKS) if adapter_class(family).multi_task else 1
    plan = [(bound[0], 0), (bound[1], 1 % n_tasks), (None, 0), (bound[0], 2 % n_tasks), (bound[1], 0), (bound[0], 0)]
    seqs = prompts([5, 9, 7, 3, 8, 6], seed=11)
    batch = logits(adapted, right_padded(seqs), plan)
    base = logits(adapted, seqs[2][None], [(None, 0)])[0]
    for i, (seq, assignment) in enumerate(zip(seqs, plan)):
        alone = logits(adapted, seq[None], [assignment])[0]
        assert (batch[i, : len(seq)] - alone).abs().max() <= 1e-5, (family, i)
    # the adapters really act: rows served through an adapter differ from the base model
    assert (logits(adapted, seqs[2][None], [plan[0]])[0] - base).abs().max() > 1e-3
    if n_tasks > 1 and family != "r_lora":  # the task picks the behaviour (R-LoRA routes by content instead)
        other = logits(adapted, seqs[2][None], [(bound[0], 1)])[0]
        assert (logits(adapted, seqs[2][None], [(bound[0], 0)])[0] - other).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_is_bit_exact(family, tmp_path):
    adapted = AdaptedModel(tiny_model("llama"))
    first = make_adapter(family, adapted, "llama", "a", tmp_path, seed=7)
    first.save(tmp_path / "again")
    second = load_adapter(tmp_path / "again", name="a")
    assert first.config_dict() == second.config_dict()
    assert first.tensors.keys() == second.tensors.keys()
    for key in first.tensors:
        assert first.tensors[key].dtype == second.tensors[key].dtype
        assert torch.equal(first.tensors[key], second.tensors[key]), key
    assert first.num_parameters() == second.num_parameters() > 0
    assert first.rank == second.rank == 4
    ids = prompts([6])[0][None]
    a, b = adapted.bind(first), adapted.bind(second)
    assert torch.equal(logits(adapted, ids, [(a, 0)]), logits(adapted, ids, [(b, 0)]))


@pytest.mark.parametrize("family", [f for f in FAMILIES if adapter_class(f).mergeable])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_equals_unmerged_and_unmerge_restores_base(family, arch, tmp_path):
    adapted = AdaptedModel(tiny_model(arch))
    bound = adapted.bind(make_adapter(family, adapted, arch, "m", tmp_path, seed=3))
    before = {k: v.clone() for k, v in adapted.model.state_dict().items()}
    ids = prompts([4, 4], seed=2)
    ids = torch.stack(ids)
    task = len(bound.adapter.tasks) - 1 if bound.adapter.multi_task else 0
    base = logits(adapted, ids, [(None, 0)] * 2)
    unmerged = logits(adapted, ids, [(bound, task)] * 2)
    adapted.merge(bound, task)
    merged = logits(adapted, ids, [(bound, task)] * 2)
    assert (merged - unmerged).abs().max() <= 1e-5
    with pytest.raises(RuntimeError):  # a merged model serves only its own adapter
        logits(adapted, ids, [(bound, task), (None, 0)])
    adapted.unmerge()
    assert torch.equal(logits(adapted, ids, [(None, 0)] * 2), base)
    after = adapted.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family", [f for f in FAMILIES if not adapter_class(f).mergeable])
def test_non_linear_families_refuse_to_merge(family, tmp_path):
    adapted = AdaptedModel(tiny_model("llama"))
    bound = adapted.bind(make_adapter(family, adapted, "llama", "n", tmp_path))
    with pytest.raises(UnsupportedAdapterError):
        adapted.merge(bound, 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_adapters_are_refused_and_change_nothing(family, tmp_path):
    adapted = AdaptedModel(tiny_model("llama"))
    good = adapted.bind(make_adapter(family, adapted, "llama", "good", tmp_path, seed=1))
    ids = prompts([5])[0][None]
    reference = logits(adapted, ids, [(good, 0)])
    make_adapter(family, adapted, "llama", "bad", tmp_path, seed=2)
    bad = tmp_path / "bad"
    config = json.loads((bad / CONFIG_FILE).read_text())
    weights = (bad / WEIGHTS_FILE).read_bytes()

    def refused(error_type, message_part):
        with pytest.raises(error_type) as info:
            load_adapter(bad)
        assert message_part in str(info.value)

    (bad / WEIGHTS_FILE).write_bytes(weights[: len(weights) // 2])  # truncated
    refused(AdapterFormatError, "corrupt")
    (bad / WEIGHTS_FILE).write_bytes(b"\x00" * 8 + b"garbage")
    refused(AdapterFormatError, "corrupt")
    (bad / WEIGHTS_FILE).unlink()
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04pickled")
    refused(AdapterFormatError, "pickled")
    (bad / "adapter_model.bin").unlink()
    (bad / WEIGHTS_FILE).write_bytes(weights)
    (bad / CONFIG_FILE).write_text(json.dumps({**config, "adapter_type": "no_such_type"}))
    refused(UnsupportedAdapterError, "no_such_type")
    (bad / CONFIG_FILE).write_text("{not json")
    refused(AdapterFormatError, "JSON")
    if adapter_class(family).multi_task:
        (bad / CONFIG_FILE).write_text(json.dumps({k: v for k, v in config.items() if k != "tasks"}))
        refused(AdapterError, "task")
        if family != "r_lora":  # R-LoRA routes by content: no tensor is tied to a task
            (bad / CONFIG_FILE).write_text(json.dumps({**config, "tasks": config["tasks"] + ["extra"]}))
            refused(AdapterFormatError, "")
    (bad / CONFIG_FILE).write_text(json.dumps(config))
    # shapes that do not fit: bind to a wider model of the same architecture
    wide = tiny_model("llama")
    other = AdaptedModel(type(wide)(type(wide.config)(**{**wide.config.to_dict(), "hidden_size": 48})))
    with pytest.raises(IncompatibleAdapterError):
        other.bind(load_adapter(bad))
    # and nothing else changed: the good adapter still serves the same logits
    assert torch.equal(logits(adapted, ids, [(good, 0)]), reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_unknown_task_is_refused(family, tmp_path):
    adapted = AdaptedModel(tiny_model("llama"))
    bound = adapted.bind(make_adapter(family, adapted, "llama", "u", tmp_path))
    with pytest.raises(UnknownTaskError):
        bound.adapter.task_index("no-such-task")
    with pytest.raises(UnknownTaskError):
        logits(adapted, prompts([3])[0][None], [(bound, 99)])
    assert bound.adapter.task_ids()[0] == ("u" if not bound.adapter.multi_task else TASKS[0])
