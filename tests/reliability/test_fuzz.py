"""Fuzzing the real gRPC API of a started server with random and hostile input (hypothesis, derandomized).

One server (max_seq_len 64, max_new_tokens_limit 8, adapters `lo1` (LoRA) and `mt` (MTL-LoRA: alpha, beta,
gamma)) takes, one request at a time, through a plain grpc channel:
- Generate, 300 random examples plus 119 explicit ones (each listed extreme alone), and GenerateStream, 120:
  task ids (served ones, unicode, control characters, NUL, '/', '..', empty, up to 100 000 characters), prompts
  (unicode, emoji, NUL, combining characters, BOM, up to 200 000 characters: far beyond the 63-token limit),
  and every GenerationParams field at its extremes (max_new_tokens 0..2^32-1; temperature and top_p negative,
  NaN, +-inf, subnormal, huge; top_k 0..2^32-1; seed unset or 0..2^64-1; stop lists with empty, NUL,
  256/257-character and up to 20 strings; ignore_eos), up to three hostile fields on a served request.
  Each answer must be exactly the status a model of CONTRACT.md predicts from the request as the server
  decodes it (NOT_FOUND for an unknown task id, INVALID_ARGUMENT naming the bad parameter (NaN, inf and
  negative values included), else OK), and an OK answer must be consistent (token counts, finish reason,
  prompt tokens, adapter, stream deltas summing to the result);
- raw request bytes, 250 examples over the 6 loraplex methods: random bytes, valid and mutated valid messages,
  18 hand-made malformed encodings (bad wire types, truncated lengths, invalid UTF-8, deep group nesting).
  Bytes that do not parse must be INVALID_ARGUMENT; bytes that parse must get what the decoded message gets;
- LoadAdapter, 200 examples of random and hostile names and paths (38 listed: '..', absolute inside and
  outside, NUL, '~', URLs, very long, symlinks out of the directory, a symlink loop), each answer one of the
  codes documented for it, a bad name INVALID_ARGUMENT, never a load from outside the good adapter
  directories; UnloadAdapter, 100 random names: NOT_FOUND (OK for a served one, which is then reloaded);
- a 200 000-character prompt is tokenized off the event loop (health checks and ListTasks answer meanwhile);
  a prompt over gRPC's 4 MiB message limit is RESOURCE_EXHAUSTED;
- tiny positive temperatures (1e-45 .. 1e-8): sampling degenerates to greedy decoding, not to garbage.
INTERNAL or UNKNOWN is never acceptable. After each run the server still answers a normal request exactly
as before the run, and the engine is idle (nothing queued or running, no KV slot held).
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from families import make_adapter
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from servers import WAIT, options, peaky_lm, start, wait_until
from tokenizer import build_tokenizer

from loraplex.adapters import AdaptedModel
from loraplex.adapters.base import check_name
from loraplex.adapters.errors import AdapterFormatError
from loraplex_client import Client
from loraplex_client.pb import loraplex_pb2 as pb

Code = grpc.StatusCode
MAX_SEQ_LEN, MAX_NEW_LIMIT = 64, 8
MAX_PROMPT = MAX_SEQ_LEN - 1
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256
EOS = 1
ROUTES = {"": "", "lo1": "lo1", **{t: "mt" for t in ("alpha", "beta", "gamma", "mt/alpha", "mt/beta", "mt/gamma")}}
ADAPTERS = {"lo1", "mt"}
RPC_TIMEOUT = 10.0


def fuzz_settings(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.large_base_example])


# ---------------------------------------------------------------------- the server under test
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A started server over adapters/{lo1, mt}; spare/ and outside/ hold adapters that it does not serve."""
    root = tmp_path_factory.mktemp("fuzz")
    adapters, outside = root / "adapters", root / "outside"
    adapted = AdaptedModel(peaky_lm())
    for kind, name, seed, where in [("lora", "lo1", 1, adapters), ("mtl_lora", "mt", 2, adapters),
                                    ("lora", "spare", 3, root), ("lora", "evil", 4, outside)]:
        make_adapter(kind, adapted, "llama", name, where, seed=seed)
    bg = start(options(adapter_dir=str(adapters), max_seq_len=MAX_SEQ_LEN, max_new_tokens_limit=MAX_NEW_LIMIT,
                       max_batch_size=4))
    # after the start-up scan: a spare adapter to load, a nested one, and ways out of the directory
    shutil.copytree(root / "spare", adapters / "spare")
    shutil.copytree(root / "spare", adapters / "nested" / "deep")
    (adapters / "escape").symlink_to(outside / "evil")
    (adapters / "loop").symlink_to(adapters / "loop")
    channel = grpc.insecure_channel(bg.address)
    client = Client(bg.address, timeout=WAIT)
    baseline = [client.generate(t, "the model", max_new_tokens=8, ignore_eos=True) for t in ("", "lo1", "mt/beta")]
    yield SimpleNamespace(bg=bg, channel=channel, client=client, adapters=adapters, outside=outside,
                          baseline=baseline, tokenizer=copy.deepcopy(build_tokenizer()))
    client.close()
    channel.close()
    bg.stop(grace=1.0)


def still_serves_and_idle(env) -> None:
    """The same answers as before the fuzzing, nothing left in the engine, and the same adapters."""
    again = [env.client.generate(t, "the model", max_new_tokens=8, ignore_eos=True) for t in ("", "lo1", "mt/beta")]
    assert [(r.token_ids, r.text, r.adapter) for r in again] == \
        [(r.token_ids, r.text, r.adapter) for r in env.baseline]
    engine = env.bg.server.engine
    wait_until(lambda: (engine.stats().queue_depth, engine.stats().running, engine.stats().slots_used) == (0, 0, 0),
               what="an idle engine")
    assert {a.name for a in env.client.list_adapters()} == ADAPTERS
    assert env.client.health()


def call(env, method: str, payload: bytes, stream: bool = False) -> tuple[Code, str, list[bytes]]:
    """One raw call: (status code, details, response messages)."""
    path = f"/loraplex.v1.{'AdapterAdmin' if 'Adapter' in method else 'Generation'}/{method}"
    try:
        if stream:
            messages = list(env.channel.unary_stream(path)(payload, timeout=RPC_TIMEOUT))
        else:
            messages = [env.channel.unary_unary(path)(payload, timeout=RPC_TIMEOUT)]
    except grpc.RpcError as err:
        return err.code(), err.details() or "", []
    return Code.OK, "", messages


# ---------------------------------------------------------------------- a model of the contract
def predict(env, request: pb.GenerateRequest) -> tuple[Code, str, int]:
    """(code, a word its details must contain, tokens an OK answer may generate at most) for a decoded request,
    in the engine's order of checks: task id, sampling parameters, stop strings, prompt, max_new_tokens."""
    p = request.params
    if request.task_id not in ROUTES:
        return Code.NOT_FOUND, "unknown task id", 0
    if not (math.isfinite(p.temperature) and p.temperature >= 0):
        return Code.INVALID_ARGUMENT, "temperature", 0
    if not 0.0 <= p.top_p <= 1.0:
        return Code.INVALID_ARGUMENT, "top_p", 0
    if "" in p.stop or len(p.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in p.stop):
        return Code.INVALID_ARGUMENT, "stop", 0
    prompt_tokens = prompt_length(env, request.prompt)
    if prompt_tokens > MAX_PROMPT:
        return Code.INVALID_ARGUMENT, "prompt", 0
    room = MAX_SEQ_LEN - prompt_tokens
    if p.max_new_tokens > MAX_NEW_LIMIT or p.max_new_tokens > room:
        return Code.INVALID_ARGUMENT, "max_new_tokens", 0
    return Code.OK, "", p.max_new_tokens or min(MAX_NEW_LIMIT, room)


def prompt_length(env, prompt: str) -> int:
    """Prompt tokens as the server counts them (a lower bound past 8 KiB, where tokenizing would be slow)."""
    if len(prompt.encode()) > 8192:  # no token of the test tokenizer is longer than 7 bytes: > 1000 tokens
        return 1000
    return max(1, len(env.tokenizer(prompt)["input_ids"]))  # an empty prompt is the BOS token


def check_ok(env, request: pb.GenerateRequest, max_new: int, result: pb.GenerateResponse) -> None:
    p = request.params
    assert len(result.token_ids) == result.generated_tokens <= max_new
    assert result.prompt_tokens == prompt_length(env, request.prompt)
    assert result.adapter == ROUTES[request.task_id]
    if result.finish_reason == pb.FINISH_REASON_LENGTH:
        assert result.generated_tokens == max_new
    elif result.finish_reason == pb.FINISH_REASON_EOS:
        assert not p.ignore_eos and result.token_ids[-1] == EOS
    else:
        assert result.finish_reason == pb.FINISH_REASON_STOP and p.stop
    assert not any(s in result.text for s in p.stop)  # the text ends before the first stop string
    if p.ignore_eos and not p.stop:
        assert result.finish_reason == pb.FINISH_REASON_LENGTH


def check_generate(env, request: pb.GenerateRequest, code: Code, details: str, messages: list[bytes],
                   stream: bool) -> None:
    want, word, max_new = predict(env, request)
    assert code == want, (request, code, details)
    if code != Code.OK:
        assert word in details and len(details) <= 1024, (word, details)
        return
    if not stream:
        check_ok(env, request, max_new, pb.GenerateResponse.FromString(messages[0]))
        return
    chunks = [pb.GenerateStreamResponse.FromString(m) for m in messages]
    assert chunks and all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    last = chunks[-1]
    merged = pb.GenerateResponse(text="".join(c.text for c in chunks), finish_reason=last.finish_reason,
                                 token_ids=[t for c in chunks for t in c.token_ids], prompt_tokens=last.prompt_tokens,
                                 generated_tokens=last.generated_tokens, adapter=last.adapter)
    check_ok(env, request, max_new, merged)


# ---------------------------------------------------------------------- strategies
HOSTILE_IDS = ["", "/", "//", "..", ".", "../lo1", "lo1/", "/lo1", "lo1/..", "mt/", "/mt/alpha", "mt//alpha",
               "mt/alpha/", "mt/../lo1", "mt/alpha/beta", "LO1", "Lo1", "lo1 ", " lo1", "lo1\n", "lo1\x00", "\x00",
               "\u202elo1", "ｌｏ１", "lo\u0301", "lo1\u200b", "%2e%2e", "..\\lo1", "mt\\alpha", "__base__", "__other__",
               "🙂", "\ufeff", "\U0010ffff"]
HOSTILE_PROMPTS = ["", "\x00", "\x00" * 40, "e\u0301" * 20, "\u0301" * 30, "🙂" * 10, "👩‍👩‍👧‍👦", "\ufeff the model",
                   "\u202e model", "<s></s><pad>", "</s>" * 5, "\r\n\t", "the " * 70, "日本語" * 5, "\U0010ffff\ufffd"]
FLOAT_EXTREMES = [0.0, -0.0, 1e-45, -1e-45, 1e-40, 1e-30, 0.5, 1.0, 1.0000001, 2.0, 1e30, 3.4e38, -1.0, -3.4e38,
                  math.inf, -math.inf, math.nan]
UINT32_EXTREMES = [0, 1, MAX_NEW_LIMIT, MAX_NEW_LIMIT + 1, MAX_SEQ_LEN, 319, 320, 321, 2**31 - 1, 2**31, 2**32 - 1]
SEED_EXTREMES = [0, 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1]

long_text = st.builds(lambda part, n: part * n, st.sampled_from(["x", "🙂", "\x00", "the ", "e\u0301", "/.."]),
                      st.integers(300, 100_000))
task_ids = st.one_of(st.sampled_from(sorted(ROUTES)), st.sampled_from(HOSTILE_IDS), st.text(max_size=12), long_text)
prompts = st.one_of(st.text(max_size=16), st.text(st.characters(codec="ascii"), max_size=60),
                    st.sampled_from(HOSTILE_PROMPTS), long_text.map(lambda s: s * 2))
floats = st.one_of(st.sampled_from(FLOAT_EXTREMES), st.floats(width=32), st.floats(0.0, 1.0, width=32))
stop_strings = st.one_of(st.text(max_size=3), st.sampled_from(["", "\x00", "a" * 256, "a" * 257, "🙂", " ", "e"]))
HOSTILE = {  # field: its hostile values
    "task_id": task_ids,
    "prompt": prompts,
    "max_new_tokens": st.one_of(st.sampled_from(UINT32_EXTREMES), st.integers(0, 2**32 - 1)),
    "temperature": floats,
    "top_p": floats,
    "top_k": st.one_of(st.sampled_from(UINT32_EXTREMES), st.integers(0, 2**32 - 1)),
    "seed": st.one_of(st.none(), st.sampled_from(SEED_EXTREMES), st.integers(0, 2**64 - 1)),
    "stop": st.one_of(st.lists(stop_strings, max_size=3), st.lists(stop_strings, min_size=15, max_size=20)),
}
tame = st.builds(  # a request the server serves: the base for one to three hostile fields
    pb.GenerateRequest, task_id=st.sampled_from(sorted(ROUTES)),
    prompt=st.text(st.characters(codec="ascii"), max_size=20),
    params=st.builds(pb.GenerationParams, max_new_tokens=st.integers(0, MAX_NEW_LIMIT),
                     temperature=st.sampled_from([0.0, 0.7, 1.5]), top_p=st.sampled_from([0.0, 0.5, 0.95, 1.0]),
                     top_k=st.integers(0, 50), seed=st.none() | st.integers(0, 2**64 - 1),
                     stop=st.lists(st.text(min_size=1, max_size=2), max_size=2), ignore_eos=st.booleans()))


def set_field(request: pb.GenerateRequest, name: str, value) -> pb.GenerateRequest:
    if name in ("task_id", "prompt"):
        setattr(request, name, value)
    elif name == "stop":
        request.params.stop[:] = value
    elif value is None:
        request.params.ClearField(name)
    else:
        setattr(request.params, name, value)
    return request


@st.composite
def requests(draw) -> pb.GenerateRequest:
    """A tame request with up to three fields made hostile, so that each bad field is also met alone (an unknown
    task id or a bad parameter would otherwise hide the checks after it)."""
    request = draw(tame)
    for name in draw(st.lists(st.sampled_from(sorted(HOSTILE)), max_size=3, unique=True)):
        set_field(request, name, draw(HOSTILE[name]))
    return request


def with_field(name: str, value) -> pb.GenerateRequest:
    """A served request with one field set to `value`."""
    request = pb.GenerateRequest(task_id="lo1", prompt="the model", params=pb.GenerationParams(max_new_tokens=4))
    return set_field(request, name, value)


EXPLICIT = [  # every listed extreme alone, whatever the random draws reach
    *(with_field(name, v) for name in ("temperature", "top_p") for v in FLOAT_EXTREMES),
    *(with_field(name, v) for name in ("max_new_tokens", "top_k") for v in UINT32_EXTREMES),
    *(with_field("seed", v) for v in SEED_EXTREMES), *(with_field("task_id", v) for v in HOSTILE_IDS),
    *(with_field("prompt", v) for v in HOSTILE_PROMPTS),
    *(with_field("stop", v) for v in ([""], ["\x00"], ["a" * 256], ["a" * 257], ["e"] * 16, ["e"] * 17, ["🙂", " "])),
]


def decoded(request: pb.GenerateRequest) -> pb.GenerateRequest:
    """The request as the server sees it (floats rounded to float32 on the wire)."""
    return pb.GenerateRequest.FromString(request.SerializeToString())


# ---------------------------------------------------------------------- generation
@pytest.mark.parametrize("stream, examples", [(False, 300), (True, 120)], ids=["Generate", "GenerateStream"])
def test_fuzzed_generation_requests_get_the_predicted_status(env, stream, examples):
    seen: Counter = Counter()

    @fuzz_settings(examples)
    @given(requests())
    def run(request):
        code, details, messages = call(env, "GenerateStream" if stream else "Generate", request.SerializeToString(),
                                       stream)
        check_generate(env, decoded(request), code, details, messages, stream)
        seen[code.name] += 1

    for request in EXPLICIT if not stream else ():
        run = example(request)(run)
    run()
    print(f"{'GenerateStream' if stream else 'Generate'}: {sum(seen.values())} examples, {dict(seen)}")
    assert {"OK", "NOT_FOUND", "INVALID_ARGUMENT"} <= set(seen)  # every branch of the contract was reached
    still_serves_and_idle(env)


# ---------------------------------------------------------------------- adapter admin
HOSTILE_PATHS = ["", ".", "..", "../", "../outside/evil", "lo1/../../outside/evil", "lo1/..", "./lo1", "lo1/",
                 "nested/deep", "nested/../spare", "spare", "escape", "loop", "/", "/etc", "/etc/passwd", "/proc/self",
                 "~", "~/evil", "~root", "file:///etc", "http://127.0.0.1/x", "hf://evil/x", "%2e%2e/outside/evil",
                 "..\\outside\\evil", "..\u2215outside", "spare\x00", "\x00", "spare/\x00/..", "a" * 300,
                 "a/" * 2000, "🙂", "lo1\n", "mt", "{inside}/spare", "{inside}/../outside/evil", "{outside}/evil"]
names = st.one_of(st.just(""), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,12}", fullmatch=True), st.text(max_size=20),
                  st.sampled_from(["lo1", "mt", "spare", "alpha", "deep", "evil", "a" * 129, ".hidden", "-x",
                                   "mt/alpha", "x y", "x\x00", "🙂"]))
paths = st.one_of(st.sampled_from(HOSTILE_PATHS), st.text(max_size=20), long_text)
GOOD_DIRS = {"lo1", "mt", "spare", "nested/deep"}  # the adapter directories inside the adapter directory


def restore_adapters(env) -> None:
    """Back to the fixture's adapters (lo1 and mt from their own directories), whatever a load changed."""
    for info in env.client.list_adapters():
        if info.name not in ADAPTERS:
            env.client.unload_adapter(info.name)
    for name in ADAPTERS:
        env.client.load_adapter(name, name, replace=True)


def resolved_inside(env, path: str) -> str | None:
    """Which good adapter directory `path` names, if any (None: invalid, outside, or not an adapter)."""
    try:
        target = (env.adapters / path).resolve()
    except (OSError, ValueError, RuntimeError):
        return None
    return next((d for d in GOOD_DIRS if target == (env.adapters / d).resolve()), None)


def test_fuzzed_adapter_admin_names_and_paths(env, monkeypatch):
    monkeypatch.setenv("HOME", str(env.outside))  # '~/evil' must not be expanded to the outside adapter
    assert (env.adapters / "escape").resolve().is_relative_to(env.outside) and os.path.islink(env.adapters / "loop")
    assert all(resolved_inside(env, d) == d for d in GOOD_DIRS)  # the hostile paths mean what they say
    documented = {Code.OK, Code.INVALID_ARGUMENT, Code.PERMISSION_DENIED, Code.ALREADY_EXISTS,
                  Code.FAILED_PRECONDITION}
    seen = {"LoadAdapter": Counter(), "UnloadAdapter": Counter()}

    @fuzz_settings(200)
    @given(names, paths, st.booleans())
    # one of each documented outcome whatever the generated examples are (they differ between environments)
    @example("lo1", "lo1", False)  # ALREADY_EXISTS
    @example("other", "spare", False)  # OK
    @example("", "../outside/evil", False)  # PERMISSION_DENIED
    @example("x y", "spare", False)  # INVALID_ARGUMENT
    def load(name, path, replace):
        path = path.replace("{inside}", str(env.adapters)).replace("{outside}", str(env.outside))
        request = pb.LoadAdapterRequest(name=name, path=path, replace=replace)
        code, details, messages = call(env, "LoadAdapter", request.SerializeToString())
        seen["LoadAdapter"][code.name] += 1
        assert code in documented, (request, code, details)
        effective = name or Path(path).name
        try:
            check_name(effective)
        except AdapterFormatError:
            assert code == Code.INVALID_ARGUMENT and "invalid adapter name" in details, (request, code, details)
            return
        if code == Code.OK:
            assert resolved_inside(env, path) is not None, (request, "loaded from outside the good directories")
            restore_adapters(env)

    @fuzz_settings(100)
    @given(st.one_of(names, long_text))
    def unload(name):
        code, details, _ = call(env, "UnloadAdapter", pb.UnloadAdapterRequest(name=name).SerializeToString())
        seen["UnloadAdapter"][code.name] += 1
        if name in ADAPTERS:
            assert code == Code.OK
            env.client.load_adapter(name, name)
        else:
            assert code == Code.NOT_FOUND, (name, code, details)
            assert "not loaded" in details or details.endswith("(truncated)")  # a long name fills the details

    load()
    unload()
    print("admin:", {m: dict(c) for m, c in seen.items()})
    assert {"OK", "INVALID_ARGUMENT", "PERMISSION_DENIED", "ALREADY_EXISTS"} <= set(seen["LoadAdapter"])
    still_serves_and_idle(env)


# ---------------------------------------------------------------------- raw bytes
METHODS = {  # method: (request message, server-streaming)
    "Generate": (pb.GenerateRequest, False), "GenerateStream": (pb.GenerateRequest, True),
    "ListTasks": (pb.ListTasksRequest, False), "LoadAdapter": (pb.LoadAdapterRequest, False),
    "UnloadAdapter": (pb.UnloadAdapterRequest, False), "ListAdapters": (pb.ListAdaptersRequest, False),
}
MALFORMED = [
    b"\x0a", b"\x0a\x05ab", b"\x0a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",  # truncated
    b"\x12\x02\xff\xfe",  # bad UTF-8 in the prompt
    b"\x0a\x02\xc3\x28", b"\x1a\x04\x32\x02\xed\xa0", b"\x1a\x03\x32\x01\x80",  # bad UTF-8 in task_id, in a stop string
    b"\x08\x01", b"\x0d\x00\x00\x00\x00", b"\x1a\x05\x0d\x00\x00\xc0\x7f",  # wrong wire types; a NaN temperature
    b"\x1a\x05\x15\x00\x00\x80\xff", b"\x1a\x0b\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # -inf top_p, huge varint
    b"\x0b" * 200, b"\x1a\xff\xff\xff\xff\x0f", b"\x00", b"\xff" * 16, b"\x0f", b"\x0c",  # groups, field 0, end group
]


def mutate(data: bytes, position: int, byte: int, cut: int) -> bytes:
    if not data:
        return bytes([byte])
    i = position % len(data)
    return (data[:i] + bytes([byte]) + data[i + 1:])[: max(1, len(data) - cut)]


VALID = {  # method: well-formed requests to mutate
    "Generate": requests(), "GenerateStream": requests(), "ListTasks": st.just(pb.ListTasksRequest()),
    "ListAdapters": st.just(pb.ListAdaptersRequest()), "UnloadAdapter": st.builds(pb.UnloadAdapterRequest, name=names),
    "LoadAdapter": st.builds(pb.LoadAdapterRequest, name=names, path=paths, replace=st.booleans()),
}


@st.composite
def raw_calls(draw) -> tuple[str, bytes]:
    """(method, bytes): random bytes, hand-made malformed encodings, a valid request, or one with a byte changed
    and its end cut off."""
    method = draw(st.sampled_from(sorted(METHODS)))
    payload = draw(st.one_of(
        st.binary(max_size=64), st.sampled_from(MALFORMED), VALID[method].map(lambda r: r.SerializeToString()),
        st.builds(lambda r, p, b, c: mutate(r.SerializeToString(), p, b, c), VALID[method], st.integers(0, 10**6),
                  st.integers(0, 255), st.integers(0, 3))))
    return method, payload


def test_fuzzed_raw_request_bytes_are_answered_as_their_decoding_says(env):
    seen: dict[str, Counter] = {m: Counter() for m in METHODS}
    documented = {"ListTasks": {Code.OK}, "ListAdapters": {Code.OK}, "UnloadAdapter": {Code.NOT_FOUND},
                  "LoadAdapter": {Code.OK, Code.INVALID_ARGUMENT, Code.PERMISSION_DENIED, Code.ALREADY_EXISTS,
                                  Code.FAILED_PRECONDITION}}

    @fuzz_settings(250)
    @given(raw_calls())
    def run(raw_call):
        method, payload = raw_call
        message, stream = METHODS[method]
        code, details, messages = call(env, method, payload, stream)
        seen[method][code.name] += 1
        try:
            request = message.FromString(payload)
        except Exception:  # noqa: BLE001 - DecodeError, bad UTF-8: the server must say INVALID_ARGUMENT
            assert code == Code.INVALID_ARGUMENT and "not a valid message" in details, (payload, code, details)
            return
        if message is pb.GenerateRequest:
            check_generate(env, request, code, details, messages, stream)
        elif method == "UnloadAdapter" and request.name in ADAPTERS:
            assert code == Code.OK, (request, code, details)
            env.client.load_adapter(request.name, request.name)  # restore it
        else:
            assert code in documented[method], (method, request, code, details)
            if method == "LoadAdapter" and code == Code.OK:
                restore_adapters(env)

    run()
    print("raw bytes:", {m: dict(c) for m, c in seen.items()})
    assert sum(c["INVALID_ARGUMENT"] for c in seen.values()) > 0 and sum(c["OK"] for c in seen.values()) > 0
    still_serves_and_idle(env)


# ---------------------------------------------------------------------- targeted
def test_long_prompts_do_not_stall_the_server(env, monkeypatch):
    """Tokenizing megabytes takes seconds: it must not run on the event loop that serves every other RPC."""
    engine = env.bg.server.engine
    tokenize, entered, release = engine.tokenizer, threading.Event(), threading.Event()

    def slow_on_long_prompts(text, *args, **kwargs):
        if len(text) > 100_000:
            entered.set()
            assert release.wait(WAIT)
        return tokenize(text, *args, **kwargs)

    monkeypatch.setattr(engine, "tokenizer", slow_on_long_prompts)
    outcome: list[Code] = []
    big = pb.GenerateRequest(prompt="the " * 50_000).SerializeToString()
    sender = threading.Thread(target=lambda: outcome.append(call(env, "Generate", big)[0]))
    sender.start()
    try:
        assert entered.wait(WAIT)
        with Client(env.bg.address, timeout=5.0) as quick:  # the loop is free while that prompt tokenizes
            assert quick.health() and quick.list_tasks()
    finally:
        release.set()
        sender.join(WAIT)
    assert outcome == [Code.INVALID_ARGUMENT]
    too_big = pb.GenerateRequest(prompt="x" * (5 << 20)).SerializeToString()
    assert call(env, "Generate", too_big)[0] == Code.RESOURCE_EXHAUSTED  # gRPC's own message-size limit


@pytest.mark.parametrize("temperature", [1e-45, 1e-40, 1e-30, 1e-8])
def test_a_tiny_temperature_samples_like_greedy(env, temperature):
    """logits / T overflows to inf for a tiny T: the sampler must still pick the most likely token."""
    greedy = env.client.generate("lo1", "the model", max_new_tokens=MAX_NEW_LIMIT, ignore_eos=True)
    sampled = env.client.generate("lo1", "the model", max_new_tokens=MAX_NEW_LIMIT, ignore_eos=True,
                                  temperature=temperature, top_k=5, seed=3)
    assert sampled.token_ids == greedy.token_ids
    also = env.client.generate("lo1", "the model", max_new_tokens=MAX_NEW_LIMIT, ignore_eos=True,
                               temperature=temperature, seed=3)
    assert also.token_ids == greedy.token_ids

