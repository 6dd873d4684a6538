#!/usr/bin/env python3
"""Train the embedded default base model (loraplex/default_model/) from scratch, offline, on a CPU.

    python scripts/train_default_model.py                 # writes loraplex/default_model/
    python scripts/train_default_model.py --out /tmp/dm --steps 500 --min-accuracy 0   # a quick, weaker one

The model is the small character-level Llama of `loraplex.default_model` (architecture and byte-level
tokenizer are defined there). It is pretrained on *instructed* string operations, `reverse spam=maps`,
for every task of `loraplex.demo_tasks` (plus `copy`, a skill only the base knows), and on untagged
prompts, `spam=`, which it echoes. The demo's prompts are untagged: the base model does not know which
operation is asked (it echoes), and a task adapter learns to apply its own. The loss is taken on the
completion (and the final `</s>`).

Deterministic for a given --seed and thread count on the same torch build (about 10 minutes on 2 CPU
cores). Prints the greedy exact match of every skill on fresh strings at the end, and refuses to write a
model below --min-accuracy.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from loraplex.default_model import DEFAULT_MODEL_DIR, EOS_ID, PAD_ID, build_config, build_tokenizer
from loraplex.demo_tasks import BASE_ONLY_TASKS, TASKS, instructed_prompt_for, prompt_for, random_strings

SKILLS = {**TASKS, **BASE_ONLY_TASKS}
UNTAGGED = "untagged"  # a prompt that names no task (`spam=`): the base model echoes the string


def prompt_of(skill: str, text: str) -> str:
    return prompt_for(text) if skill == UNTAGGED else instructed_prompt_for(skill, text)


def answer_of(skill: str, text: str) -> str:
    return text if skill == UNTAGGED else SKILLS[skill](text)


def make_batch(tokenizer, rng: random.Random, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) of `size` random instructed examples, right-padded; labels
    hold the next token on completion positions and -100 elsewhere."""
    names = list(SKILLS) + [UNTAGGED]
    rows = []
    for text in random_strings(size, rng):
        skill = rng.choice(names)
        prompt = tokenizer(prompt_of(skill, text))["input_ids"]
        completion = tokenizer(answer_of(skill, text), add_special_tokens=False)["input_ids"] + [EOS_ID]
        rows.append((prompt, completion))
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((size, width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((size, width), dtype=torch.long)
    labels = torch.full((size, width), -100, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        seq = p + c
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p) - 1: len(seq) - 1] = torch.tensor(c)
    return ids, mask, labels


def evaluate(model, tokenizer, per_skill: int, seed: int) -> dict[str, float]:
    """Greedy exact match of every skill (and of the untagged echo) on fresh random strings."""
    from loraplex.adapters import AdaptedModel
    from loraplex.trainer.generate import greedy_generate

    adapted = AdaptedModel(copy.deepcopy(model).eval())
    rng = random.Random(seed)
    scores = {}
    for skill in [*SKILLS, UNTAGGED]:
        texts = random_strings(per_skill, rng)
        prompts = [tokenizer(prompt_of(skill, t))["input_ids"] for t in texts]
        out = greedy_generate(adapted, prompts, 12, {EOS_ID}, pad_id=PAD_ID)
        hits = sum(tokenizer.decode(ids) == answer_of(skill, t) for ids, t in zip(out, texts))
        scores[skill] = hits / per_skill
    return scores


def _portable_tokenizer_config(out: Path) -> None:
    """Name the tokenizer class that transformers 4 and 5 both know (5 writes its own backend name)."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_MODEL_DIR), help="checkpoint directory (default: the package's)")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (results depend on it)")
    parser.add_argument("--eval-per-skill", type=int, default=300)
    parser.add_argument("--min-accuracy", type=float, default=0.97, help="refuse to save below this exact match")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the saved weights")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    model = AutoModelForCausalLM.from_config(build_config(), dtype=torch.float32)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) * 0.95 + 0.05

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    print(f"training {params:,} parameters for {args.steps} steps of {args.batch_size}", flush=True)
    start, ema = time.perf_counter(), None
    for step in range(args.steps):
        ids, mask, labels = make_batch(tokenizer, rng, args.batch_size)
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            print(f"step {step + 1:5d}  loss {ema:.4f}  {time.perf_counter() - start:6.1f}s", flush=True)
    model.eval()
    scores = evaluate(model, tokenizer, args.eval_per_skill, args.seed + 1)
    print("exact match: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()), flush=True)
    worst = min(scores.values())
    if worst < args.min_accuracy:
        print(f"not saved: the weakest skill reaches {worst:.3f} < --min-accuracy {args.min_accuracy}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, args.dtype))
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _portable_tokenizer_config(out)
    (out / "TRAINING.json").write_text(json.dumps({
        "script": "scripts/train_default_model.py", "args": vars(args) | {"out": None}, "parameters": params,
        "exact_match": scores, "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }, indent=2) + "\n")
    print(f"saved to {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
