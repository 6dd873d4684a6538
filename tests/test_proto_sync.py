"""The checked-in generated gRPC code matches proto/, and the proto matches CONTRACT.md."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from loraplex_client.pb import loraplex_pb2 as pb
from loraplex_client.pb import loraplex_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("loraplex_proto_generate", ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _generator()


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.suffix in (".py", ".pyi")}


def test_checked_in_code_matches_a_fresh_generation(tmp_path: Path) -> None:
    gen.write(tmp_path)
    fresh, checked_in = _files(tmp_path), _files(gen.OUT_DIR)
    stale = sorted(name for name in fresh.keys() | checked_in.keys() if fresh.get(name) != checked_in.get(name))
    recorded = re.search(r"grpcio-tools (\S+?)\)", checked_in.get("__init__.py", b"").decode())
    hint = ""
    if recorded and recorded.group(1) != gen.tools_version():
        hint = (f" (the checked-in code was generated with grpcio-tools {recorded.group(1)}, this environment has "
                f"{gen.tools_version()}: install grpcio-tools=={recorded.group(1)} or regenerate and commit)")
    assert not stale, (f"generated code in {gen.OUT_DIR.relative_to(ROOT)} is out of date with proto/: {stale}; "
                       f"run `{gen.FIX_COMMAND}`{hint}")


def test_generated_files_say_do_not_edit() -> None:
    for name, data in _files(gen.OUT_DIR).items():
        head = data.decode().splitlines()[:2]
        assert any("DO NOT EDIT" in line for line in head), name


def test_generated_grpc_module_imports_its_sibling_relatively() -> None:
    text = (gen.OUT_DIR / "loraplex_pb2_grpc.py").read_text()
    assert "from . import loraplex_pb2" in text and "from loraplex" not in text
    assert pb.GenerateRequest.__module__ == "loraplex_client.pb.loraplex_pb2"  # so messages pickle


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def test_client_requirements_cover_the_generated_code() -> None:
    """The generated code refuses older grpcio/protobuf at import, so the client's lower bounds must match."""
    deps = tomllib.loads((ROOT / "clients/python/pyproject.toml").read_text())["project"]["dependencies"]
    bounds = {re.split(r"[<>=!~ ]", d)[0]: _version(d.split(">=")[1]) for d in deps}
    grpc_code = (gen.OUT_DIR / "loraplex_pb2_grpc.py").read_text()
    pb_code = (gen.OUT_DIR / "loraplex_pb2.py").read_text()
    grpc_needed = _version(re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", grpc_code).group(1))
    protobuf_needed = _version(re.search(r"Protobuf Python Version: (\S+)", pb_code).group(1))
    assert bounds["grpcio"] >= grpc_needed, f"clients/python/pyproject.toml: need grpcio>={grpc_needed}"
    assert bounds["protobuf"] >= protobuf_needed, f"clients/python/pyproject.toml: need protobuf>={protobuf_needed}"


SERVICES = {
    "Generation": {"Generate": ("GenerateRequest", "GenerateResponse", False),
                   "GenerateStream": ("GenerateRequest", "GenerateStreamResponse", True),
                   "ListTasks": ("ListTasksRequest", "ListTasksResponse", False)},
    "AdapterAdmin": {"LoadAdapter": ("LoadAdapterRequest", "LoadAdapterResponse", False),
                     "UnloadAdapter": ("UnloadAdapterRequest", "UnloadAdapterResponse", False),
                     "ListAdapters": ("ListAdaptersRequest", "ListAdaptersResponse", False)},
}

T = FieldDescriptor
# CONTRACT.md's fields: message -> {field: (type, repeated)}; messages may have more fields than these.
MESSAGES = {
    "GenerateRequest": {"task_id": (T.TYPE_STRING, False), "prompt": (T.TYPE_STRING, False),
                        "params": (T.TYPE_MESSAGE, False)},
    "GenerationParams": {"max_new_tokens": (T.TYPE_UINT32, False), "temperature": (T.TYPE_FLOAT, False),
                         "top_p": (T.TYPE_FLOAT, False), "top_k": (T.TYPE_UINT32, False),
                         "seed": (T.TYPE_UINT64, False), "stop": (T.TYPE_STRING, True),
                         "ignore_eos": (T.TYPE_BOOL, False)},
    "GenerateResponse": {"text": (T.TYPE_STRING, False), "token_ids": (T.TYPE_UINT32, True),
                         "finish_reason": (T.TYPE_ENUM, False), "prompt_tokens": (T.TYPE_UINT32, False),
                         "generated_tokens": (T.TYPE_UINT32, False), "adapter": (T.TYPE_STRING, False)},
    "GenerateStreamResponse": {"text": (T.TYPE_STRING, False), "token_ids": (T.TYPE_UINT32, True),
                               "finish_reason": (T.TYPE_ENUM, False)},
    "ListTasksRequest": {},
    "ListTasksResponse": {"tasks": (T.TYPE_MESSAGE, True)},
    "TaskInfo": {"task_id": (T.TYPE_STRING, False), "adapter": (T.TYPE_STRING, False),
                 "adapter_type": (T.TYPE_STRING, False)},
    "LoadAdapterRequest": {"name": (T.TYPE_STRING, False), "path": (T.TYPE_STRING, False),
                           "replace": (T.TYPE_BOOL, False)},
    "LoadAdapterResponse": {"adapter": (T.TYPE_MESSAGE, False)},
    "UnloadAdapterRequest": {"name": (T.TYPE_STRING, False)},
    "UnloadAdapterResponse": {},
    "ListAdaptersRequest": {},
    "ListAdaptersResponse": {"adapters": (T.TYPE_MESSAGE, True)},
    "AdapterInfo": {"name": (T.TYPE_STRING, False), "adapter_type": (T.TYPE_STRING, False),
                    "tasks": (T.TYPE_STRING, True), "rank": (T.TYPE_UINT32, False),
                    "num_parameters": (T.TYPE_UINT64, False), "residency": (T.TYPE_STRING, False)},
}


def test_services_match_the_contract() -> None:
    assert pb.DESCRIPTOR.package == "loraplex.v1" and pb.DESCRIPTOR.name == "loraplex/v1/loraplex.proto"
    for service_name, methods in SERVICES.items():
        service = pb.DESCRIPTOR.services_by_name[service_name]
        assert {m.name for m in service.methods} >= set(methods)
        for name, (request, response, streams) in methods.items():
            method = service.methods_by_name[name]
            assert (method.input_type.name, method.output_type.name) == (request, response)
            assert (method.client_streaming, method.server_streaming) == (False, streams)
        assert hasattr(pb_grpc, f"{service_name}Stub") and hasattr(pb_grpc, f"add_{service_name}Servicer_to_server")


@pytest.mark.parametrize("message", sorted(MESSAGES))
def test_messages_match_the_contract(message: str) -> None:
    descriptor = pb.DESCRIPTOR.message_types_by_name[message]
    for name, (type_, repeated) in MESSAGES[message].items():
        field = descriptor.fields_by_name[name]
        assert (field.type, field.is_repeated) == (type_, repeated), f"{message}.{name}"


def test_seed_is_optional_and_the_enum_is_complete() -> None:
    assert pb.GenerationParams.DESCRIPTOR.fields_by_name["seed"].has_presence
    assert not pb.GenerationParams().HasField("seed") and pb.GenerationParams(seed=0).HasField("seed")
    assert [v.name for v in pb.FinishReason.DESCRIPTOR.values] == [
        "FINISH_REASON_UNSPECIFIED", "FINISH_REASON_LENGTH", "FINISH_REASON_EOS", "FINISH_REASON_STOP"]
    assert pb.FINISH_REASON_UNSPECIFIED == 0
    info = pb.LoadAdapterResponse.DESCRIPTOR.fields_by_name["adapter"].message_type.name
    assert info == "AdapterInfo"
    assert pb.GenerateRequest.DESCRIPTOR.fields_by_name["params"].message_type.name == "GenerationParams"
