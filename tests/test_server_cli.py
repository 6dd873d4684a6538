"""`loraplex serve` as a user runs it: a subprocess on the built-in default model, the ready line, a request,
SIGTERM with a request in flight, exit 0. Plus the command line's refusals and the default model itself."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from loraplex.cli import main
from loraplex.server.default_model import load_default
from loraplex_client import Client

WAIT = 60.0  # start-up imports torch and transformers: allow for a slow machine
READY = re.compile(r"loraplex ready: grpc (\S+), metrics http://(\S+)/metrics")


def _lines(stream, out: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        out.put(line)
    out.put(None)


def test_serve_subprocess_ready_generate_and_sigterm_drain():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LORAPLEX_AUTH_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "loraplex", "serve", "--port", "0", "--metrics-port", "0",
                             "--device", "cpu", "--shutdown-grace", "30"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stderr, lines), daemon=True).start()
    log: list[str] = []
    try:
        deadline = time.monotonic() + WAIT
        match = None
        while match is None:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            assert line is not None, "the server exited before it was ready:\n" + "".join(log)
            log.append(line)
            match = READY.search(line)
        address = match.group(1)
        assert not address.endswith(":0") and any("serving " in line and "default model" in line for line in log)
        assert sum("loraplex ready" in line for line in log) == 1
        with Client(address, timeout=WAIT) as client:
            assert client.health()
            assert client.generate("", "The film was", max_new_tokens=4, ignore_eos=True).generated_tokens == 4
            stream = client.generate_stream("", "The film was", max_new_tokens=200, ignore_eos=True)
            chunks = [next(stream)]  # in flight
            proc.send_signal(signal.SIGTERM)
            chunks += list(stream)
        assert chunks[-1].finish_reason == "length" and sum(len(c.token_ids) for c in chunks) == 200
        assert proc.wait(timeout=WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=WAIT)
    while (line := lines.get(timeout=WAIT)) is not None:
        log.append(line)
    assert any("SIGTERM" in line for line in log) and "Traceback" not in "".join(log)


@pytest.mark.parametrize("argv, words", [
    (["serve", "--tls-cert", "cert.pem"], "--tls-cert and --tls-key go together"),
    (["serve", "--port", "70000"], "--port"),
    (["serve", "--adapter-dir", "/no/such/dir"], "not a directory"),
    (["serve", "--max-batch-size", "0"], "--max-batch-size"),
])
def test_serve_refuses_bad_flags(argv, words, caplog):
    assert main(argv) == 2
    assert words in caplog.text


def test_cli_needs_a_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2 and "serve" in capsys.readouterr().err


def test_default_model_serves_offline_and_quick():
    start = time.perf_counter()
    model, tokenizer, description = load_default("cpu")
    assert time.perf_counter() - start < 10.0 and "embedded default model" in description
    text = "reverse spam="
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text and max(ids) < model.config.vocab_size
    assert model.config.eos_token_id == tokenizer.eos_token_id
