"""Plain Python results of the client's calls (dataclasses, not protobuf messages)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .pb import loraplex_pb2 as pb

_FINISH_PREFIX = "FINISH_REASON_"


def finish_reason_name(value: int) -> str | None:
    """`FINISH_REASON_LENGTH` -> "length", `..._EOS` -> "eos", `..._STOP` -> "stop"; UNSPECIFIED -> None.

    A value this client does not know (a newer server) comes back as its number, as a string.
    """
    if value == pb.FINISH_REASON_UNSPECIFIED:
        return None
    try:
        name = pb.FinishReason.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(_FINISH_PREFIX).lower()


@dataclass(frozen=True)
class GenerateResult:
    """A finished generation."""

    text: str
    """The generated text (the prompt is not repeated)."""
    token_ids: list[int]
    """The generated token ids, prompt excluded."""
    finish_reason: str | None
    """Why generation ended: "length", "eos" or "stop"."""
    prompt_tokens: int
    generated_tokens: int
    adapter: str
    """The adapter that served the request; "" for the base model."""

    @classmethod
    def from_pb(cls, msg: pb.GenerateResponse) -> GenerateResult:
        return cls(
            text=msg.text,
            token_ids=list(msg.token_ids),
            finish_reason=finish_reason_name(msg.finish_reason),
            prompt_tokens=msg.prompt_tokens,
            generated_tokens=msg.generated_tokens,
            adapter=msg.adapter,
        )


@dataclass(frozen=True)
class StreamChunk:
    """One streamed piece: what is new since the previous chunk. Only the last has a `finish_reason`."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    """None on every chunk but the last, which says "length", "eos" or "stop"."""
    prompt_tokens: int = 0
    """Set on the last chunk only (0 before)."""
    generated_tokens: int = 0
    """Set on the last chunk only (0 before): the tokens generated in all."""
    adapter: str = ""
    """Set on the last chunk only."""

    @classmethod
    def from_pb(cls, msg: pb.GenerateStreamResponse) -> StreamChunk:
        return cls(
            text=msg.text,
            token_ids=list(msg.token_ids),
            finish_reason=finish_reason_name(msg.finish_reason),
            prompt_tokens=msg.prompt_tokens,
            generated_tokens=msg.generated_tokens,
            adapter=msg.adapter,
        )


@dataclass(frozen=True)
class TaskInfo:
    """A task id the server answers to, and the adapter behind it."""

    task_id: str
    adapter: str
    adapter_type: str

    @classmethod
    def from_pb(cls, msg: pb.TaskInfo) -> TaskInfo:
        return cls(task_id=msg.task_id, adapter=msg.adapter, adapter_type=msg.adapter_type)


@dataclass(frozen=True)
class AdapterInfo:
    """An adapter the server knows. `residency` is "disk", "host" or "device"."""

    name: str
    adapter_type: str
    tasks: list[str] = field(default_factory=list)
    rank: int = 0
    num_parameters: int = 0
    residency: str = ""
    nbytes: int = 0

    @classmethod
    def from_pb(cls, msg: pb.AdapterInfo) -> AdapterInfo:
        return cls(
            name=msg.name,
            adapter_type=msg.adapter_type,
            tasks=list(msg.tasks),
            rank=msg.rank,
            num_parameters=msg.num_parameters,
            residency=msg.residency,
            nbytes=msg.nbytes,
        )
