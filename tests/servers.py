"""Real servers for tests: a tiny peaky Llama served over gRPC on localhost by `BackgroundServer`, port 0."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import torch
from tiny import ARCHITECTURES
from tokenizer import build_tokenizer
from transformers import AutoModelForCausalLM

from loraplex.server.app import BackgroundServer, ServeOptions

WAIT = 30.0  # seconds: the bound on every wait in the server tests
LONG = 1000  # tokens: a request that runs for about a second or more on the tiny model


def peaky_lm() -> torch.nn.Module:
    """tokenizer.lm's llama (same seed, same weights) with a 1024-token context, so that requests can be long."""
    torch.manual_seed(0)
    config = ARCHITECTURES["llama"]()
    config.vocab_size = len(build_tokenizer())
    config.max_position_embeddings = 1024
    config.eos_token_id, config.bos_token_id, config.pad_token_id = 1, 0, 2
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)  # greedy choices far from ties
    return model


def options(**overrides) -> ServeOptions:
    """Test defaults: any free port, no metrics port, 1024-token sequences, 16 running, 5 s drain."""
    base = dict(port=0, metrics_port=None, max_seq_len=1024, max_batch_size=16, shutdown_grace=5.0)
    return ServeOptions(**{**base, **overrides})


def start(opts: ServeOptions) -> BackgroundServer:
    """A started (SERVING) server of `peaky_lm` with the test tokenizer."""
    return BackgroundServer(opts, model=peaky_lm(), tokenizer=build_tokenizer(), model_name="tiny-llama").start(WAIT)


def wait_until(predicate, timeout: float = WAIT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def capture_handles(bg: BackgroundServer, monkeypatch) -> list:
    """Record the engine's RequestHandle of every request the servicer submits."""
    engine, handles = bg.server.engine, []
    submit = engine.submit

    def recording(*args, **kwargs):
        handles.append(submit(*args, **kwargs))
        return handles[-1]

    monkeypatch.setattr(engine, "submit", recording)
    return handles


READY = re.compile(r"loraplex ready: grpc (\S+), ")
START_WAIT = 60.0  # seconds for a `loraplex serve` subprocess to be ready: it imports torch and transformers


@contextlib.contextmanager
def serve_process(args: list[str], env: dict[str, str] | None = None) -> Iterator[SimpleNamespace]:
    """`loraplex serve ARGS` in a subprocess, up to its ready line; yields `.proc`, `.address` and `.log` (its
    stderr lines). The caller's LORAPLEX_* variables are dropped, `env` added. On exit the process is killed if
    still running, and `.log` gets the rest of its lines."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    environ.update(PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.Popen([sys.executable, "-m", "loraplex", "serve", *args], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=environ)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stderr, lines), daemon=True).start()
    server = SimpleNamespace(proc=proc, address=None, log=[])
    try:
        deadline = time.monotonic() + START_WAIT
        while server.address is None:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            assert line is not None, "the server exited before it was ready:\n" + "".join(server.log)
            server.log.append(line)
            if match := READY.search(line):
                server.address = match.group(1)
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=START_WAIT)
        while (line := lines.get(timeout=START_WAIT)) is not None:
            server.log.append(line)


def _read_lines(stream, out: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        out.put(line)
    out.put(None)
