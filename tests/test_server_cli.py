"""`loraplex serve` as a user runs it: a subprocess on the built-in default model, the ready line, a request,
SIGTERM with a request in flight, exit 0. Plus the command line's refusals and the default model itself."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest
from servers import options, serve_process, start

from loraplex.cli import build_parser, main
from loraplex.server.app import options_from_args
from loraplex.server.default_model import load_default
from loraplex_client import Client

WAIT = 60.0  # start-up imports torch and transformers: allow for a slow machine


def test_serve_subprocess_ready_generate_and_sigterm_drain(capsys):
    """Configured as a container configures it: through LORAPLEX_* variables, a flag overriding one."""
    env = dict(LORAPLEX_PORT="0", LORAPLEX_METRICS_PORT="0", LORAPLEX_DEVICE="cpu", LORAPLEX_SHUTDOWN_GRACE="1")
    with serve_process(["--shutdown-grace", "30"], env) as server:
        assert not server.address.endswith(":0")
        assert any("serving " in line and "default model" in line for line in server.log)
        assert sum("loraplex ready" in line for line in server.log) == 1
        assert main(["health", "--address", server.address]) == 0 and "SERVING" in capsys.readouterr().out
        with Client(server.address, timeout=WAIT) as client:
            assert client.generate("", "The film was", max_new_tokens=4, ignore_eos=True).generated_tokens == 4
            stream = client.generate_stream("", "The film was", max_new_tokens=200, ignore_eos=True)
            chunks = [next(stream)]  # in flight
            server.proc.send_signal(signal.SIGTERM)
            chunks += list(stream)
        assert chunks[-1].finish_reason == "length" and sum(len(c.token_ids) for c in chunks) == 200
        assert server.proc.wait(timeout=WAIT) == 0  # within the flag's 30 s grace, not the variable's 1 s
    assert any("SIGTERM" in line for line in server.log) and "Traceback" not in "".join(server.log)


@pytest.mark.parametrize("argv, words", [
    (["serve", "--tls-cert", "cert.pem"], "--tls-cert and --tls-key go together"),
    (["serve", "--port", "70000"], "--port"),
    (["serve", "--adapter-dir", "/no/such/dir"], "not a directory"),
    (["serve", "--max-batch-size", "0"], "--max-batch-size"),
    (["serve", "--adapter-wait", "-1"], "--adapter-wait must be >= 0"),
])
def test_serve_refuses_bad_flags(argv, words, caplog):
    assert main(argv) == 2
    assert words in caplog.text


@pytest.mark.parametrize("variable, value, words", [
    ("LORAPLEX_PORT", "abc", "$LORAPLEX_PORT='abc' is not a valid --port: expected int"),
    ("LORAPLEX_DEVICE", "tpu", "$LORAPLEX_DEVICE='tpu' is not a valid --device: expected one of auto, cpu, cuda"),
    ("LORAPLEX_MAX_BATCH_SIZE", "0", "--max-batch-size must be at least 1"),
])
def test_serve_refuses_bad_variables(monkeypatch, caplog, variable, value, words):
    monkeypatch.setenv(variable, value)
    assert main(["serve"]) == 2
    assert words in caplog.text


def test_variables_are_defaults_that_flags_override(monkeypatch):
    for name, value in {"LORAPLEX_MAX_BATCH_SIZE": "7", "LORAPLEX_MERGE_MODE": "merge", "LORAPLEX_METRICS_PORT": "-1",
                        "LORAPLEX_KV_CACHE_GIB": "0.5", "LORAPLEX_HOST_ADAPTERS": "", "LORAPLEX_ADAPTER_WAIT": "0.25"}.items():
        monkeypatch.setenv(name, value)
    options = options_from_args(build_parser().parse_args(["serve"]))
    assert (options.max_batch_size, options.merge_mode, options.metrics_port, options.kv_cache_gib) == (7, "merge", None, 0.5)
    assert options.adapter_wait == 0.25
    assert options.host_adapters is None  # empty: unset
    flagged = options_from_args(build_parser().parse_args(["serve", "--max-batch-size", "3"]))
    assert flagged.max_batch_size == 3 and flagged.merge_mode == "merge"


def test_the_grouped_kernels_choices_are_the_kernels_own():
    from loraplex.adapters import kernels
    from loraplex.server.app import CHOICES

    assert CHOICES["grouped_kernels"] == kernels.CHOICES  # app.py spells them out to keep torch out of the CLI
    with pytest.raises(ValueError, match="grouped kernels must be one of"):
        kernels.select("cuda")


def test_engine_options_reach_the_engine():
    server = start(options(max_prefill_tokens=96, merge_mode="batch", adapter_wait=0.25))
    try:
        config = server.server.engine.config
        assert (config.max_prefill_tokens, config.merge_mode, config.adapter_wait_s) == (96, "batch", 0.25)
    finally:
        server.stop()


def test_every_serve_flag_names_its_variable(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    flags = re.findall(r"(?<![\w-])--([a-z][a-z-]+)", text)
    assert len(set(flags)) > 20
    for flag in set(flags) - {"help"}:
        assert f"$LORAPLEX_{flag.upper().replace('-', '_')}" in text, flag


def test_health_answers_by_exit_status(capsys, monkeypatch):
    monkeypatch.setenv("LORAPLEX_AUTH_TOKEN", "s3cret")  # health needs no token
    server = start(options(auth_token="s3cret"))
    try:
        assert main(["health", "--address", server.address, "--timeout", "5"]) == 0
        assert capsys.readouterr().out.strip() == f"{server.address}: SERVING"
    finally:
        server.stop(grace=1.0)
    assert main(["health", "--address", server.address, "--timeout", "1"]) == 1
    assert "unreachable (UNAVAILABLE" in capsys.readouterr().err


def test_health_does_not_import_torch():
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, *args):\n"
            "        if name.split('.')[0] in ('torch', 'transformers'): raise ImportError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from loraplex.cli import main\n"
            "sys.exit(main(['health', '--address', '127.0.0.1:9', '--timeout', '0.5']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 1 and "127.0.0.1:9: unreachable" in result.stderr, result.stderr


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
