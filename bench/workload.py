"""Workload W of BENCHMARK.md, run in-process on the engine and on the peers, side by side in one run.

usage: python bench/workload.py [--fixture DIR] [--preset tiny|smol135|llama1b] [--rank 16]
                                [--scenarios base,a1,a8,a32,zipf1000] [--peers peft,hf] [--threads 2] [--rounds 1]
                                [--device cpu|cuda] [--dtype float32|bfloat16] [--grouped-kernels auto,torch,triton]
                                [--cuda-graphs on,off] [--max-prefill-tokens N]
Prints one JSON line per measurement and a markdown table for BENCHMARKS.md. The peers run on the engine's
device and dtype.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture import PRESETS, build_fixture, many_adapters  # noqa: E402
from peers import hf_static_generate, peft_generate  # noqa: E402

from loraplex.adapters import AdaptedModel, kernels  # noqa: E402
from loraplex.server import host_memory  # noqa: E402
from loraplex.server.engine import Engine, EngineConfig  # noqa: E402
from loraplex.server.loader import load_base  # noqa: E402
from loraplex.server.manager import AdapterManager  # noqa: E402
from loraplex.server.request import SamplingParams  # noqa: E402

SCENARIOS = {"base": 0, "a1": 1, "a8": 8, "a32": 32, "zipf1000": 1000}
HF = "transformers generate"  # the label of the transformers peer when it runs in every round
GRAPHS_OFF = " (graphs off)"  # the label's suffix of an engine run with CUDA graphs off (--cuda-graphs on,off)


def base_of(label: str) -> str:
    """The base run a scenario's ratio is taken against: the one with the same CUDA graphs setting."""
    return "base" + (GRAPHS_OFF if label.endswith(GRAPHS_OFF) else "")


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 1, (n, length), generator=gen).tolist()


def zipf_names(names: list[str], n: int, seed: int = 0) -> list[str]:
    """n draws over `names` with popularity Zipf(1.0)."""
    weights = torch.tensor([1.0 / (i + 1) for i in range(len(names))])
    picks = torch.multinomial(weights, n, replacement=True, generator=torch.Generator().manual_seed(seed))
    return [names[i] for i in picks.tolist()]


class Collector:
    """EngineObserver that keeps the per-request and per-step records."""

    def __init__(self) -> None:
        self.records = []
        self.steps = []

    def request_finished(self, record) -> None:
        self.records.append(record)

    def step(self, record) -> None:
        self.steps.append(record)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def run_engine(adapted: AdaptedModel, tokenizer, adapter_dir: Path, task_ids: list[str], warm: list[str],
               ids: list[list[int]], new: int, device_capacity: int, merge_mode: str = "auto",
               cuda_graphs: bool = True, max_prefill_tokens: int | None = None) -> dict:
    """Submit every request at once; throughput = generated tokens / (last finish - first submit)."""
    collector = Collector()
    host = max(device_capacity, 64)
    with AdapterManager(adapted, adapter_dir, host_capacity=host, device_capacity=device_capacity) as manager:
        for name in sorted(set(t for t in task_ids if t)):
            manager.load(name, name)
        for name in warm:
            manager.wait_resident(name, timeout=60)
        config = EngineConfig(max_slots=64, max_seq_len=len(ids[0]) + new + 8, observer=collector,
                              merge_mode=merge_mode, cuda_graphs=cuda_graphs, max_prefill_tokens=max_prefill_tokens)
        with Engine(adapted, tokenizer, manager, config) as engine:
            engine.generate(task_ids[0], ids[0][:8], SamplingParams(max_new_tokens=2, ignore_eos=True))
            collector.records.clear()
            collector.steps.clear()
            params = SamplingParams(max_new_tokens=new, ignore_eos=True)
            t0 = time.perf_counter()
            handles = [engine.submit(t, p, params) for t, p in zip(task_ids, ids)]
            results = [h.result(timeout=3600) for h in handles]
            seconds = time.perf_counter() - t0
    tokens = sum(r.generated_tokens for r in results)
    failed = sum(1 for r in results if r.generated_tokens != new)
    ttft = [r.ttft_s for r in collector.records if r.ttft_s is not None]
    decodes = [s for s in collector.steps if s.prefill_tokens == 0]  # steps without a prompt in them
    return {"tok_per_s": tokens / seconds, "seconds": seconds, "failed": failed,
            "ttft_p50_ms": 1000 * statistics.median(ttft), "ttft_p99_ms": 1000 * percentile(ttft, 0.99),
            "decode_step_ms_p50": 1000 * statistics.median(s.duration_s for s in decodes) if decodes else None,
            "decode_batch_mean": statistics.mean(s.batch_size for s in decodes) if decodes else None}


def cold_load(adapted: AdaptedModel, adapter_dir: Path, names: list[str]) -> dict:
    """Disk -> servable (read, validate, bind) per adapter, through the manager."""
    times = []
    with AdapterManager(adapted, adapter_dir, host_capacity=len(names), device_capacity=len(names)) as manager:
        for name in names:
            t0 = time.perf_counter()
            manager.load(name, name)
            manager.wait_resident(name, timeout=60)
            times.append(time.perf_counter() - t0)
    return {"cold_load_p50_ms": 1000 * statistics.median(times), "cold_load_max_ms": 1000 * max(times)}


def cold_ttft(adapted: AdaptedModel, tokenizer, adapter_dir: Path, names: list[str], ids: list[int]) -> dict:
    """TTFT of a request whose adapter is on the disk tier minus the TTFT of the same request once the adapter is
    on the device, one request at a time on an idle engine, paired per adapter (the prefill of both costs the
    same; the cold one also waits for the read, validation and bind, and for the engine's next poll: `queue`)."""
    collector = Collector()
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    cold, warm, queue = [], [], []
    with AdapterManager(adapted, adapter_dir, host_capacity=2, device_capacity=2) as manager:
        for name in names:  # each registration pushes the earlier ones out of the 2-adapter tiers, to disk
            manager.load(name, name)
        config = EngineConfig(max_slots=4, max_seq_len=len(ids) + 8, observer=collector)
        with Engine(adapted, tokenizer, manager, config) as engine:
            engine.generate("", ids, params)
            for name in names:
                if manager.info(name).residency != "disk":  # the first two stayed on the device
                    continue
                for times in (cold, warm):
                    collector.records.clear()
                    engine.generate(name, ids, params, timeout=60)
                    times.append(collector.records[0].ttft_s)
                    if times is cold:
                        queue.append(collector.records[0].queue_s)
    if len(cold) < len(names) // 2:
        raise RuntimeError(f"only {len(cold)} of {len(names)} adapters were on disk when asked for")
    delta = [c - w for c, w in zip(cold, warm)]
    return {"cold_ttft_p50_ms": 1000 * statistics.median(cold), "warm_ttft_p50_ms": 1000 * statistics.median(warm),
            "cold_minus_warm_p50_ms": 1000 * statistics.median(delta), "cold_minus_warm_max_ms": 1000 * max(delta),
            "cold_queue_p50_ms": 1000 * statistics.median(queue), "cold_pairs": len(delta)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixture", type=Path, default=Path("bench/out/fixture"))
    ap.add_argument("--preset", default="smol135", choices=PRESETS)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--scenarios", default="base,a1,a8,a32,zipf1000")
    ap.add_argument("--peers", default="peft,hf")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--zipf-requests", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="run every engine scenario this many times, in rotation, "
                    "and report the run of median throughput; a scenario's ratio to base is then the median of its "
                    "rounds' ratios to the base run of the same round. transformers (--peers hf) then runs beside base in "
                    "every round too; PEFT runs once")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the dtype of the engine (base model and bound adapters) and of the peers")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the engine and the peers run")
    ap.add_argument("--grouped-kernels", default="auto", help="the grouped-delta paths to run a8/a32/zipf1000 "
                    "with, e.g. auto,torch (as serve --grouped-kernels: auto, the C kernel on CPU, and on CUDA the "
                    "Triton kernels inside graphs and torch in eager steps; torch, plain torch; triton, the Triton "
                    "kernels on CUDA in eager steps too)")
    ap.add_argument("--merge-modes", default="auto", help="engine merge modes to run each scenario with (default: "
                    "the server's, auto), e.g. batch,auto (the `a1` scenario is the one a merge can speed up)")
    ap.add_argument("--cuda-graphs", default="on", help="on the GPU, run every engine scenario with CUDA graphs of "
                    "decode steps on, off, or both side by side (on,off); the peers and the CPU ignore it")
    ap.add_argument("--max-prefill-tokens", type=int, help="the engine's prompt tokens per step (as serve "
                    "--max-prefill-tokens; default: the engine's, 512 on CPU and 4096 on CUDA)")
    a = ap.parse_args()
    if not set(a.grouped_kernels.split(",")) <= set(kernels.CHOICES):
        ap.error(f"--grouped-kernels takes {', '.join(kernels.CHOICES)}, not {a.grouped_kernels!r}")
    graph_modes = a.cuda_graphs.split(",") if a.device == "cuda" else ["on"]
    if not set(graph_modes) <= {"on", "off"}:
        ap.error(f"--cuda-graphs takes on, off or on,off, not {a.cuda_graphs!r}")
    torch.set_num_threads(a.threads)
    if a.device == "cpu":  # what the engine sets when it starts, set first: the peers run in this process too
        host_memory.retain_freed_memory()
    scenarios = [s for s in a.scenarios.split(",") if s]
    fixture = build_fixture(a.fixture, a.preset, 32, a.rank)
    adapter_dir = fixture / "adapters"
    names = sorted(p.name for p in adapter_dir.glob("lora-*"))
    model, tokenizer = load_base(str(fixture / "base"), device=a.device, dtype=a.dtype)
    adapted = AdaptedModel(model)
    vocab = model.config.vocab_size
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    jobs = []  # (label, grouped path, run): every engine measurement, run once per round
    for scenario, graphs in [(s, g) for g in graph_modes for s in scenarios]:
        k = SCENARIOS[scenario]
        off = "" if graphs == "on" else GRAPHS_OFF
        paths = a.grouped_kernels.split(",") if k > 1 else ["auto"]  # the grouped path serves mixed batches
        for path in paths:
            label = (scenario if path == "auto" else f"{scenario} ({path})") + off
            if scenario == "zipf1000":
                many = many_adapters(fixture, 1000)
                tasks = zipf_names(sorted(p.name for p in many.iterdir()), a.zipf_requests)
                ids = prompts(a.zipf_requests, a.prompt_len, vocab)
                jobs.append((label, path, lambda many=many, tasks=tasks, ids=ids, on=not off:
                             run_engine(adapted, tokenizer, many, tasks, [], ids, a.new, device_capacity=32,
                                        cuda_graphs=on, max_prefill_tokens=a.max_prefill_tokens)))
                continue
            ids = prompts(a.requests, a.prompt_len, vocab)
            tasks = [""] * a.requests if k == 0 else [names[i % k] for i in range(a.requests)]
            for mode in a.merge_modes.split(","):
                jobs.append((label if mode == "auto" else f"{label} ({mode})", path,
                             lambda k=k, tasks=tasks, ids=ids, mode=mode, on=not off:
                             run_engine(adapted, tokenizer, adapter_dir, tasks, names[:k], ids, a.new,
                                        device_capacity=max(k, 1), merge_mode=mode, cuda_graphs=on,
                                        max_prefill_tokens=a.max_prefill_tokens)))
    peers = [p for p in a.peers.split(",") if p]
    on = {"device": a.device, "dtype": getattr(torch, a.dtype)}
    hf_each_round = "hf" in peers and "base" in scenarios and a.rounds > 1
    first_base = "base" if "on" in graph_modes else "base" + GRAPHS_OFF  # the engine's run beside transformers
    if hf_each_round:  # beside the engine's base run in every round, for a paired engine / transformers ratio
        ids = prompts(a.requests, a.prompt_len, vocab)
        after_base = 1 + next(i for i, (label, _, _) in enumerate(jobs) if label == first_base)
        jobs.insert(after_base, (HF, "auto", lambda ids=ids: hf_static_generate(
            fixture / "base", ids, a.new, **on)))
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in jobs}
    for round_ in range(a.rounds):  # rounds rotate through the scenarios, so drift on a shared machine hits all
        for label, path, job in jobs:
            kernels.select(path)
            result = job()
            kernels.select("auto")
            runs[label].append(result)
            if a.rounds > 1:
                print(json.dumps({"round": round_ + 1, "scenario": label, "tok_per_s": round(result["tok_per_s"], 2)}),
                      flush=True)
    for label, measured in runs.items():
        median = sorted(measured, key=lambda r: r["tok_per_s"])[(len(measured) - 1) // 2]
        extra = {}
        if a.rounds > 1:
            extra["tok_per_s_rounds"] = [round(r["tok_per_s"], 1) for r in measured]
        if a.rounds > 1 and label == HF:  # the engine's base against transformers, round by round
            ratios = [b["tok_per_s"] / r["tok_per_s"] for r, b in zip(measured, runs[first_base])]
            extra["engine_over_hf_rounds"] = [round(x, 2) for x in ratios]
            extra["engine_over_hf_p50"] = statistics.median(ratios)
        elif a.rounds > 1 and base_of(label) in runs:  # each round's ratio to the base run beside it: drift cancels
            ratios = [r["tok_per_s"] / b["tok_per_s"] for r, b in zip(measured, runs[base_of(label)])]
            extra["ratio_rounds"] = [round(x, 2) for x in ratios]
            extra["ratio_p50"] = statistics.median(ratios)
        system, scenario = ("transformers", "base") if label == HF else ("loraplex", label)
        emit({"system": system, "scenario": scenario, **median, **extra})
    emit({"system": "loraplex", "scenario": "cold_load", **cold_load(adapted, adapter_dir, names[:20])})
    emit({"system": "loraplex", "scenario": "cold_ttft",
          **cold_ttft(adapted, tokenizer, adapter_dir, names, prompts(1, a.prompt_len, vocab)[0])})
    del adapted, model
    ids = prompts(a.requests, a.prompt_len, vocab)
    if "hf" in peers and not hf_each_round:
        emit({"system": "transformers", "scenario": "base", **hf_static_generate(fixture / "base", ids, a.new, **on)})
    if "peft" in peers:
        for scenario in scenarios:
            if scenario != "zipf1000":
                emit({"system": "peft", "scenario": scenario,
                      **peft_generate(fixture, ids, a.new, SCENARIOS[scenario], names, **on)})
    print_table(rows, a)


def print_table(rows: list[dict], a: argparse.Namespace) -> None:
    base = {(r["system"], r["scenario"]): r["tok_per_s"] for r in rows if r.get("scenario", "").startswith("base")}
    print(f"\n| system | scenario | tok/s | / own base | TTFT p50 ms | TTFT p99 ms | failed | rounds: tok/s (/ base) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "tok_per_s" not in r:
            continue
        own_base = (r["system"], base_of(r["scenario"]))
        ratio = r.get("ratio_p50", r["tok_per_s"] / base[own_base] if own_base in base else float("nan"))
        p50, p99 = r.get("ttft_p50_ms"), r.get("ttft_p99_ms")
        rounds = ", ".join(f"{t:.0f}" + (f" ({x:.2f})" if x is not None else "") for t, x in
                           zip(r.get("tok_per_s_rounds", []), r.get("ratio_rounds", [None] * a.rounds)))
        print(f"| {r['system']} | {r['scenario']} | {r['tok_per_s']:.0f} | {ratio:.2f} | "
              f"{'' if p50 is None else f'{p50:.0f}'} | {'' if p99 is None else f'{p99:.0f}'} | {r.get('failed', '')} "
              f"| {rounds} |")
    for r in rows:
        if "engine_over_hf_p50" in r:
            print(f"\nengine base / transformers, per round: {', '.join(f'{x:.2f}' for x in r['engine_over_hf_rounds'])}"
                  f"; p50 {r['engine_over_hf_p50']:.2f}")
        if r["scenario"] == "cold_load":
            print(f"\ncold load p50 {r['cold_load_p50_ms']:.1f} ms, max {r['cold_load_max_ms']:.1f} ms")
        if r["scenario"] == "cold_ttft":
            print(f"TTFT of a request to an adapter on disk {r['cold_ttft_p50_ms']:.1f} ms p50, on the device "
                  f"{r['warm_ttft_p50_ms']:.1f} ms: cold - warm p50 {r['cold_minus_warm_p50_ms']:.1f} ms, max "
                  f"{r['cold_minus_warm_max_ms']:.1f} ms ({r['cold_pairs']} adapters; the cold one's wait for its "
                  f"adapter p50 {r['cold_queue_p50_ms']:.1f} ms)")
    device = torch.cuda.get_device_name() if a.device == "cuda" else platform.processor() or platform.machine()
    print(f"\nmachine: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, {a.dtype}, "
          f"preset {a.preset}, rank {a.rank}")


if __name__ == "__main__":
    main()
