"""The gRPC server end to end: real gRPC on localhost, the client SDK, a tiny peaky model and real adapters.

Servers run in-process (`BackgroundServer`, port 0). Expected outputs come from a second `Engine` over an
identical model copy, so every comparison is the server against the engine itself, token for token.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import shutil
import subprocess
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch
from families import make_adapter
from prometheus_client.parser import text_string_to_metric_families
from servers import LONG, WAIT, capture_handles, options, peaky_lm, start, wait_until
from tiny import tiny_model
from tokenizer import build_tokenizer

from loraplex.adapters import AdaptedModel
from loraplex.server.app import BackgroundServer, LoraplexServer
from loraplex.server.auth import AUTH_ENV, token_from
from loraplex.server.engine import Engine, EngineConfig
from loraplex.server.manager import AdapterManager
from loraplex.server.request import SamplingParams
from loraplex_client import (
    AlreadyExistsError,
    AsyncClient,
    Client,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LoraplexError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from loraplex_client.errors import from_rpc_error
from loraplex_client.pb import loraplex_pb2 as pb

STEADY = [  # (task id, prompt): the base model, two LoRAs, an MTL-LoRA through each form of its task ids
    ("", "the model"), ("lo1", "café 日本"), ("alpha", "ok ok a b"), ("lo2", "the task"),
    ("mt/beta", "query answer rank"), ("lo1", "token batch rank end"), ("gamma", "end"), ("", "b a"),
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """adapters/: lo1, lo2 (LoRA), mt (MTL-LoRA: alpha, beta, gamma); spare/: adapters copied in by tests."""
    root = tmp_path_factory.mktemp("server")
    adapters, spare, outside = root / "adapters", root / "spare", root / "outside"
    adapted = AdaptedModel(peaky_lm())
    for kind, name, seed, where in [("lora", "lo1", 1, adapters), ("lora", "lo2", 2, adapters),
                                    ("mtl_lora", "mt", 3, adapters), ("lora", "lo3", 4, spare),
                                    ("lora", "lo3b", 5, spare), ("lora", "m1", 6, spare),
                                    ("lora", "evil", 7, outside)]:
        make_adapter(kind, adapted, "llama", name, where, seed=seed)
    gpt2 = AdaptedModel(tiny_model("gpt2"))
    make_adapter("lora", gpt2, "gpt2", "gpt2-lora", spare, seed=8)
    return SimpleNamespace(adapters=adapters, spare=spare, outside=outside)


def add(dirs, name: str, as_name: str | None = None) -> str:
    """Copy spare adapter `name` into the adapter directory (as an admin would), returning its path there."""
    target = dirs.adapters / (as_name or name)
    if not target.exists():
        shutil.copytree(dirs.spare / name, target)
    return target.name


@pytest.fixture(scope="module")
def server(dirs):
    bg = start(options(adapter_dir=str(dirs.adapters), metrics_port=0, device_adapters=3, host_adapters=8))
    yield bg
    bg.stop(grace=1.0)


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=WAIT) as c:
        yield c


class Reference:
    """The engine's own outputs: a second engine over an identical model, its adapters loaded by name."""

    def __init__(self, adapter_dir: Path) -> None:
        self.manager = AdapterManager(AdaptedModel(peaky_lm()), adapter_dir)
        for name in ("lo1", "lo2", "mt"):
            self.manager.load(name, name)
        self.engine = Engine(self.manager.adapted, build_tokenizer(), self.manager,
                             EngineConfig(max_slots=4, max_seq_len=1024))
        self.engine.start()
        self._cache: dict = {}

    def __call__(self, task_id: str, prompt: str, max_new_tokens: int = 8, **params):
        key = (task_id, prompt, max_new_tokens, tuple(sorted(params.items())))
        if key not in self._cache:
            self._cache[key] = self.engine.generate(
                task_id, prompt, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, **params), timeout=WAIT)
        return self._cache[key]

    def close(self) -> None:
        self.engine.stop()
        self.manager.close()


@pytest.fixture(scope="module")
def reference(dirs):
    ref = Reference(dirs.adapters)
    yield ref
    ref.close()


def same(got, want) -> bool:
    return (got.token_ids, got.text, got.finish_reason, got.prompt_tokens, got.generated_tokens, got.adapter) == \
        (want.token_ids, want.text, want.finish_reason, want.prompt_tokens, want.generated_tokens, want.adapter)


def scrape(bg: BackgroundServer) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics over HTTP: {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{bg.server.metrics_port}/metrics", timeout=WAIT) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def still_serves(client: Client) -> None:
    assert client.generate("lo1", "ok", max_new_tokens=2, ignore_eos=True).generated_tokens == 2


# ---------------------------------------------------------------------- serving
def test_not_serving_until_the_model_is_loaded_and_warm(monkeypatch):
    gate, load = threading.Event(), LoraplexServer._load_model

    def held(self):
        assert gate.wait(WAIT)
        return load(self)

    def status(c: Client) -> str:
        try:
            return c.health_status()
        except UnavailableError:  # the port is bound a moment before the server answers
            return "unreachable"

    monkeypatch.setattr(LoraplexServer, "_load_model", held)
    bg = BackgroundServer(options(), model=peaky_lm(), tokenizer=build_tokenizer())
    starting = threading.Thread(target=bg.start, args=(WAIT,))
    starting.start()
    try:
        wait_until(lambda: bg.server.port is not None, what="the port")
        with Client(bg.address, timeout=WAIT) as c:
            wait_until(lambda: status(c) == "NOT_SERVING", what="NOT_SERVING while loading")
            with pytest.raises(UnavailableError, match="starting"):
                c.generate("", "too early")
            gate.set()
            starting.join(WAIT)
            assert c.health() and c.generate("", "now", max_new_tokens=2, ignore_eos=True).generated_tokens == 2
    finally:
        gate.set()
        starting.join(WAIT)
        bg.stop(grace=0.0)


def test_health_listing_and_reflection(server, client):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    assert client.health() and client.health_status("loraplex.v1.Generation") == "SERVING"
    tasks = {t.task_id: (t.adapter, t.adapter_type) for t in client.list_tasks()}
    assert {k: tasks[k] for k in ("lo1", "alpha", "mt/beta")} == \
        {"lo1": ("lo1", "lora"), "alpha": ("mt", "mtl_lora"), "mt/beta": ("mt", "mtl_lora")}
    adapters = {a.name: a for a in client.list_adapters()}
    assert adapters["mt"].tasks == ["alpha", "beta", "gamma"] and adapters["lo1"].rank == 4
    assert adapters["lo1"].num_parameters > 0 and adapters["lo1"].residency in ("host", "device")
    with grpc.insecure_channel(server.address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"loraplex.v1.Generation", "loraplex.v1.AdapterAdmin", "grpc.health.v1.Health"} <= services
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        listed = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=WAIT).statuses
    assert {name: s.status for name, s in listed.items()} == dict.fromkeys(
        ["", "loraplex.v1.Generation", "loraplex.v1.AdapterAdmin"], health_pb2.HealthCheckResponse.SERVING)


def test_concurrent_mixed_adapter_requests_equal_the_engine(server, client, reference):
    with ThreadPoolExecutor(len(STEADY) * 2) as pool:
        got = list(pool.map(lambda r: client.generate(*r, max_new_tokens=8, ignore_eos=True), STEADY * 2))
    for (task_id, prompt), result in zip(STEADY * 2, got):
        assert same(result, reference(task_id, prompt)), (task_id, prompt)
    assert {r.adapter for r in got} == {"", "lo1", "lo2", "mt"}


def test_async_client_streams_and_calls_concurrently(server, reference):
    async def main():
        async with AsyncClient(server.address, timeout=WAIT) as c:
            async def streamed(task_id, prompt):
                return [chunk async for chunk in c.generate_stream(task_id, prompt, max_new_tokens=8, ignore_eos=True)]

            unary = [c.generate(t, p, max_new_tokens=8, ignore_eos=True) for t, p in STEADY]
            return await asyncio.gather(*unary), await asyncio.gather(*(streamed(t, p) for t, p in STEADY))

    unary, streams = asyncio.run(asyncio.wait_for(main(), WAIT))
    for (task_id, prompt), result, chunks in zip(STEADY, unary, streams):
        want = reference(task_id, prompt)
        assert same(result, want)
        assert "".join(c.text for c in chunks) == want.text
        assert [t for c in chunks for t in c.token_ids] == want.token_ids


@pytest.mark.parametrize("params", [dict(max_new_tokens=20, ignore_eos=True),
                                    dict(max_new_tokens=16, temperature=0.9, top_k=40, top_p=0.95, seed=7),
                                    dict(max_new_tokens=16, stop="STOP")], ids=["greedy", "seeded", "stop"])
def test_stream_concatenates_to_the_unary_result(client, params):
    if params.get("stop") == "STOP":  # a stop string that the greedy output really contains
        text = client.generate("lo2", "café 日本 the", max_new_tokens=16, ignore_eos=True).text
        params = dict(params, stop=text[len(text) // 2:len(text) // 2 + 2], ignore_eos=True)
    unary = client.generate("lo2", "café 日本 the", **params)
    chunks = list(client.generate_stream("lo2", "café 日本 the", **params))
    assert len(chunks) > 1  # deltas as produced, not one message at the end
    assert "".join(c.text for c in chunks) == unary.text
    assert [t for c in chunks for t in c.token_ids] == unary.token_ids
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    last = chunks[-1]
    assert (last.finish_reason, last.prompt_tokens, last.generated_tokens, last.adapter) == \
        (unary.finish_reason, unary.prompt_tokens, unary.generated_tokens, "lo2")
    if "stop" in params:
        assert unary.finish_reason == "stop" and params["stop"] not in unary.text


# ---------------------------------------------------------------------- errors
def _raw_generate(address: str, payload: bytes) -> None:
    with grpc.insecure_channel(address) as channel:
        try:
            channel.unary_unary("/loraplex.v1.Generation/Generate")(payload, timeout=WAIT)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None


def _bad_adapter_dirs(dirs) -> None:
    corrupt = dirs.adapters / "corrupt"
    if not corrupt.exists():
        shutil.copytree(dirs.spare / "lo3", corrupt)
        (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 64)
        pickled = dirs.adapters / "pickled"
        pickled.mkdir()
        shutil.copy(dirs.spare / "lo3" / "adapter_config.json", pickled)
        torch.save({"w": torch.zeros(2)}, pickled / "adapter_model.bin")
        add(dirs, "gpt2-lora")
        (dirs.adapters / "escape").symlink_to(dirs.outside / "evil")


ERRORS = [  # (name, call(client, server), expected error, words the details must contain)
    ("unknown task", lambda c, s: c.generate("no-such-task", "x"), NotFoundError, "unknown task id"),
    ("unknown task, streamed", lambda c, s: list(c.generate_stream("nope", "x")), NotFoundError, "unknown task id"),
    ("temperature < 0", lambda c, s: c.generate("lo1", "x", temperature=-0.5), InvalidArgumentError, "temperature"),
    ("top_p > 1", lambda c, s: c.generate("lo1", "x", top_p=1.5), InvalidArgumentError, "top_p"),
    ("max_new_tokens above the limit", lambda c, s: c.generate("", "x", max_new_tokens=5000), InvalidArgumentError,
     "max_new_tokens"),
    ("prompt too long", lambda c, s: list(c.generate_stream("", "the " * 3000)), InvalidArgumentError, "prompt"),
    ("prompt not UTF-8", lambda c, s: _raw_generate(s.address, b"\x12\x02\xff\xfe"), InvalidArgumentError, "UTF-8"),
    ("name already served", lambda c, s: c.load_adapter("lo1", "lo1"), AlreadyExistsError, "already loaded"),
    ("task id already served", lambda c, s: c.load_adapter("mt2", "mt"), AlreadyExistsError, "already served"),
    ("path with ..", lambda c, s: c.load_adapter("x", "../outside/evil"), PermissionDeniedError, "outside"),
    ("absolute path", lambda c, s: c.load_adapter("x", "/etc"), PermissionDeniedError, "outside"),
    ("symlink out", lambda c, s: c.load_adapter("x", "escape"), PermissionDeniedError, "outside"),
    ("corrupt weights", lambda c, s: c.load_adapter("x", "corrupt"), InvalidArgumentError, "corrupt"),
    ("pickled weights", lambda c, s: c.load_adapter("x", "pickled"), InvalidArgumentError, "pickled"),
    ("other base model", lambda c, s: c.load_adapter("x", "gpt2-lora"), FailedPreconditionError, "not a linear layer"),
    ("no such directory", lambda c, s: c.load_adapter("x", "ghost"), InvalidArgumentError, "does not exist"),
    ("invalid name", lambda c, s: c.load_adapter("bad name!", "lo1"), InvalidArgumentError, "invalid adapter name"),
    ("unload unknown", lambda c, s: c.unload_adapter("ghost"), NotFoundError, "not loaded"),
]


@pytest.mark.parametrize("call, error, words", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_each_error_has_its_status_code_and_the_server_still_serves(server, client, dirs, call, error, words):
    _bad_adapter_dirs(dirs)
    with pytest.raises(error) as info:
        call(client, server)
    assert words in info.value.details and len(info.value.details) <= 1024
    still_serves(client)


def test_unexpected_errors_are_internal_logged_and_survived(server, client, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(server.server.manager, "list_adapters", broken)
    monkeypatch.setattr(server.server.engine, "submit", broken)
    with pytest.raises(InternalError, match="injected fault"):
        client.list_adapters()
    with pytest.raises(InternalError, match="injected fault"):
        list(client.generate_stream("lo1", "x"))
    assert any("unexpected error in /loraplex.v1.AdapterAdmin/ListAdapters" in r.getMessage() and r.exc_info
               for r in caplog.records)
    monkeypatch.undo()
    assert client.list_adapters() and still_serves(client) is None


def test_deadline_and_client_cancel_stop_the_request_in_the_engine(server, client, monkeypatch):
    handles = capture_handles(server, monkeypatch)
    before = scrape(server)
    with pytest.raises(DeadlineExceededError):
        client.generate("", "the model", max_new_tokens=LONG, ignore_eos=True, timeout=0.3)
    stream = client.generate_stream("lo1", "the model", max_new_tokens=LONG, ignore_eos=True)
    next(stream)
    stream.close()  # the client goes away mid-stream
    for handle in handles:
        result = handle.result(WAIT)  # cancelled promptly: far fewer tokens than asked for
        assert result.finish_reason == "cancelled" and result.generated_tokens < LONG
    wait_until(lambda: server.server.engine.stats().running == 0, what="the batch to empty")

    def counted(adapter: str, code: str):
        return lambda: metric(scrape(server), "loraplex_requests_total", adapter=adapter, code=code) == \
            metric(before, "loraplex_requests_total", adapter=adapter, code=code) + 1

    wait_until(counted("__base__", "DEADLINE_EXCEEDED"), what="the deadline counted")
    wait_until(counted("lo1", "CANCELLED"), what="the cancel counted")
    after = scrape(server)
    assert metric(after, "loraplex_running_requests") == 0 and metric(after, "loraplex_queue_depth") == 0


# ---------------------------------------------------------------------- metrics and adapter admin
def test_metrics_move_as_requests_say(server, client, dirs):
    before = scrape(server)
    results = [client.generate("lo1", p, max_new_tokens=5, ignore_eos=True) for p in ("a", "the model", "ok ok ok")]
    client.generate("", "b", max_new_tokens=3, ignore_eos=True)
    with pytest.raises(NotFoundError):
        client.generate("no-such-task", "x")
    add(dirs, "m1")
    client.load_adapter("m1", "m1")  # no device slot is free: it waits on the host tier
    with pytest.raises(InvalidArgumentError):
        client.load_adapter("m1-broken", "corrupt" if (dirs.adapters / "corrupt").exists() else "ghost")
    assert client.generate("m1", "the model", max_new_tokens=2, ignore_eos=True).adapter == "m1"  # evicts one
    after = scrape(server)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("loraplex_requests_total", adapter="lo1", code="OK") == 3
    assert delta("loraplex_requests_total", adapter="__base__", code="OK") == 1
    assert delta("loraplex_requests_total", adapter="__other__", code="NOT_FOUND") == 1
    assert delta("loraplex_generated_tokens_total", adapter="lo1") == 15
    assert delta("loraplex_prompt_tokens_total", adapter="lo1") == sum(r.prompt_tokens for r in results)
    assert delta("loraplex_time_to_first_token_seconds_count", adapter="lo1") == 3
    assert delta("loraplex_request_duration_seconds_count", adapter="lo1") == 3
    assert delta("loraplex_time_per_output_token_seconds_count") == 5  # every OK request with > 1 token
    assert delta("loraplex_batch_size_count") >= 5 + 3 + 2
    assert delta("loraplex_adapter_loads_total", result="success") == 1
    assert delta("loraplex_adapter_loads_total", result="failure") == 1
    assert delta("loraplex_adapter_load_duration_seconds_count") == 2
    assert delta("loraplex_adapter_evictions_total") >= 1
    listed = client.list_adapters()
    wait_until(lambda: {r: metric(scrape(server), "loraplex_adapters", residency=r) for r in ("disk", "host", "device")}
               == {r: sum(a.residency == r for a in listed) for r in ("disk", "host", "device")}, what="adapter gauge")
    assert metric(after, "loraplex_queue_depth") == 0
    client.unload_adapter("m1")


def test_load_replace_and_unload_under_traffic_fail_nothing(server, client, dirs, reference):
    stop, failures, done = threading.Event(), [], []

    def traffic(offset: int, stream: bool) -> None:
        i = offset
        while not stop.is_set():
            task_id, prompt = STEADY[i % len(STEADY)]
            i += 1
            try:
                if stream:
                    chunks = list(client.generate_stream(task_id, prompt, max_new_tokens=8, ignore_eos=True))
                    ok = [t for c in chunks for t in c.token_ids] == reference(task_id, prompt).token_ids
                else:
                    ok = same(client.generate(task_id, prompt, max_new_tokens=8, ignore_eos=True),
                              reference(task_id, prompt))
                (done if ok else failures).append((task_id, prompt, "wrong output" if not ok else ""))
            except LoraplexError as err:
                failures.append((task_id, prompt, err))

    for task_id, prompt in STEADY:
        reference(task_id, prompt)  # computed before the traffic starts
    threads = [threading.Thread(target=traffic, args=(i, i % 2 == 1)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        client.load_adapter("lo3", add(dirs, "lo3"))
        first = client.generate("lo3", "the model", max_new_tokens=8, ignore_eos=True)
        info = client.load_adapter("lo3", add(dirs, "lo3b"), replace=True)  # a new version under the same name
        second = client.generate("lo3", "the model", max_new_tokens=8, ignore_eos=True)
        shutil.copytree(dirs.adapters / "lo1", dirs.adapters / "lo1-copy", dirs_exist_ok=True)
        client.load_adapter("lo1", "lo1-copy", replace=True)  # swap an adapter that requests are using right now
        reference.manager.load("lo3b", "lo3b")
        assert info.name == "lo3" and second.adapter == "lo3"
        assert second.token_ids == reference("lo3b", "the model").token_ids
        assert first.token_ids != second.token_ids
        client.unload_adapter("lo3")
        with pytest.raises(NotFoundError):
            client.generate("lo3", "the model")
        wait_until(lambda: len(done) >= 40, what="40 requests under traffic")
    finally:
        stop.set()
        for t in threads:
            t.join(WAIT)
    assert failures == []
    assert "lo3" not in {t.task_id for t in client.list_tasks()}


# ---------------------------------------------------------------------- limits, auth, TLS, draining
def test_queue_full_is_resource_exhausted(tmp_path):
    bg = start(options(max_batch_size=1, max_queued_requests=1))
    try:
        with Client(bg.address, timeout=WAIT) as c:
            running = c.generate_stream("", "the model", max_new_tokens=LONG, ignore_eos=True)
            next(running)
            queued = []
            waiter = threading.Thread(
                target=lambda: queued.append(c.generate("", "b", max_new_tokens=3, ignore_eos=True)))
            waiter.start()
            wait_until(lambda: bg.server.engine.stats().queue_depth == 1, what="a queued request")
            with pytest.raises(ResourceExhaustedError, match="queued"):
                c.generate("", "one too many")
            running.close()  # frees the slot: the queued request runs
            waiter.join(WAIT)
            assert queued and queued[0].generated_tokens == 3
            assert c.generate("", "after", max_new_tokens=2, ignore_eos=True).generated_tokens == 2
    finally:
        bg.stop(grace=0.0)


@pytest.fixture(scope="module")
def auth_server(dirs):
    bg = start(options(auth_token="s3cret-token", adapter_dir=str(dirs.adapters)))
    yield bg
    bg.stop(grace=0.0)


RPCS = {
    "Generate": lambda c: c.generate("", "x", max_new_tokens=1),
    "GenerateStream": lambda c: list(c.generate_stream("", "x", max_new_tokens=1)),
    "ListTasks": lambda c: c.list_tasks(),
    "ListAdapters": lambda c: c.list_adapters(),
    "LoadAdapter": lambda c: c.load_adapter("lo2", "lo2", replace=True),
    "UnloadAdapter": lambda c: c.unload_adapter("no-such-adapter"),
}


@pytest.mark.parametrize("rpc", RPCS)
def test_auth_guards_every_rpc_but_health(auth_server, rpc):
    for token in (None, "wrong-token", "s3cret-token-but-longer"):
        with Client(auth_server.address, token=token, timeout=WAIT) as c:
            with pytest.raises(UnauthenticatedError):
                RPCS[rpc](c)
            assert c.health()  # health checks need no token
    with Client(auth_server.address, token="s3cret-token", timeout=WAIT) as c:
        try:
            RPCS[rpc](c)
        except NotFoundError:  # UnloadAdapter of an unknown name: past auth
            assert rpc == "UnloadAdapter"


def test_auth_header_forms_and_env(auth_server, monkeypatch):
    def call(value: str):
        with grpc.insecure_channel(auth_server.address) as channel:
            stub = channel.unary_unary("/loraplex.v1.Generation/ListTasks")
            return stub(b"", metadata=(("authorization", value),), timeout=WAIT)

    assert pb.ListTasksResponse.FromString(call("bearer s3cret-token")).tasks  # the scheme is case-insensitive
    for value in ("Basic s3cret-token", "s3cret-token", "Bearer"):
        with pytest.raises(grpc.RpcError) as info:
            call(value)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    monkeypatch.setenv(AUTH_ENV, "from-env")
    assert token_from(None) == "from-env" and token_from("flag") == "flag"
    monkeypatch.setenv(AUTH_ENV, "")
    assert token_from(None) is None


def test_without_a_token_any_credentials_pass(server):
    with Client(server.address, token="anything", timeout=WAIT) as c:
        assert c.list_tasks()


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for localhost / 127.0.0.1, made now (cryptography, else the openssl CLI)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl CLI is available")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                               x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(private, hashes.SHA256()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert, key


def test_tls(tmp_path):
    cert, key = _self_signed(tmp_path)
    bg = start(options(tls_cert=str(cert), tls_key=str(key)))
    try:
        with Client(bg.address, root_certificates=cert, timeout=WAIT) as c:
            assert c.health() and c.generate("", "the model", max_new_tokens=3, ignore_eos=True).generated_tokens == 3
        with Client(bg.address, timeout=5) as plain, pytest.raises(UnavailableError):
            plain.list_tasks()
    finally:
        bg.stop(grace=0.0)


def test_drain_finishes_in_flight_requests_and_refuses_new_ones():
    bg = start(options())
    with Client(bg.address, timeout=WAIT) as c:
        in_flight = c.generate_stream("", "the model", max_new_tokens=600, ignore_eos=True)
        chunks = [next(in_flight)]
        stopping = bg.begin_stop(grace=WAIT)  # what SIGTERM does
        wait_until(lambda: c.health_status() == "NOT_SERVING", what="NOT_SERVING")
        with pytest.raises(UnavailableError, match="shutting down"):
            c.generate("", "too late")
        with pytest.raises(UnavailableError, match="shutting down"):
            c.list_adapters()
        chunks += list(in_flight)
        assert chunks[-1].finish_reason == "length" and sum(len(ch.token_ids) for ch in chunks) == 600
        stopping.result(WAIT)
    bg.stop()


def test_drain_past_the_grace_cancels_with_unavailable():
    bg = start(options())
    with Client(bg.address, timeout=WAIT) as c:
        in_flight = c.generate_stream("", "the model", max_new_tokens=LONG, ignore_eos=True)
        next(in_flight)
        stopping = bg.begin_stop(grace=0.2)
        with pytest.raises(UnavailableError, match="cancelled"):
            list(in_flight)
        stopping.result(WAIT)
    bg.stop()


def test_a_refused_request_is_counted_before_its_status_goes_out():
    """A client that scrapes /metrics right after its NOT_FOUND must find that request counted: the record is
    reported before the abort sends the status, and only once."""
    from loraplex.adapters import UnknownTaskError
    from loraplex.server.servicer import _abort_known, _RequestRecord

    counted = []
    record = _RequestRecord(SimpleNamespace(request_finished=lambda adapter, code, *rest: counted.append(code)))

    class Context:
        async def abort(self, code, details):
            assert counted == [grpc.StatusCode.NOT_FOUND], "the status went out before the request was counted"
            raise grpc.aio.AbortError()

    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(_abort_known(UnknownTaskError("unknown task id 'x'"), Context(), record))
    record.report()  # the RPC's end reports again: no second count
    assert counted == [grpc.StatusCode.NOT_FOUND]
