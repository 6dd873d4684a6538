"""Workload W of BENCHMARK.md end to end: `loraplex serve` driven over gRPC by the client SDK, 64 calls at once,
next to the in-process engine on the very same prompts, in one run.

usage: python bench/e2e.py [--fixture DIR] [--preset tiny|smol135|llama1b] [--rank 16] [--scenarios base,a8,a32]
                           [--modes unary,stream] [--server subprocess|thread] [--threads 2] [--no-in-process]
                           [--device cpu|cuda] [--dtype float32|bfloat16]

The text API takes text, not token ids, so each prompt is made of the fixture's words until it tokenizes to
exactly `--prompt-len` tokens (checked against the `prompt_tokens` the server reports). Every request asks
for `--new` tokens with ignore_eos. Throughput = generated tokens / (last answer - first call), as in
bench/workload.py; TTFT (stream mode) = first chunk with a token - the moment all calls were issued.
The server is a subprocess by default, so that the client's work does not share its interpreter.
Prints one JSON line per measurement and a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import queue
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture import PRESETS, build_fixture  # noqa: E402
from workload import SCENARIOS, percentile, run_engine  # noqa: E402

from loraplex_client import AsyncClient, LoraplexError  # noqa: E402

WORDS = ("the model adapter task server token batch low rank matrix head learn share query answer review "
         "sentiment translate summarize question positive negative neutral").split()
READY = re.compile(r"loraplex ready: grpc (\S+)")


def text_prompts(tokenizer, n: int, length: int, seed: int = 0) -> tuple[list[str], list[list[int]]]:
    """n texts of exactly `length` tokens each (random fixture words, then one-letter fillers), with their ids."""
    rnd = random.Random(seed)
    texts, ids = [], []

    def count(text: str) -> int:
        return len(tokenizer(text)["input_ids"])

    for _ in range(n):
        words: list[str] = []
        while count(" ".join(words)) < length:
            words.append(rnd.choice(WORDS))
        while count(" ".join(words)) > length:
            words.pop()
        while count(" ".join(words)) < length:
            words.append(rnd.choice("abcdefghij"))
        text = " ".join(words)
        if count(text) != length:
            raise SystemExit(f"could not build a prompt of exactly {length} tokens (got {count(text)})")
        texts.append(text)
        ids.append(list(tokenizer(text)["input_ids"]))
    return texts, ids


def task_ids(scenario: str, names: list[str], n: int) -> list[str]:
    k = SCENARIOS[scenario]
    return [""] * n if k == 0 else [names[i % k] for i in range(n)]


# ---------------------------------------------------------------------- the server
class SubprocessServer:
    """`python -m loraplex serve ...`; the address comes from its ready line."""

    def __init__(self, args: list[str], timeout: float = 600.0) -> None:
        cmd = [sys.executable, "-m", "loraplex", "serve", *args]
        print("server:", " ".join(cmd), file=sys.stderr, flush=True)
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            if line is None:
                raise SystemExit(f"the server exited with {self.proc.wait()} before it was ready")
            if (m := READY.search(line)) is not None:
                self.address = m.group(1).rstrip(",")
                return

    def _pump(self) -> None:
        for line in iter(self.proc.stderr.readline, ""):
            if "WARNING" in line or "ERROR" in line or "ready" in line:
                print("  server |", line.rstrip(), file=sys.stderr, flush=True)
            self.lines.put(line)
        self.lines.put(None)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)


class ThreadServer:
    """The server on a thread of this process (it then shares the interpreter with the client)."""

    def __init__(self, args: list[str]) -> None:
        from loraplex.cli import build_parser
        from loraplex.server.app import BackgroundServer, options_from_args

        options = options_from_args(build_parser().parse_args(["serve", *args]))
        self.bg = BackgroundServer(options).start(timeout=600)
        self.address = self.bg.address

    def stop(self) -> None:
        self.bg.stop(grace=5.0)


# ---------------------------------------------------------------------- the client side
async def drive(address: str, tasks: list[str], prompts: list[str], new: int, stream: bool) -> dict:
    """Issue every call at once over one channel; wait for all of them."""
    async with AsyncClient(address, timeout=3600) as client:
        for task in sorted(set(tasks)):  # warm: first use of each adapter, the connection, the handlers
            await client.generate(task, prompts[0], max_new_tokens=2, ignore_eos=True)
        ttft: list[float] = []
        t0 = time.perf_counter()

        async def one(task: str, prompt: str) -> tuple[int, int]:
            if not stream:
                r = await client.generate(task, prompt, max_new_tokens=new, ignore_eos=True)
                return r.generated_tokens, r.prompt_tokens
            tokens, prompt_tokens = 0, 0
            async for chunk in client.generate_stream(task, prompt, max_new_tokens=new, ignore_eos=True):
                if chunk.token_ids and tokens == 0:
                    ttft.append(time.perf_counter() - t0)
                tokens += len(chunk.token_ids)
                prompt_tokens = chunk.prompt_tokens or prompt_tokens
            return tokens, prompt_tokens

        results = await asyncio.gather(*(one(t, p) for t, p in zip(tasks, prompts)), return_exceptions=True)
        seconds = time.perf_counter() - t0
    errors = [r for r in results if isinstance(r, BaseException)]
    for err in errors[:3]:
        print("  error:", repr(err), file=sys.stderr)
    ok = [r for r in results if not isinstance(r, BaseException)]
    tokens = sum(g for g, _ in ok)
    row = {"tok_per_s": tokens / seconds, "seconds": seconds,
           "failed": len(errors) + sum(1 for g, _ in ok if g != new),
           "prompt_tokens_mean": statistics.mean(p for _, p in ok) if ok else 0.0}
    if ttft:
        row.update(ttft_p50_ms=1000 * statistics.median(ttft), ttft_p99_ms=1000 * percentile(ttft, 0.99))
    if errors and not isinstance(errors[0], LoraplexError):
        raise errors[0]
    return row


# ---------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixture", type=Path, default=Path("bench/out/fixture"))
    ap.add_argument("--preset", default="smol135", choices=PRESETS)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--scenarios", default="base,a8,a32")
    ap.add_argument("--modes", default="unary,stream", help="unary (Generate) and/or stream (GenerateStream)")
    ap.add_argument("--server", default="subprocess", choices=["subprocess", "thread"])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch threads, in-process and in the server")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="in-process and in the server")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="in-process and in the server")
    ap.add_argument("--repeat", type=int, default=3, help="rounds over every scenario and mode; the table keeps "
                    "the best of each (every run is printed)")
    ap.add_argument("--no-in-process", dest="in_process", action="store_false",
                    help="skip the in-process engine measurement on the same prompts")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    scenarios = [s for s in a.scenarios.split(",") if s]
    modes = [m for m in a.modes.split(",") if m]
    if "zipf1000" in scenarios:
        raise SystemExit("zipf1000 is in-process only (bench/workload.py)")
    fixture = build_fixture(a.fixture, a.preset, 32, a.rank)
    adapter_dir = fixture / "adapters"
    names = sorted(p.name for p in adapter_dir.glob("lora-*"))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fixture / "base")
    texts, ids = text_prompts(tokenizer, a.requests, a.prompt_len)
    max_seq_len = a.prompt_len + a.new + 8  # as bench/workload.py sizes its engine
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    adapted = tok = None
    if a.in_process:
        from loraplex.adapters import AdaptedModel
        from loraplex.server.loader import load_base

        model, tok = load_base(str(fixture / "base"), device=a.device, dtype=a.dtype)
        adapted = AdaptedModel(model)
    server_args = ["--base-model", str(fixture / "base"), "--adapter-dir", str(adapter_dir), "--port", "0",
                   "--metrics-port", "-1", "--device", a.device, "--dtype", a.dtype, "--max-batch-size", "64",
                   "--max-seq-len", str(max_seq_len), "--device-adapters", "32", "--threads", str(a.threads),
                   "--max-queued-requests", str(max(256, a.requests))]
    server = SubprocessServer(server_args) if a.server == "subprocess" else ThreadServer(server_args)
    try:  # interleaved, so that a noisy neighbour slows both sides alike
        for _ in range(a.repeat):
            for scenario in scenarios:
                tasks = task_ids(scenario, names, a.requests)
                if adapted is not None:
                    k = SCENARIOS[scenario]
                    emit({"system": "in-process", "scenario": scenario,
                          **run_engine(adapted, tok, adapter_dir, tasks, names[:k], ids, a.new,
                                       device_capacity=max(k, 1))})
                for mode in modes:
                    emit({"system": f"e2e-{mode}", "scenario": scenario,
                          **asyncio.run(drive(server.address, tasks, texts, a.new, stream=mode == "stream"))})
    finally:
        server.stop()
    print_table(rows, a)


def print_table(rows: list[dict], a: argparse.Namespace) -> None:
    best: dict[tuple[str, str], dict] = {}
    for r in rows:  # with --repeat, the best run of each (system, scenario)
        key = (r["system"], r["scenario"])
        if key not in best or r["tok_per_s"] > best[key]["tok_per_s"]:
            best[key] = r
    print(f"\nbest of {a.repeat} runs")
    print("| scenario | system | tok/s | / in-process | / own base | TTFT p50 ms | TTFT p99 ms | failed |")
    print("|---|---|---|---|---|---|---|---|")
    for (system, scenario), r in best.items():
        inproc = best.get(("in-process", scenario))
        base = best.get((system, "base"))
        ratio = f"{r['tok_per_s'] / inproc['tok_per_s']:.2f}" if inproc else ""
        own = f"{r['tok_per_s'] / base['tok_per_s']:.2f}" if base else ""
        p50, p99 = (f"{r[k]:.0f}" if k in r else "" for k in ("ttft_p50_ms", "ttft_p99_ms"))
        print(f"| {scenario} | {system} | {r['tok_per_s']:.0f} | {ratio} | {own} | {p50} | {p99} | {r['failed']} |")
    device = torch.cuda.get_device_name() if a.device == "cuda" else platform.processor() or platform.machine()
    print(f"\nmachine: {device}, {a.dtype}, torch {torch.__version__}, threads {a.threads}, "
          f"preset {a.preset}, rank {a.rank}, {a.requests} requests x {a.prompt_len} prompt + {a.new} new tokens, "
          f"server {a.server}")


if __name__ == "__main__":
    main()
