"""The trainer (`loraplex train`): every method learns, saves what the server loads, and reproduces itself.

Tiny 2-layer Llama with the default model's byte-level tokenizer (offline, seeded); a few steps each.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from loraplex.adapters import AdaptedModel, load_adapter
from loraplex.default_model import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, build_tokenizer
from loraplex.trainer import DataError, Example, TrainConfig, greedy_generate, read_examples, train
from loraplex.trainer import cli as train_cli
from loraplex.trainer.data import collate, encode, split_held_out
from loraplex.trainer.methods import resolve_targets
from loraplex.trainer.run import HYBRID_SOURCES_DIR, REPORT_FILE

TOKENIZER = build_tokenizer()
DATA = [
    Example("alpha", "ab=", "xyz"), Example("beta", "ab=", "QQ"),
    Example("alpha", "cd=", "kk"), Example("beta", "cd=", "pp"),
]
SINGLE = ("lora", "gift", "loratrf")


def tiny(seed: int = 0, peak: float = 20.0) -> torch.nn.Module:
    """A 2-layer Llama for the byte tokenizer; the head is scaled so that greedy choices are not near-ties."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(peak)
    return model


def run(method: str, out, steps: int = 12, lr: float = 1e-2, data=DATA, eval_data=None, **kw):
    cfg = TrainConfig(method=method, out=str(out), lr=lr, max_steps=steps, batch_size=4, eval_fraction=0.0,
                      progress=False, rank=4, **kw)
    return train(cfg, examples=data, eval_examples=eval_data, model=tiny(), tokenizer=TOKENIZER)


def logits_through(adapted: AdaptedModel, adapters, rows) -> torch.Tensor:
    """Logits of `rows` (Encoded), each through (adapter, task index) of its task."""
    bound = {name: adapted.bind(a) for name, a in adapters.items()}
    assignments = []
    for r in rows:
        for name, a in adapters.items():
            if r.example.task in (a.tasks if a.multi_task else [a.name]):
                assignments.append((bound[name], a.task_index(r.example.task)))
    batch = collate(rows, PAD_ID)
    with torch.no_grad(), adapted.batch(assignments, rows_per_sequence=batch.input_ids.shape[1]):
        return adapted.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


@pytest.mark.parametrize("method", ["lora", "mtl_lora", "r_lora", "gift", "loratrf", "hybrid"])
def test_method_trains_saves_and_reloads_to_the_same_logits(method, tmp_path):
    result = run(method, tmp_path, eval_data=DATA)
    for name, losses in result.losses.items():  # hybrid: its stage-1 sources and the fusion
        assert sum(losses[-3:]) / 3 < losses[0] * 0.9, (name, losses)
    expected = ["alpha", "beta"] if method in SINGLE else [method]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")) == expected
    loaded = {name: load_adapter(tmp_path / name) for name in expected}
    for name, adapter in loaded.items():
        assert adapter.adapter_type == method
        if adapter.multi_task:
            assert adapter.tasks == ["alpha", "beta"]  # task ids resolve on a server
    rows, _ = encode(DATA, TOKENIZER, 64)
    # both on a fresh CPU base: the trained adapters (on the training device, a GPU where there is one) and the
    # reloaded files give the same logits
    own = logits_through(AdaptedModel(tiny()), result.adapters, rows)
    fresh = logits_through(AdaptedModel(tiny()), loaded, rows)
    assert torch.allclose(own, fresh, atol=1e-6, rtol=0), (own - fresh).abs().max()
    assert set(result.evaluation) == {"alpha", "beta"}
    report = json.loads((tmp_path / REPORT_FILE).read_text())
    assert report["method"] == method and set(report["evaluation"]) == {"alpha", "beta"}


def test_round_trip_train_load_generate_reproduces_a_memorised_completion(tmp_path):
    data = [Example("echo", "hello=", "world"), Example("echo", "abc=", "zz")]
    result = run("lora", tmp_path, steps=40, data=data, eval_data=data)
    assert result.evaluation["echo"].exact_match == 1.0
    adapted = AdaptedModel(tiny())
    bound = adapted.bind(load_adapter(tmp_path / "echo"))
    prompts = [TOKENIZER("hello=")["input_ids"], TOKENIZER("abc=")["input_ids"]]
    out = greedy_generate(adapted, prompts, 10, {EOS_ID}, [(bound, 0), (bound, 0)], pad_id=PAD_ID)
    assert [TOKENIZER.decode(ids) for ids in out] == ["world", "zz"]
    base = greedy_generate(adapted, prompts[:1], 10, {EOS_ID}, pad_id=PAD_ID)
    assert TOKENIZER.decode(base[0]) != "world"  # the adapter, not the base, knows it


def test_methods_follow_their_papers_frozen_parts_stay_frozen(tmp_path):
    r = run("r_lora", tmp_path / "r", steps=4)
    adapter = r.adapters["r_lora"]
    from loraplex.adapters.r_lora import RLoraAdapter

    specs = AdaptedModel(tiny()).specs
    fresh = RLoraAdapter.create("r_lora", specs, target_modules=resolve_targets("all-linear", specs), rank=4,
                                tasks=["alpha", "beta"], seed=0)
    for key, value in adapter.tensors.items():
        same = torch.equal(value.detach().cpu(), fresh.tensors[key])
        assert same == key.endswith(("offset_A", "offset_B")), key  # the offset is fixed, the rest trains
    h = run("hybrid", tmp_path / "h", steps=4)
    src = load_adapter(tmp_path / "h" / HYBRID_SOURCES_DIR / "alpha")
    fused = h.adapters["hybrid"]
    module = sorted(src.factors)[0]
    assert torch.equal(fused.tensors[f"sources.0.{module}.lora_A"].detach().cpu(), src.factors[module][0])


def test_single_task_adapters_train_independently_in_one_batch(tmp_path):
    """Training alpha and beta together gives alpha the adapter it gets alone (no dropout: no shared RNG)."""
    together = run("lora", tmp_path / "both", steps=6, dropout=0.0)
    alone = run("lora", tmp_path / "one", steps=6, dropout=0.0, data=[e for e in DATA if e.task == "alpha"])
    for key, value in together.adapters["alpha"].tensors.items():
        assert torch.allclose(value, alone.adapters["alpha"].tensors[key], atol=1e-5), key


def test_same_seed_same_adapter_other_seed_other_adapter(tmp_path):
    def weights(seed, name):
        run("mtl_lora", tmp_path / name, steps=5, seed=seed, dropout=0.1)
        return load_adapter(tmp_path / name / "mtl_lora").tensors

    a, b, c = weights(3, "a"), weights(3, "b"), weights(4, "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("line, named", [
    ("{not json", "not valid JSON"),
    ('["a", "b"]', "expected a JSON object"),
    ('{"task": "t", "prompt": "p"}', "'completion' is missing"),
    ('{"task": "t", "prompt": 3, "completion": "c"}', "'prompt' must be a string"),
    ('{"task": "a b", "prompt": "p", "completion": "c"}', "invalid task id"),
    ('{"task": "t", "prompt": "p", "completion": ""}', "'completion' is empty"),
])
def test_bad_lines_are_refused_naming_the_line(tmp_path, line, named):
    path = tmp_path / "train.jsonl"
    good = json.dumps({"task": "t", "prompt": "p", "completion": "c"})
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(DataError, match=named) as info:
        read_examples(path)
    assert "train.jsonl line 3" in str(info.value)


def test_held_out_split_is_per_task_and_disjoint():
    rows = [Example(t, f"{t}{i}=", "x") for t in ("a", "b") for i in range(20)] + [Example("c", "c=", "x")]
    train_rows, held = split_held_out(rows, 0.25, seed=1)
    assert sorted((t, sum(e.task == t for e in held)) for t in "abc") == [("a", 5), ("b", 5), ("c", 0)]
    assert not {id(e) for e in train_rows} & {id(e) for e in held}
    assert split_held_out(rows, 0.25, seed=1)[1] == held


def test_left_padded_greedy_generation_matches_one_at_a_time():
    adapted = AdaptedModel(tiny(peak=5.0))
    prompts = [TOKENIZER(p)["input_ids"] for p in ("a=", "hello there=", "xyz=")]
    together = greedy_generate(adapted, prompts, 6, {EOS_ID}, pad_id=PAD_ID)
    assert together == [greedy_generate(adapted, [p], 6, {EOS_ID}, pad_id=PAD_ID)[0] for p in prompts]


def test_cli_trains_a_directory_the_server_serves_and_reports_bad_data(tmp_path, capsys):
    from loraplex.server.manager import AdapterManager

    base = tmp_path / "base"
    tiny().save_pretrained(base)
    TOKENIZER.save_pretrained(base)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(vars(e) | {"source": None}) + "\n" for e in DATA * 3))
    common = ["--data", str(data), "--base-model", str(base), "--max-steps", "3", "--batch-size", "4",
              "--rank", "2", "--no-progress", "--eval-fraction", "0.2"]
    loras = tmp_path / "loras"
    assert train_cli.main(["train", "--method", "lora", "--out", str(loras), *common]) == 0
    fused = tmp_path / "fused"
    assert train_cli.main(["train", "--method", "hybrid", "--out", str(fused), "--sources", str(loras),
                           "--name", "fusion", "--attention-dim", "4", *common]) == 0
    assert "alpha" in capsys.readouterr().out  # the held-out table
    for directory, adapters in ((loras, {"alpha": "alpha", "beta": "beta"}),
                                (fused, {"alpha": "fusion", "fusion/beta": "fusion"})):
        with AdapterManager(AdaptedModel(tiny()), directory) as manager:
            manager.load_all(strict=True)
            for task_id, adapter in adapters.items():
                assert manager.resolve(task_id).adapter == adapter
    assert json.loads((fused / "fusion" / "adapter_config.json").read_text())["sources"][0]["name"] == "alpha"
    data.write_text(json.dumps({"task": "t", "prompt": "p", "completion": "c"}) + "\n{oops\n")
    assert train_cli.main(["train", "--method", "lora", "--out", str(tmp_path / "x"), *common]) == 2
    assert "train.jsonl line 2" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_process_trains_on_the_gpu_then_on_the_cpu_and_back():
    """Accelerate's process-wide state must not pin every later training run to the first run's device."""
    from loraplex.trainer.run import make_accelerator

    assert make_accelerator("cuda").device.type == "cuda"
    assert make_accelerator("cpu").device.type == "cpu"
    assert make_accelerator("auto").device.type == "cuda"
