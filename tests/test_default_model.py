"""The embedded default model: complete, small, loads as `serve` loads it, knows its skills, and a task
adapter trained on it learns a demo task in seconds. Also the demo task generator and the training script."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from loraplex.adapters import AdaptedModel
from loraplex.default_model import (
    ARCHITECTURE, BOS_ID, EOS_ID, PAD_ID, build_tokenizer, default_model_path, load_default_model,
)
from loraplex.demo_tasks import TASKS, instructed_prompt_for, make_split, prompt_for, random_strings
from loraplex.trainer import Example, TrainConfig, greedy_generate, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base():
    model, tokenizer = load_default_model()
    return AdaptedModel(model), tokenizer


def exact_match(adapted, tokenizer, prompts, answers, assignment=None) -> float:
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    out = greedy_generate(adapted, ids, 12, {EOS_ID}, [assignment or (None, 0)] * len(ids), pad_id=PAD_ID)
    return sum(tokenizer.decode(o) == a for o, a in zip(out, answers)) / len(answers)


def test_checkpoint_is_small_complete_and_loads_as_serve_loads_it():
    from loraplex.server.loader import load_base

    path = default_model_path()
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    assert size < 4 * 2**20, size
    model, tokenizer = load_base(str(path), device="cpu", dtype="float32")
    assert model.config.model_type == "llama"
    config = model.config.to_dict()
    assert all(config[k] == v for k, v in ARCHITECTURE.items() if k != "rope_theta")
    for text in ["reverse spam=", "héllo wörld 🙂 \t\n", ""]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == BOS_ID and ids == build_tokenizer()(text)["input_ids"]  # shipped == built in code
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (EOS_ID, PAD_ID)


def test_base_knows_the_skills_when_named_but_not_which_demo_task(base):
    adapted, tokenizer = base
    texts = random_strings(24, random.Random(123))
    for task, fn in TASKS.items():
        assert exact_match(adapted, tokenizer, [instructed_prompt_for(task, t) for t in texts],
                           [fn(t) for t in texts]) >= 0.9, task
    plain = [prompt_for(t) for t in texts]
    assert exact_match(adapted, tokenizer, plain, texts) >= 0.9  # no task named: it echoes
    # one demo prompt has a different answer per task, so the base alone cannot do them all
    alone = {task: exact_match(adapted, tokenizer, plain, [fn(t) for t in texts]) for task, fn in TASKS.items()}
    assert sum(alone.values()) < 0.5, alone


def test_a_lora_adapter_learns_demo_tasks_on_the_default_model_in_seconds(tmp_path):
    train_rows, held_out = make_split(["reverse", "shift"], train_per_task=600, eval_per_task=40, seed=5)
    as_examples = lambda rows: [Example(r["task"], r["prompt"], r["completion"]) for r in rows]  # noqa: E731
    model, tokenizer = load_default_model()
    result = train(TrainConfig(method="lora", out=str(tmp_path), max_steps=120, batch_size=16, lr=5e-3,
                               progress=False), examples=as_examples(train_rows),
                   eval_examples=as_examples(held_out), model=model, tokenizer=tokenizer)
    for task in ("reverse", "shift"):
        assert result.evaluation[task].exact_match >= 0.9, result.evaluation[task]
    # the other task's adapter does the other task: measurably worse on this one
    adapted = result.adapted
    rows = [r for r in held_out if r["task"] == "reverse"]
    wrong = (adapted.bind(result.adapters["shift"]), 0)
    assert exact_match(adapted, tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows], wrong) < 0.2


def test_demo_tasks_are_what_they_say_and_splits_are_disjoint(tmp_path):
    assert [TASKS[t]("spamz") for t in ("reverse", "uppercase", "sort", "shift")] == ["zmaps", "SPAMZ", "ampsz", "tqbna"]
    train_rows, held_out = make_split(train_per_task=50, eval_per_task=10, seed=3)
    assert make_split(train_per_task=50, eval_per_task=10, seed=3) == (train_rows, held_out)
    inputs = lambda rows: {r["prompt"] for r in rows}  # noqa: E731
    assert not inputs(train_rows) & inputs(held_out)
    assert {r["task"] for r in held_out} == set(TASKS) and len(held_out) == 40
    from loraplex.demo_tasks import main

    assert main(["--out", str(tmp_path), "--tasks", "sort,shift", "--train-per-task", "5", "--eval-per-task", "2"]) == 0
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    assert len(lines) == 10 and {json.loads(x)["task"] for x in lines} == {"sort", "shift"}


def test_training_script_writes_a_loadable_checkpoint_and_refuses_a_weak_one(tmp_path):
    spec = importlib.util.spec_from_file_location("train_default_model", ROOT / "scripts" / "train_default_model.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    try:
        args = ["--steps", "2", "--batch-size", "4", "--eval-per-skill", "2", "--threads", str(threads)]
        assert script.main(["--out", str(tmp_path / "weak"), "--min-accuracy", "0.99", *args]) == 1
        assert not (tmp_path / "weak").exists()
        assert script.main(["--out", str(tmp_path / "ok"), "--min-accuracy", "0", *args]) == 0
    finally:
        torch.set_num_threads(threads)
    from loraplex.server.loader import load_base

    model, tokenizer = load_base(str(tmp_path / "ok"), device="cpu", dtype="float32")
    assert model.config.vocab_size == len(tokenizer)
    assert json.loads((tmp_path / "ok" / "TRAINING.json").read_text())["args"]["steps"] == 2
