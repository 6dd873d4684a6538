"""The Python client SDK against an in-test fake servicer, over real gRPC on localhost.

The fake implements the generated servicer interfaces with scripted behaviour (task ids such as "missing"
or "busy" trigger the contract's status codes), so these tests pin the client: request building, result
conversion, error mapping, metadata, timeouts, streaming, cancellation, health and TLS. The real servicer
is tested against the same client elsewhere.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import loraplex_client
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
from loraplex_client.pb import loraplex_pb2 as pb
from loraplex_client.pb import loraplex_pb2_grpc as pb_grpc

TOKEN = "s3cret-token"
CLIENT_DIR = Path(__file__).resolve().parent.parent / "clients" / "python"


class FakeServer(pb_grpc.GenerationServicer, pb_grpc.AdapterAdminServicer):
    """Scripted behaviour by task id / adapter name; records every request with its metadata."""

    def __init__(self) -> None:
        self.seen: list[tuple[object, dict[str, str]]] = []
        self.stream_cancelled = threading.Event()

    def _admit(self, request: object, context: grpc.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata())
        self.seen.append((request, metadata))
        if metadata.get("authorization") != f"Bearer {TOKEN}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    def _check_generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> None:
        self._admit(request, context)
        if request.task_id in ("missing", "no-such-task"):
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown task_id {request.task_id!r}")
        if request.task_id == "busy":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full (8 waiting)")
        if request.params.temperature < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "temperature must be >= 0")
        if request.task_id == "boom":
            raise RuntimeError("unexpected")  # grpc turns this into UNKNOWN
        if request.task_id == "slow":
            deadline = time.monotonic() + 3.0
            while context.is_active() and time.monotonic() < deadline:
                time.sleep(0.01)

    @staticmethod
    def _tokens(request: pb.GenerateRequest) -> list[int]:
        return [ord(c) for c in request.prompt][: request.params.max_new_tokens or 8]

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        self._check_generate(request, context)
        tokens = self._tokens(request)
        return pb.GenerateResponse(
            text=request.prompt.upper(),
            token_ids=tokens,
            finish_reason=pb.FINISH_REASON_STOP if request.params.stop else pb.FINISH_REASON_LENGTH,
            prompt_tokens=len(request.prompt.split()),
            generated_tokens=len(tokens),
            adapter=request.task_id.split("/")[0],
        )

    def GenerateStream(self, request: pb.GenerateRequest, context: grpc.ServicerContext):
        self._check_generate(request, context)
        if request.task_id == "endless":  # runs until the client goes away (or 10 s)
            deadline = time.monotonic() + 10.0
            # Called when the RPC ends for any reason; before the deadline that can only be a cancellation.
            context.add_callback(lambda: time.monotonic() < deadline and self.stream_cancelled.set())
            while context.is_active() and time.monotonic() < deadline:
                yield pb.GenerateStreamResponse(text="x", token_ids=[120])
                time.sleep(0.01)
            return
        tokens = self._tokens(request)
        for i, token in enumerate(tokens):
            if request.task_id == "fail-midstream" and i == 1:
                context.abort(grpc.StatusCode.INTERNAL, "engine failed mid-stream")
            yield pb.GenerateStreamResponse(text=chr(token), token_ids=[token])
        yield pb.GenerateStreamResponse(
            finish_reason=pb.FINISH_REASON_EOS,
            prompt_tokens=len(request.prompt.split()),
            generated_tokens=len(tokens),
            adapter=request.task_id,
        )

    def ListTasks(self, request: pb.ListTasksRequest, context: grpc.ServicerContext) -> pb.ListTasksResponse:
        self._admit(request, context)
        return pb.ListTasksResponse(tasks=[
            pb.TaskInfo(task_id="sentiment", adapter="sentiment", adapter_type="lora"),
            pb.TaskInfo(task_id="mt/qa", adapter="mt", adapter_type="mtl_lora"),
        ])

    def _info(self, name: str) -> pb.AdapterInfo:
        return pb.AdapterInfo(name=name, adapter_type="lora", tasks=[name], rank=8, num_parameters=4096,
                              residency="host", nbytes=16384)

    def ListAdapters(self, request: pb.ListAdaptersRequest, context: grpc.ServicerContext) -> pb.ListAdaptersResponse:
        self._admit(request, context)
        return pb.ListAdaptersResponse(adapters=[self._info("sentiment")])

    def LoadAdapter(self, request: pb.LoadAdapterRequest, context: grpc.ServicerContext) -> pb.LoadAdapterResponse:
        self._admit(request, context)
        if request.path.startswith(".."):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "path outside the adapter directory")
        if request.path == "incompatible":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "hidden size 64 != base model's 32")
        if request.name == "sentiment" and not request.replace:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, "adapter 'sentiment' is loaded")
        return pb.LoadAdapterResponse(adapter=self._info(request.name), replaced=request.replace)

    def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context: grpc.ServicerContext):
        self._admit(request, context)
        if request.name != "sentiment":
            context.abort(grpc.StatusCode.NOT_FOUND, f"no adapter {request.name!r}")
        return pb.UnloadAdapterResponse()


def _start(fake: FakeServer, credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_GenerationServicer_to_server(fake, server)
    pb_grpc.add_AdapterAdminServicer_to_server(fake, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("loraplex.v1.Generation", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


@pytest.fixture(scope="module")
def fake_server():
    fake = FakeServer()
    server, port = _start(fake)
    yield fake, f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture
def fake(fake_server) -> FakeServer:
    fake_server[0].seen.clear()
    return fake_server[0]


@pytest.fixture
def client(fake_server):
    with Client(fake_server[1], token=TOKEN, timeout=5) as c:
        yield c


def test_generate_round_trip(client: Client, fake: FakeServer) -> None:
    r = client.generate("sentiment", "The film was", max_new_tokens=4, temperature=0.7, top_p=0.9, top_k=40,
                        seed=0, stop=["\n", "."], ignore_eos=True)
    assert (r.text, r.token_ids, r.finish_reason) == ("THE FILM WAS", [84, 104, 101, 32], "stop")
    assert (r.prompt_tokens, r.generated_tokens, r.adapter) == (3, 4, "sentiment")
    request, metadata = fake.seen[-1]
    assert metadata["authorization"] == f"Bearer {TOKEN}"
    p = request.params
    assert (request.task_id, request.prompt) == ("sentiment", "The film was")
    assert (p.max_new_tokens, p.top_k, p.ignore_eos) == (4, 40, True)
    assert p.temperature == pytest.approx(0.7) and p.top_p == pytest.approx(0.9)
    assert p.HasField("seed") and p.seed == 0 and list(p.stop) == ["\n", "."]


def test_generate_defaults_leave_seed_unset(client: Client, fake: FakeServer) -> None:
    r = client.generate("", "hi", stop=".")  # a lone stop string is accepted too
    assert r.finish_reason == "stop" and r.adapter == "" and r.token_ids == [104, 105]
    p = fake.seen[-1][0].params
    assert not p.HasField("seed")
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.ignore_eos, list(p.stop)) == (0, 0, 0, 0, False, ["."])


def test_generate_stream(client: Client) -> None:
    chunks = list(client.generate_stream("sentiment", "abc"))
    assert [c.text for c in chunks] == ["a", "b", "c", ""]
    assert [c.finish_reason for c in chunks] == [None, None, None, "eos"]
    assert sum((c.token_ids for c in chunks), []) == [97, 98, 99]
    assert (chunks[-1].prompt_tokens, chunks[-1].generated_tokens, chunks[-1].adapter) == (1, 3, "sentiment")


@pytest.mark.parametrize(
    ("task_id", "kwargs", "error", "code"),
    [
        ("missing", {}, NotFoundError, grpc.StatusCode.NOT_FOUND),
        ("busy", {}, ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("sentiment", {"temperature": -1.0}, InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
        ("boom", {}, LoraplexError, grpc.StatusCode.UNKNOWN),
    ],
)
def test_generate_errors_keep_their_code(client: Client, task_id, kwargs, error, code) -> None:
    with pytest.raises(error) as info:
        client.generate(task_id, "x", **kwargs)
    assert info.value.code == code and isinstance(info.value, LoraplexError)
    with pytest.raises(error) as info:  # the same through the stream, raised while iterating
        list(client.generate_stream(task_id, "x", **kwargs))
    assert info.value.code == code
    if code != grpc.StatusCode.UNKNOWN:
        assert info.value.details and info.value.details in str(info.value)


def test_builtin_bases() -> None:
    assert issubclass(NotFoundError, LookupError) and issubclass(InvalidArgumentError, ValueError)
    assert issubclass(DeadlineExceededError, TimeoutError) and issubclass(PermissionDeniedError, PermissionError)


def test_error_mid_stream_after_chunks(client: Client) -> None:
    got = []
    with pytest.raises(InternalError, match="mid-stream") as info:
        for chunk in client.generate_stream("fail-midstream", "abc"):
            got.append(chunk.text)
    assert got == ["a"] and info.value.code == grpc.StatusCode.INTERNAL


def test_request_refused_client_side_is_invalid_argument(client: Client, fake: FakeServer) -> None:
    with pytest.raises(InvalidArgumentError, match="not sent"):
        client.generate("sentiment", "x", max_new_tokens=-1)
    assert fake.seen == []


def test_missing_token_is_unauthenticated(fake_server) -> None:
    with Client(fake_server[1], timeout=5) as c:
        with pytest.raises(UnauthenticatedError) as info:
            c.generate("sentiment", "x")
    assert "authorization" not in fake_server[0].seen[-1][1]
    with Client(fake_server[1], token="wrong", timeout=5) as c, pytest.raises(UnauthenticatedError):
        c.list_tasks()
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_timeouts(client: Client, fake_server) -> None:
    start = time.monotonic()
    with pytest.raises(DeadlineExceededError) as info:
        client.generate("slow", "x", timeout=0.2)  # per-call timeout beats the client's 5 s
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - start < 2.0
    with Client(fake_server[1], token=TOKEN, timeout=0.2) as c, pytest.raises(DeadlineExceededError):
        c.generate("slow", "x")  # the client's default timeout
    with pytest.raises(DeadlineExceededError):
        list(client.generate_stream("slow", "x", timeout=0.2))


def test_leaving_a_stream_early_cancels_it(client: Client, fake: FakeServer) -> None:
    fake.stream_cancelled.clear()
    stream = client.generate_stream("endless", "x")
    for i, _chunk in enumerate(stream):
        if i == 2:
            break
    stream.close()  # what a for loop's end does once the generator is collected; explicit here
    assert fake.stream_cancelled.wait(timeout=5)


def test_listing_and_admin(client: Client) -> None:
    tasks = client.list_tasks()
    assert [(t.task_id, t.adapter, t.adapter_type) for t in tasks] == [
        ("sentiment", "sentiment", "lora"), ("mt/qa", "mt", "mtl_lora")]
    [info] = client.list_adapters()
    assert (info.name, info.tasks, info.rank, info.num_parameters, info.residency, info.nbytes) == (
        "sentiment", ["sentiment"], 8, 4096, "host", 16384)
    assert client.load_adapter("new", "new").name == "new"
    assert client.load_adapter("sentiment", "v2", replace=True).name == "sentiment"
    with pytest.raises(AlreadyExistsError):
        client.load_adapter("sentiment", "v2")
    with pytest.raises(PermissionDeniedError):
        client.load_adapter("evil", "../etc")
    with pytest.raises(FailedPreconditionError, match="hidden size"):
        client.load_adapter("other", "incompatible")
    assert client.unload_adapter("sentiment") is None
    with pytest.raises(NotFoundError):
        client.unload_adapter("nope")


def test_health(fake_server) -> None:
    with Client(fake_server[1], timeout=5) as c:  # health needs no token
        assert c.health() is True
        assert c.health_status("loraplex.v1.Generation") == "NOT_SERVING"
        assert c.health("loraplex.v1.Generation") is False
        with pytest.raises(NotFoundError):
            c.health("no.such.Service")
        c.wait_ready(timeout=5)
        with pytest.raises(DeadlineExceededError, match="not SERVING"):
            c.wait_ready(timeout=0.3, interval=0.05, service="loraplex.v1.Generation")


def test_unreachable_server_is_unavailable() -> None:
    with Client("127.0.0.1:1", timeout=5) as c, pytest.raises(UnavailableError) as info:
        c.health()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_closed_client_refuses_calls(fake_server) -> None:
    c = Client(fake_server[1], token=TOKEN, timeout=5)
    c.close()
    with pytest.raises((LoraplexError, ValueError)):
        c.list_tasks()


def test_constructor_checks_arguments() -> None:
    for kwargs in ({"timeout": 0}, {"token": ""}, {"token": "a\nb"}):
        with pytest.raises(ValueError):
            Client("127.0.0.1:1", **kwargs)
    with pytest.raises(ValueError):
        Client("")


def test_async_client(fake_server, fake: FakeServer) -> None:
    async def main() -> None:
        async with AsyncClient(fake_server[1], token=TOKEN, timeout=5) as c:
            r = await c.generate("mt/qa", "hello", max_new_tokens=2, seed=7)
            assert (r.text, r.token_ids, r.finish_reason, r.adapter) == ("HELLO", [104, 101], "length", "mt")
            assert fake.seen[-1][0].params.seed == 7 and fake.seen[-1][1]["authorization"] == f"Bearer {TOKEN}"
            chunks = [chunk async for chunk in c.generate_stream("sentiment", "ab")]
            assert [(ch.text, ch.finish_reason) for ch in chunks] == [("a", None), ("b", None), ("", "eos")]
            with pytest.raises(NotFoundError) as info:
                await c.generate("missing", "x")
            assert info.value.code == grpc.StatusCode.NOT_FOUND
            with pytest.raises(InternalError):
                async for _ in c.generate_stream("fail-midstream", "abc"):
                    pass
            with pytest.raises(DeadlineExceededError):
                await c.generate("slow", "x", timeout=0.2)
            assert [t.task_id for t in await c.list_tasks()] == ["sentiment", "mt/qa"]
            assert (await c.list_adapters())[0].residency == "host"
            assert (await c.load_adapter("new", "new")).name == "new"
            with pytest.raises(AlreadyExistsError):
                await c.load_adapter("sentiment", "v2")
            await c.unload_adapter("sentiment")
            assert await c.health() is True
            assert await c.health("loraplex.v1.Generation") is False
            await c.wait_ready(timeout=5)
        with pytest.raises(RuntimeError, match="closed"):
            await c.generate("sentiment", "x")
        async with AsyncClient(fake_server[1], timeout=5) as c:
            with pytest.raises(UnauthenticatedError):
                await c.list_adapters()

    asyncio.run(asyncio.wait_for(main(), timeout=30))


def test_async_stream_break_cancels(fake_server, fake: FakeServer) -> None:
    async def main() -> None:
        fake.stream_cancelled.clear()
        async with AsyncClient(fake_server[1], token=TOKEN, timeout=5) as c:
            stream = c.generate_stream("endless", "x")
            async for _ in stream:
                break
            await stream.aclose()
        assert await asyncio.to_thread(fake.stream_cancelled.wait, 5)

    asyncio.run(asyncio.wait_for(main(), timeout=30))


def _self_signed(tmp_path: Path) -> tuple[bytes, bytes]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )
    return key.read_bytes(), cert.read_bytes()


def test_tls_with_root_certificates(tmp_path: Path) -> None:
    key, cert = _self_signed(tmp_path)
    server, port = _start(FakeServer(), grpc.ssl_server_credentials([(key, cert)]))
    try:
        (tmp_path / "ca.pem").write_bytes(cert)
        with Client(f"localhost:{port}", token=TOKEN, timeout=5, root_certificates=tmp_path / "ca.pem") as c:
            assert c.generate("sentiment", "ok").text == "OK"
        with Client(f"localhost:{port}", token=TOKEN, timeout=5, root_certificates=cert) as c:
            assert c.health()
        with Client(f"localhost:{port}", timeout=5) as c, pytest.raises(UnavailableError):
            c.health()  # plaintext against a TLS port fails, it does not hang
    finally:
        server.stop(grace=None)


def test_readme_examples_run(fake_server, capsys) -> None:
    readme = (CLIENT_DIR / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(blocks) == 2
    for block in blocks:  # against the fake, which wants a token
        target = f"{fake_server[1]!r}, token={TOKEN!r}"
        code = block.replace('"127.0.0.1:50051", token=None', target).replace('"127.0.0.1:50051"', target)
        exec(compile(code, "<clients/python/README.md>", "exec"), {})
    out = capsys.readouterr().out
    assert "THE FILM WAS" in out and "StatusCode.NOT_FOUND unknown task_id 'no-such-task'" in out
    assert "ONCE UPON A TIME" in out


def test_client_package_needs_no_torch_nor_server() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; import loraplex_client, loraplex_client.pb.loraplex_pb2_grpc; "
        "bad = sorted(m for m, mod in sys.modules.items() "
        "             if mod is not None and m.split('.')[0] in ('torch', 'transformers', 'loraplex')); "
        "assert not bad, bad; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=CLIENT_DIR, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_client_distribution_depends_on_grpcio_and_protobuf_only() -> None:
    project = tomllib.loads((CLIENT_DIR / "pyproject.toml").read_text())["project"]
    assert project["name"] == "loraplex-client"
    names = {dep.split(">")[0].split("=")[0].split("<")[0].strip() for dep in project["dependencies"]}
    assert names == {"grpcio", "protobuf"}
    assert project["version"] == loraplex_client.__version__


# ---------------------------------------------------------------------- task affinity header
AFFINITY_IDS = ["sentiment", "mt/qa", "", "café 日本", "50%", " padded "]


def test_generate_calls_carry_the_task_id_for_affinity_routing(client: Client, fake: FakeServer) -> None:
    """Every Generate and GenerateStream carries `x-loraplex-task`, one distinct valid value per task id, so an
    L7 proxy hashing on it keeps each task on one replica; other calls do not carry it."""
    assert loraplex_client.TASK_HEADER == "x-loraplex-task"
    values = []
    for task_id in AFFINITY_IDS:
        client.generate(task_id, "ab")
        unary = fake.seen[-1][1]
        list(client.generate_stream(task_id, "ab"))
        streamed = fake.seen[-1][1]
        assert unary[loraplex_client.TASK_HEADER] == streamed[loraplex_client.TASK_HEADER]
        assert unary["authorization"] == f"Bearer {TOKEN}"  # the token still goes along
        values.append(unary[loraplex_client.TASK_HEADER])
    assert values[:3] == ["sentiment", "mt/qa", ""]  # plain ids go as they are, readable in proxy logs
    assert values[3:] == ["caf%C3%A9%20%E6%97%A5%E6%9C%AC", "50%25", "%20padded%20"]
    assert len(set(values)) == len(values)
    client.list_tasks()
    assert loraplex_client.TASK_HEADER not in fake.seen[-1][1]


def test_async_generate_calls_carry_the_task_id(fake_server, fake: FakeServer) -> None:
    async def main() -> list[tuple[str, str]]:
        got = []
        async with AsyncClient(fake_server[1], token=TOKEN, timeout=5) as c:
            for task_id in ("mt/qa", "café"):
                await c.generate(task_id, "ab")
                unary = fake.seen[-1][1][loraplex_client.TASK_HEADER]
                _ = [chunk async for chunk in c.generate_stream(task_id, "ab")]
                got.append((unary, fake.seen[-1][1][loraplex_client.TASK_HEADER]))
            await c.list_adapters()
            assert loraplex_client.TASK_HEADER not in fake.seen[-1][1]
        return got

    assert asyncio.run(asyncio.wait_for(main(), timeout=30)) == [("mt/qa", "mt/qa"), ("caf%C3%A9", "caf%C3%A9")]
