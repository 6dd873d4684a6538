"""`loraplex demo`: the main job end to end on the embedded default model, in one command.

1. Makes four synthetic character tasks (`loraplex.demo_tasks`): `reverse` and `sort` go to ONE multi-task
   MTL-LoRA adapter, `uppercase` and `shift` to one plain LoRA adapter each.
2. Trains them with the trainer (progress bars), on the embedded default model.
3. Starts the gRPC server on free local ports with those adapters.
4. Sends every held-out prompt concurrently through the client SDK, each to its own task id, and again to
   a wrong task id (routing must matter), then prints exact match per task, throughput and the metrics URL.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MTL_TASKS = ("reverse", "sort")  # served by one mtl_lora adapter named "strings"
LORA_TASKS = ("uppercase", "shift")  # one lora adapter each
WRONG_TASK = {"reverse": "uppercase", "sort": "shift", "uppercase": "reverse", "shift": "sort"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="train demo adapters, serve them, query them (about 2-4 minutes)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="keep data and adapters here (default: a temporary directory, "
                   "removed at the end)")
    p.add_argument("--eval-per-task", type=int, default=50, help="held-out prompts sent per task (default 50)")
    p.add_argument("--train-per-task", type=int, default=400, help="training rows per task (default 400)")
    p.add_argument("--steps", type=int, default=0, help="training steps per adapter (default: 300 for the "
                   "two-task mtl_lora adapter, 100 for each lora)")
    p.add_argument("--concurrency", type=int, default=32, help="client calls in flight at once (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the training and the sampling order")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="loraplex-demo-"))
    try:
        return _demo(args, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _demo(args: argparse.Namespace, workdir: Path) -> int:
    import torch

    from loraplex.demo_tasks import make_split, write_jsonl
    from loraplex.server.app import BackgroundServer, ServeOptions
    from loraplex.trainer import TrainConfig, train
    from loraplex_client import Client

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"[1/4] data: tasks {', '.join(MTL_TASKS + LORA_TASKS)} under {workdir}", flush=True)
    train_rows, held_out = make_split(MTL_TASKS + LORA_TASKS, args.train_per_task, args.eval_per_task, args.seed)
    for name, tasks in (("mtl", MTL_TASKS), ("lora", LORA_TASKS)):
        write_jsonl(workdir / f"train_{name}.jsonl", [r for r in train_rows if r["task"] in tasks])
        write_jsonl(workdir / f"eval_{name}.jsonl", [r for r in held_out if r["task"] in tasks])

    adapters = workdir / "adapters"
    print("[2/4] training: one mtl_lora adapter 'strings' (reverse, sort) and one lora per task "
          "(uppercase, shift)", flush=True)
    # steps: the multi-task adapter learns two operations through one shared A, so it gets more of them
    for method, name, data, steps in (("mtl_lora", "strings", "mtl", 300), ("lora", None, "lora", 100)):
        train(TrainConfig(method=method, name=name, data=str(workdir / f"train_{data}.jsonl"),
                          eval_data=str(workdir / f"eval_{data}.jsonl"), out=str(adapters), seed=args.seed,
                          max_steps=args.steps or steps, device="cpu"))

    print("[3/4] serving the adapters on the embedded default model", flush=True)
    options = ServeOptions(adapter_dir=str(adapters), port=0, metrics_port=0, device="cpu", threads=args.threads)
    server = BackgroundServer(options).start()
    try:
        with Client(server.address, timeout=120) as client:
            tasks = {t.task_id: t for t in client.list_tasks()}
            print("      tasks served: " + ", ".join(f"{t} ({tasks[t].adapter_type} '{tasks[t].adapter}')"
                                                    for t in MTL_TASKS + LORA_TASKS), flush=True)
            print(f"[4/4] {2 * len(held_out)} requests through the client SDK, {args.concurrency} at a time",
                  flush=True)
            report = _query(client, held_out, args.concurrency)
        metrics_url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
        _print_report(report, metrics_url)
    finally:
        server.stop(grace=5.0)
    print(f"\ndone in {time.perf_counter() - started:.0f} s", flush=True)
    failing = [t for t, r in report["tasks"].items() if r["exact"] < 0.9 or r["wrong_exact"] >= r["exact"]]
    return 1 if failing else 0


def _query(client, rows: list[dict], concurrency: int) -> dict:
    """Each held-out prompt to its own task id and to a wrong one, all concurrently."""

    def ask(row: dict, task_id: str):
        limit = len(row["completion"]) + 4
        return client.generate(task_id, row["prompt"], max_new_tokens=limit, temperature=0.0)

    jobs = [(row, row["task"]) for row in rows] + [(row, WRONG_TASK[row["task"]]) for row in rows]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda job: ask(*job), jobs))
    seconds = time.perf_counter() - t0
    per_task: dict[str, dict] = {}
    for (row, task_id), result in zip(jobs, results):
        stats = per_task.setdefault(row["task"], {"n": 0, "right": 0, "wrong": 0, "example": None, "adapter": ""})
        hit = result.text.strip() == row["completion"]
        if task_id == row["task"]:
            stats["n"] += 1
            stats["right"] += hit
            stats["adapter"] = result.adapter
            stats["example"] = stats["example"] or (row["prompt"], result.text.strip())
        else:
            stats["wrong"] += hit
    tokens = sum(r.generated_tokens for r in results)
    for stats in per_task.values():
        stats["exact"] = stats["right"] / stats["n"]
        stats["wrong_exact"] = stats["wrong"] / stats["n"]
    return {"tasks": per_task, "requests": len(jobs), "tokens": tokens, "seconds": seconds}


def _print_report(report: dict, metrics_url: str) -> None:
    print("\n| task | adapter | exact match | sent to a wrong task id | example |")
    print("|---|---|---|---|---|")
    for task in MTL_TASKS + LORA_TASKS:
        r = report["tasks"][task]
        prompt, answer = r["example"]
        print(f"| {task} | {r['adapter']} | {r['exact']:.0%} | {r['wrong_exact']:.0%} | {prompt}{answer} |")
    print(f"\n{report['requests']} requests, {report['tokens']} generated tokens in {report['seconds']:.1f} s: "
          f"{report['tokens'] / report['seconds']:.0f} tokens/s, {report['requests'] / report['seconds']:.1f} "
          "requests/s")
    print(f"metrics (while serving): {metrics_url}; the server logs the same address in its ready line")
