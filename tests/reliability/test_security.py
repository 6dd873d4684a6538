"""Security: token auth on every RPC, adapter paths confined to the adapter directory, pickles never loaded.

Two real servers: one started with a token, one without (its adapter directory holds the attacks below).
- Auth. The methods come from what the server registers (every generic handler's service, recorded at
  start-up, then every method of that service's descriptor: 10 methods of Generation, AdapterAdmin, Health
  and reflection). Each of the 7 guarded methods, with 21 wrong credentials (none, wrong token, 'Basic', other
  or no scheme, scheme glued to the token, token with a prefix or suffix, truncated, doubled, twice, other
  case, empty bearer, 'Bearer' alone, empty value, duplicated wrong headers, the token under 5 other metadata
  keys, one of them 'authorization-bin') and both an empty and an undecodable request body: 294 calls, all
  UNAUTHENTICATED (the body is never parsed), none reaching the engine or the adapter manager. Health answers
  without a token (Check, Watch, List); every
  method answers past auth with 'Bearer', 'bearer' and 'BEARER' + the token; reflection lists exactly the
  registered services; an 'Authorization' key never gets in; 8 method-path tricks get UNIMPLEMENTED.
- Paths. LoadAdapter of 25 hostile paths ('..', absolute outside, the directory itself, symlinked adapter
  directory, symlinked config or weights, a symlink to '..', a symlink loop, NUL bytes, 10 000-character and
  2 500-level paths, '~' with $HOME pointing at the outside adapter, file:/http: URLs, backslashes,
  percent-encoding): each INVALID_ARGUMENT or PERMISSION_DENIED, nothing loaded. An absolute path inside the
  directory loads that inside adapter. Files swapped after a load (adapter directory or weights replaced by a
  symlink out, weights rewritten in place) are refused at the re-read that eviction forces: 3 cases.
- Pickles. Weights whose unpickling would create a marker file (torch.save zip as adapter_model.bin, raw
  pickles as .pt and .pkl, a pickle named adapter_model.safetensors, a pickle next to valid safetensors), loaded
  through the start-up scan of --adapter-dir, LoadAdapter and loraplex.adapters.load_adapter, and a base
  model whose pytorch_model.bin is such a pickle through loraplex.server.loader.load_base: the marker is
  never created; pickled and corrupt files are INVALID_ARGUMENT with the reason, the safetensors next to a
  pickle loads. The payloads are checked to be live (unpickling them does create a marker).
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import grpc
import grpc.aio
import pytest
import torch
from families import make_adapter
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2
from servers import WAIT, options, peaky_lm, start, wait_until
from tiny import ARCHITECTURES

from loraplex.adapters import AdaptedModel, load_adapter
from loraplex.adapters.errors import AdapterFormatError
from loraplex.server.loader import ModelLoadError, load_base
from loraplex_client import (
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
)
from loraplex_client.pb import loraplex_pb2 as pb

Code = grpc.StatusCode
TOKEN = "s3cret-Token_42"
OPEN_SERVICES = {"grpc.health.v1.Health"}
GARBAGE = b"\xff\xff\xff\xff"  # not a valid message of any type: parsing it would fail


# ---------------------------------------------------------------------- raw calls
def raw_call(channel: grpc.Channel, method, payload: bytes, metadata=()) -> tuple[Code, list[bytes]]:
    """Call `method` (a MethodDescriptor) with raw bytes: (code, responses). A server stream is read up to its
    first message (Health/Watch never ends); a client stream sends the one payload."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    stub = kind[(method.client_streaming, method.server_streaming)](path)
    request = iter([payload]) if method.client_streaming else payload
    try:
        if not method.server_streaming:
            return Code.OK, [stub(request, metadata=metadata, timeout=WAIT)]
        responses = stub(request, metadata=metadata, timeout=WAIT)
        try:
            return Code.OK, [next(responses)]
        finally:
            responses.cancel()
    except StopIteration:
        return Code.OK, []
    except grpc.RpcError as err:
        return err.code(), []


# ---------------------------------------------------------------------- (a) auth
@pytest.fixture(scope="module")
def auth(tmp_path_factory):
    """A server with TOKEN, and the services it registered (recorded from grpc.aio.server's handlers)."""
    adapters = tmp_path_factory.mktemp("auth") / "adapters"
    make_adapter("lora", AdaptedModel(peaky_lm()), "llama", "lo1", adapters, seed=1)
    registered: list[str] = []
    make_server = grpc.aio.server

    def recording_server(*args, **kwargs):
        server = make_server(*args, **kwargs)
        add = server.add_generic_rpc_handlers

        def add_recorded(handlers):
            registered.extend(h.service_name() for h in handlers)
            return add(handlers)

        server.add_generic_rpc_handlers = add_recorded
        return server

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(grpc.aio, "server", recording_server)
        bg = start(options(auth_token=TOKEN, adapter_dir=str(adapters), max_seq_len=64, max_new_tokens_limit=4))
    pool = descriptor_pool.Default()
    methods = [m for name in registered for m in pool.FindServiceByName(name).methods]
    channel = grpc.insecure_channel(bg.address)
    yield SimpleNamespace(bg=bg, channel=channel, services=registered, methods=methods)
    channel.close()
    bg.stop(grace=0.0)


def bearer(value: str) -> tuple:
    return (("authorization", value),)


WRONG = {
    "none": (),
    "wrong token": bearer("Bearer wrong-token"),
    "Basic scheme": bearer(f"Basic {TOKEN}"),
    "no scheme": bearer(TOKEN),
    "other scheme": bearer(f"Token {TOKEN}"),
    "glued scheme": bearer(f"Bearer{TOKEN}"),
    "suffix": bearer(f"Bearer {TOKEN}x"),
    "prefix": bearer(f"Bearer x{TOKEN}"),
    "truncated": bearer(f"Bearer {TOKEN[:-1]}"),
    "doubled": bearer(f"Bearer {TOKEN}{TOKEN}"),
    "twice, spaced": bearer(f"Bearer {TOKEN} {TOKEN}"),
    "other case": bearer(f"Bearer {TOKEN.upper()}"),
    "empty bearer": bearer("Bearer "),
    "bearer only": bearer("Bearer"),
    "empty value": bearer(""),
    "duplicated, both wrong": (("authorization", "Bearer a"), ("authorization", f"Basic {TOKEN}")),
    "x-authorization": (("x-authorization", f"Bearer {TOKEN}"),),
    "proxy-authorization": (("proxy-authorization", f"Bearer {TOKEN}"),),
    "token key": (("token", TOKEN),),
    "bearer key": (("bearer", TOKEN),),
    "authorization-bin": (("authorization-bin", f"Bearer {TOKEN}".encode()),),
}
RIGHT = [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER {TOKEN}"]


def guarded(methods) -> list:
    return [m for m in methods if m.containing_service.full_name not in OPEN_SERVICES]


def test_the_server_registers_what_reflection_lists(auth):
    assert set(auth.services) == {"loraplex.v1.Generation", "loraplex.v1.AdapterAdmin", "grpc.health.v1.Health",
                                  "grpc.reflection.v1alpha.ServerReflection"}
    assert len(auth.methods) == 10 and len(guarded(auth.methods)) == 7
    info = next(m for m in auth.methods if m.name == "ServerReflectionInfo")
    code, responses = raw_call(auth.channel, info, reflection_pb2.ServerReflectionRequest(list_services="")
                               .SerializeToString(), bearer(RIGHT[0]))
    assert code == Code.OK and len(responses) == 1
    listed = reflection_pb2.ServerReflectionResponse.FromString(responses[0]).list_services_response.service
    assert {s.name for s in listed} == set(auth.services)


@pytest.mark.parametrize("credentials", WRONG, ids=list(WRONG))
def test_wrong_credentials_are_refused_on_every_method_before_parsing(auth, credentials, monkeypatch):
    server = auth.bg.server
    reached: list[str] = []
    for target, name in [(server.engine, "submit"), (server.manager, "load"), (server.manager, "unload"),
                         (server.manager, "list_adapters"), (server.manager, "task_routes")]:
        monkeypatch.setattr(target, name, lambda *a, _name=name, **k: reached.append(_name))
    for method in guarded(auth.methods):
        for payload in (b"", GARBAGE):
            code, _ = raw_call(auth.channel, method, payload, WRONG[credentials])
            assert code == Code.UNAUTHENTICATED, (method.full_name, payload)
    assert reached == []  # no servicer code ran
    for method in auth.methods:
        if method.containing_service.full_name in OPEN_SERVICES:  # health needs no token, whatever is sent
            code, _ = raw_call(auth.channel, method, b"", WRONG[credentials])
            assert code == Code.OK, (method.full_name, code)


def test_the_right_token_opens_every_method(auth):
    for value in RIGHT:
        for method in auth.methods:
            code, _ = raw_call(auth.channel, method, b"", bearer(value))
            assert code != Code.UNAUTHENTICATED, (value, method.full_name)
            if method.name in ("LoadAdapter", "UnloadAdapter"):  # empty name / path: refused past auth
                assert code in (Code.INVALID_ARGUMENT, Code.NOT_FOUND), (value, method.full_name, code)
            else:
                assert code == Code.OK, (value, method.full_name, code)
    with Client(auth.bg.address, token=TOKEN, timeout=WAIT) as c:
        assert [a.name for a in c.list_adapters()] == ["lo1"]
        assert c.generate("lo1", "the model", max_new_tokens=2, ignore_eos=True).generated_tokens == 2


def test_refused_admin_calls_change_nothing(auth):
    unload = next(m for m in auth.methods if m.name == "UnloadAdapter")
    load = next(m for m in auth.methods if m.name == "LoadAdapter")
    for credentials in WRONG.values():
        assert raw_call(auth.channel, unload, pb.UnloadAdapterRequest(name="lo1").SerializeToString(),
                        credentials)[0] == Code.UNAUTHENTICATED
        assert raw_call(auth.channel, load, pb.LoadAdapterRequest(name="x", path="lo1").SerializeToString(),
                        credentials)[0] == Code.UNAUTHENTICATED
    assert [a.name for a in auth.bg.server.manager.list_adapters()] == ["lo1"]


def test_header_name_case_and_method_path_tricks_never_get_in(auth):
    list_tasks = next(m for m in auth.methods if m.name == "ListTasks")
    # HTTP/2 header names are lowercase: the client library refuses to send this one (INTERNAL, locally)
    assert raw_call(auth.channel, list_tasks, b"", (("Authorization", f"Bearer {TOKEN}"),))[0] != Code.OK
    for path in ["/grpc.health.v1.Health/../loraplex.v1.Generation/ListTasks",
                 "/grpc.health.v1.Health/loraplex.v1.Generation/ListTasks",
                 "/grpc.health.v1.Health//loraplex.v1.AdapterAdmin/UnloadAdapter",
                 "/grpc.health.v1.Health/ListTasks", "/loraplex.v1.Generation/ListTasks/",
                 "/loraplex.v1.generation/ListTasks", "//loraplex.v1.Generation/ListTasks",
                 "/loraplex.v1.Generation/ListTasks\x00"]:
        try:
            auth.channel.unary_unary(path)(b"", timeout=WAIT)
            code = Code.OK
        except grpc.RpcError as err:
            code = err.code()
        assert code == Code.UNIMPLEMENTED, (path, code)


# ---------------------------------------------------------------------- (b) paths, (c) pickles
class Trap:
    """Unpickling this creates `marker` (open(marker, 'w')): proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


PICKLED = {  # directory: (weights file name, how the trap is written)
    "pickled-bin": ("adapter_model.bin", "torch"),
    "pickled-pt": ("adapter_model.pt", "pickle"),
    "pickled-pkl": ("adapter_model.pkl", "pickle"),
    "pickle-named-safetensors": ("adapter_model.safetensors", "pickle"),
}


def write_trap(path: Path, how: str, marker: Path) -> None:
    if how == "torch":
        torch.save({"base_model.model.layers.0.q_proj.lora_A.weight": Trap(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Trap(marker)))


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    """adapters/ (the server's directory): lo1, pickled adapters, a safetensors adapter next to a pickle, and
    symlinks out; outside/: the adapter `evil` that must never be served. Started after all is in place, so
    that the start-up scan meets every attack too."""
    root = tmp_path_factory.mktemp("box")
    adapters, outside, marker = root / "adapters", root / "outside", root / "PWNED"
    adapted = AdaptedModel(peaky_lm())
    make_adapter("lora", adapted, "llama", "lo1", adapters, seed=1)
    make_adapter("lora", adapted, "llama", "evil", outside, seed=7)
    make_adapter("lora", adapted, "llama", "beside-pickle", adapters, seed=2)
    write_trap(adapters / "beside-pickle" / "adapter_model.bin", "torch", marker)
    for name, (weights, how) in PICKLED.items():
        (adapters / name).mkdir()
        shutil.copy(adapters / "lo1" / "adapter_config.json", adapters / name)
        write_trap(adapters / name / weights, how, marker)
    (adapters / "escape").symlink_to(outside / "evil")
    (adapters / "up").symlink_to(root)
    (adapters / "loop").symlink_to(adapters / "loop")
    for name, linked in [("config-link", "adapter_config.json"), ("weights-link", "adapter_model.safetensors")]:
        shutil.copytree(adapters / "lo1", adapters / name)
        (adapters / name / linked).unlink()
        (adapters / name / linked).symlink_to(outside / "evil" / linked)
    bg = start(options(adapter_dir=str(adapters), device_adapters=1, host_adapters=1, max_seq_len=64,
                       max_new_tokens_limit=8))
    client = Client(bg.address, timeout=WAIT)
    yield SimpleNamespace(bg=bg, client=client, root=root, adapters=adapters, outside=outside, marker=marker)
    client.close()
    bg.stop(grace=0.0)


SERVED_AT_START = {"beside-pickle", "lo1"}


def served(box) -> set[str]:
    return {a.name for a in box.client.list_adapters()}


def test_the_traps_are_live(tmp_path):
    """Without this, 'the marker was never created' would prove nothing."""
    for how, load in [("pickle", lambda p: pickle.loads(p.read_bytes())),
                      ("torch", lambda p: torch.load(p, weights_only=False))]:
        marker = tmp_path / f"live-{how}"
        write_trap(tmp_path / f"trap-{how}", how, marker)
        load(tmp_path / f"trap-{how}")
        assert marker.exists()


def test_the_start_up_scan_refuses_pickles_and_links_out(box):
    errors = {name: str(err) for name, err in box.bg.server.manager.load_errors.items()}
    assert served(box) == SERVED_AT_START  # the safetensors next to a pickle loads; nothing else does
    for name in ("pickled-bin", "pickled-pt", "pickled-pkl"):
        assert "pickled" in errors[name] and "never loaded" in errors[name], errors[name]
    assert "corrupt" in errors["pickle-named-safetensors"]
    for name in ("escape", "up", "config-link", "weights-link"):
        assert "outside the adapter directory" in errors[name] or "invalid" in errors[name], (name, errors[name])
    assert not box.marker.exists()


ATTACKS = [  # (id, path): {inside} and {outside} are the two directories
    ("dotdot", "../outside/evil"), ("dotdot through an adapter", "lo1/../../outside/evil"), ("dotdot alone", ".."),
    ("absolute outside", "{outside}/evil"), ("absolute root", "/"), ("absolute /etc", "/etc"),
    ("the directory itself", ""), ("dot", "."), ("the directory, absolute", "{inside}"),
    ("symlinked adapter directory", "escape"), ("symlink to the parent", "up/outside/evil"),
    ("symlinked config", "config-link"), ("symlinked weights", "weights-link"), ("symlink loop", "loop"),
    ("NUL", "lo1\x00/../../outside/evil"), ("NUL alone", "\x00"), ("very long", "a" * 10_000),
    ("very deep", "a/" * 2_500), ("home", "~/evil"), ("other home", "~root"),
    ("file URL", "file://{outside}/evil"), ("file URL, relative", "file:../outside/evil"),
    ("http URL", "http://127.0.0.1:9/evil"), ("backslashes", "..\\outside\\evil"), ("percent", "%2e%2e/outside/evil"),
]


@pytest.mark.parametrize("path", [a[1] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_load_adapter_cannot_read_outside_the_directory(box, path, monkeypatch):
    monkeypatch.setenv("HOME", str(box.outside))  # '~/evil' would be the outside adapter if '~' were expanded
    path = path.replace("{inside}", str(box.adapters)).replace("{outside}", str(box.outside))
    with pytest.raises((InvalidArgumentError, PermissionDeniedError)) as refused:
        box.client.load_adapter("x", path)
    if isinstance(refused.value, PermissionDeniedError):
        assert "outside the adapter directory" in refused.value.details or "invalid" in refused.value.details
    assert served(box) == SERVED_AT_START and not box.marker.exists()


def test_an_absolute_path_inside_the_directory_loads_that_adapter(box):
    info = box.client.load_adapter("abs", str(box.adapters / "lo1"))
    try:
        assert (info.name, info.adapter_type) == ("abs", "lora")
        ours = box.client.generate("lo1", "the model", max_new_tokens=8, ignore_eos=True).token_ids
        assert box.client.generate("abs", "the model", max_new_tokens=8, ignore_eos=True).token_ids == ours
    finally:
        box.client.unload_adapter("abs")


def _symlink_directory_out(directory: Path, box) -> None:
    directory.rename(box.root / f"moved-{directory.name}")
    directory.symlink_to(box.outside / "evil")


def _symlink_weights_out(directory: Path, box) -> None:
    (directory / "adapter_model.safetensors").unlink()
    (directory / "adapter_model.safetensors").symlink_to(box.outside / "evil" / "adapter_model.safetensors")


def _rewrite_weights(directory: Path, box) -> None:
    shutil.copy(box.outside / "evil" / "adapter_model.safetensors", directory / "adapter_model.safetensors")


@pytest.mark.parametrize("swap, words", [(_symlink_directory_out, "outside the adapter directory"),
                                         (_symlink_weights_out, "outside the adapter directory"),
                                         (_rewrite_weights, "changed on disk")],
                         ids=["directory symlinked out", "weights symlinked out", "weights rewritten"])
def test_files_swapped_after_a_load_are_refused_at_the_reload(box, swap, words, monkeypatch):
    name = f"swap-{swap.__name__.strip('_')}"
    shutil.copytree(box.adapters / "lo1", box.adapters / name)
    box.client.load_adapter(name, name)
    box.client.generate(name, "the model", max_new_tokens=2)

    def evicted() -> bool:  # one device slot and one host slot: serving the others pushes `name` to disk
        for other in SERVED_AT_START:
            box.client.generate(other, "b", max_new_tokens=1)
        return {a.name: a.residency for a in box.client.list_adapters()}[name] == "disk"

    try:
        wait_until(evicted, what=f"{name} evicted to disk")
        swap(box.adapters / name, box)
        monkeypatch.setattr(box.bg.server.manager, "retry_failed_after", 0.0)  # each request reads again
        for _ in range(2):
            with pytest.raises((FailedPreconditionError, PermissionDeniedError, InvalidArgumentError)) as refused:
                box.client.generate(name, "the model", max_new_tokens=8, ignore_eos=True)
            assert words in refused.value.details
    finally:
        box.client.unload_adapter(name)
    assert not box.marker.exists()


@pytest.mark.parametrize("name", sorted(PICKLED))
def test_pickled_weights_are_never_unpickled(box, name):
    words = "corrupt" if name == "pickle-named-safetensors" else "pickled"
    with pytest.raises(InvalidArgumentError, match=words):
        box.client.load_adapter("y", name)
    with pytest.raises(AdapterFormatError, match=words):
        load_adapter(box.adapters / name)
    assert served(box) == SERVED_AT_START and not box.marker.exists()


def test_safetensors_next_to_a_pickle_load_without_the_pickle(box):
    assert load_adapter(box.adapters / "beside-pickle").adapter_type == "lora"
    info = box.client.load_adapter("beside-again", "beside-pickle")
    try:
        got = box.client.generate("beside-again", "the model", max_new_tokens=8, ignore_eos=True)
        assert got.token_ids == box.client.generate("beside-pickle", "the model", max_new_tokens=8,
                                                    ignore_eos=True).token_ids
        assert info.adapter_type == "lora" and not box.marker.exists()
    finally:
        box.client.unload_adapter("beside-again")


def test_a_pickled_base_model_is_not_unpickled(tmp_path):
    """`loraplex serve --base-model` and `loraplex train` read the base model with transformers, which loads a
    pytorch_model.bin with torch.load(weights_only=True): the trap is refused, not run."""
    ARCHITECTURES["llama"]().save_pretrained(tmp_path)
    marker = tmp_path / "PWNED"
    write_trap(tmp_path / "pytorch_model.bin", "torch", marker)
    with pytest.raises(ModelLoadError, match="weights"):
        load_base(str(tmp_path), device="cpu")
    assert not marker.exists()
    assert not os.path.exists(tmp_path / "model.safetensors")
