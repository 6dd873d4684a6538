"""One eager prefill step of many equal prompts: attended as one block (the engine's way) against one prompt at a
time, alternating in one process, on a `llama1b`-shaped model with random weights (no fixture needed).

usage: python bench/prefill_blocks.py [--device cuda] [--dtype bfloat16] [--prompts 64] [--length 64] [--reps 12]
Prints the median step time of each way over the reps after the first two.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture import EXTRA_PRESETS  # noqa: E402

from loraplex.adapters import AdaptedModel  # noqa: E402
from loraplex.server.forward import SeqRun, build_forward, build_step  # noqa: E402
from loraplex.server.forward import step as step_module  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--reps", type=int, default=12)
    a = ap.parse_args()
    with torch.device(a.device):
        model = LlamaForCausalLM(LlamaConfig(**EXTRA_PRESETS["llama1b"])).to(getattr(torch, a.dtype)).eval()
    adapted, forward = AdaptedModel(model), build_forward(model)
    cache = forward.new_cache(a.prompts, a.length + 1)
    gen = torch.Generator().manual_seed(0)
    runs = [SeqRun(torch.randint(10, 8000, (a.length,), generator=gen).tolist(), i, 0, False)
            for i in range(a.prompts)]
    as_blocks = step_module._prompt_blocks
    times: dict[str, list[float]] = {"one block": [], "one prompt at a time": []}
    for _ in range(a.reps):
        for way in times:
            step_module._prompt_blocks = as_blocks if way == "one block" else (lambda segments, device: ([], segments))
            start = time.perf_counter()
            with torch.no_grad(), adapted.batch([(None, 0)] * a.prompts, [a.length] * a.prompts):
                forward(build_step(runs, a.device), cache).float().sum().item()  # waits for the device
            times[way].append(time.perf_counter() - start)
    step_module._prompt_blocks = as_blocks
    for way, seconds in times.items():
        print(f"{way}: {1000 * statistics.median(seconds[2:]):.1f} ms a step (median of {len(seconds) - 2})")
    print(f"{a.prompts} prompts x {a.length} tokens, {a.device}, {a.dtype}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
