"""Profile the engine's decode steps: wall time per step against device kernel time, and the top operations.

usage: python bench/profile_steps.py FIXTURE [--adapters 32] [--device cpu|cuda] [--dtype bfloat16] [--steps 20]

Runs workload W's 64 requests on `--adapters` adapters of the fixture (0: the base model), and profiles steps
20 .. 20+steps of the engine's own thread (torch.profiler, CPU and, on CUDA, the device): prints the wall
time per step, the device's kernel time per step (how busy the GPU is), and the operations that cost the most
host and device time. This is how BENCHMARKS.md's GPU profile (cuDNN re-planning, 3.7 ms of kernels in a
decode step) was taken. Wall times under the profiler are inflated, unevenly (on a CPU a base-model step showed
three times its real time, a multi-adapter step about its own): read real step times from bench/workload.py's
`decode_step_ms_p50`, and use this for the device's kernel time and the operation tables.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import prompts  # noqa: E402

from loraplex.adapters import AdaptedModel  # noqa: E402
from loraplex.server.engine import Engine, EngineConfig  # noqa: E402
from loraplex.server.loader import load_base  # noqa: E402
from loraplex.server.manager import AdapterManager  # noqa: E402
from loraplex.server.request import SamplingParams  # noqa: E402

FIRST_STEP = 20  # past the prefill steps of workload W (64 prompts, 8 per step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fixture", type=Path)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cuda = a.device == "cuda"
    model, tokenizer = load_base(str(a.fixture / "base"), device=a.device, dtype=a.dtype)
    adapted = AdaptedModel(model)
    names = sorted(p.name for p in (a.fixture / "adapters").glob("lora-*"))[: a.adapters]
    if len(names) < a.adapters:
        raise SystemExit(f"the fixture has {len(names)} adapters, fewer than --adapters {a.adapters}")
    ids = prompts(64, 64, model.config.vocab_size)
    tasks = [names[i % len(names)] if names else "" for i in range(64)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    state: dict = {"step": 0}
    with AdapterManager(adapted, a.fixture / "adapters", host_capacity=64, device_capacity=max(len(names), 1)) as manager:
        for name in names:
            manager.load(name, name)
            manager.wait_resident(name, timeout=60)
        with Engine(adapted, tokenizer, manager, EngineConfig(max_slots=64, max_seq_len=200)) as engine:
            step = engine._step

            def profiled_step() -> bool:  # runs on the engine's thread, where the profiler must start and stop
                state["step"] += 1
                if state["step"] == FIRST_STEP:
                    if cuda:
                        torch.cuda.synchronize()
                    state["profile"] = profile(activities=activities)
                    state["profile"].__enter__()
                    state["t0"] = time.perf_counter()
                ran = step()
                if state["step"] == FIRST_STEP + a.steps - 1:
                    if cuda:
                        torch.cuda.synchronize()
                    state["wall"] = time.perf_counter() - state["t0"]
                    state["profile"].__exit__(None, None, None)
                return ran

            engine._step = profiled_step
            params = SamplingParams(max_new_tokens=64, ignore_eos=True)
            for handle in [engine.submit(t, p, params) for t, p in zip(tasks, ids)]:
                handle.result(timeout=600)
    if "wall" not in state:
        raise SystemExit(f"the run ended after {state['step']} steps, before the profiled window closed")
    prof = state["profile"]
    device_us = sum(e.self_device_time_total for e in prof.events() if e.device_type == DeviceType.CUDA)
    wall_ms = 1000 * state["wall"] / a.steps
    kernels = f", device kernels {device_us / 1000 / a.steps:.2f} ms per step" if cuda else ""
    print(f"{a.adapters} adapters, {a.device} {a.dtype}: {wall_ms:.2f} ms per step under the profiler{kernels}")
    events = prof.key_averages()
    if cuda:
        print(events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
