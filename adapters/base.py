"""The interface every adapter family implements.

Two levels (adapter-methods.md §7):
- `Adapter`: what is on disk. Its typed config, its tensors on the host (CPU), save, parameter count.
  Loading validates the files; it never touches a model.
- `BoundAdapter`: the adapter checked against one base model and laid out on its device and dtype,
  ready to serve. `delta` adds the adapter's contribution to one target layer for the rows of one task;
  linear families also give the dense ΔW for merging.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from .errors import AdapterFormatError, IncompatibleAdapterError, UnknownTaskError, UnsupportedAdapterError
from .io import write_adapter_dir
from .linear import LinearSpec
from .targets import matches_target

_SERIALS = itertools.count()
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str, what: str = "adapter name") -> str:
    """Names become task ids and directory names: letters, digits, '.', '_' and '-', at most 128."""
    if not isinstance(name, str) or not _ADAPTER_NAME.match(name):
        raise AdapterFormatError(
            f"invalid {what} {name!r}: use letters, digits, '.', '_' or '-' (at most 128, not starting with . _ -)"
        )
    return name


class Adapter(ABC):
    """An adapter as stored: config + host tensors. Subclasses register themselves by `adapter_type`."""

    adapter_type: ClassVar[str]
    multi_task: ClassVar[bool] = False  # True: the config lists tasks and a request picks one
    mergeable: ClassVar[bool] = False  # True: ΔW is input-independent, so it can be merged into W

    def __init__(self, name: str, tensors: dict[str, torch.Tensor], tasks: list[str] | None = None) -> None:
        self.name = check_name(name)
        self.tensors = tensors
        self.tasks: list[str] = list(tasks or [])
        if self.multi_task:
            if not self.tasks:
                raise AdapterFormatError(f"adapter {name!r} ({self.adapter_type}) lists no tasks")
            for task in self.tasks:
                check_name(task, "task name")
            if len(set(self.tasks)) != len(self.tasks):
                raise AdapterFormatError(f"adapter {name!r} lists a task twice")

    # ---- what each family provides ----
    @classmethod
    @abstractmethod
    def from_files(cls, name: str, config: Mapping[str, Any], tensors: dict[str, torch.Tensor]) -> "Adapter":
        """Validate a parsed config and its tensors; raise AdapterError subclasses on anything wrong."""

    def config_dict(self) -> dict[str, Any]:
        """The JSON config that rebuilds this adapter without outside knowledge (every family keeps its typed
        config in `self.config`, with a `to_dict`)."""
        return self.config.to_dict()

    @property
    @abstractmethod
    def rank(self) -> int:
        """The (largest) rank r of the adapter's low-rank factors."""

    @abstractmethod
    def bind(self, layers: Mapping[str, LinearSpec], device: torch.device, dtype: torch.dtype) -> "BoundAdapter":
        """Check the adapter against the base model's target layers and lay it out for serving."""

    @classmethod
    @abstractmethod
    def create(cls, name: str, layers: Mapping[str, LinearSpec], *, target_modules: list[str], rank: int,
               tasks: list[str] | None = None, seed: int = 0, **options: Any) -> "Adapter":
        """A new adapter initialised as its paper initialises it (the trainer's starting point).

        layers: the base model's target layers (`AdaptedModel.specs`); target_modules: module types
        (`q_proj`) or full names; tasks: the task list of multi-task families (ignored otherwise)."""

    # ---- shared behaviour ----
    def num_parameters(self) -> int:
        """Trainable parameters stored in the adapter."""
        return sum(t.numel() for t in self.tensors.values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def task_index(self, task: str) -> int:
        """Index of `task` in the adapter's task list (single-task adapters have the one task 0)."""
        if not self.multi_task:
            if task in ("", self.name):
                return 0
            raise UnknownTaskError(f"adapter {self.name!r} serves only task {self.name!r}, not {task!r}")
        try:
            return self.tasks.index(task)
        except ValueError:
            raise UnknownTaskError(f"adapter {self.name!r} has no task {task!r}; it has {', '.join(self.tasks)}") from None

    def task_ids(self) -> list[str]:
        """The task ids a server maps to this adapter (CONTRACT.md: `t` and `name/t`, or `name`)."""
        if not self.multi_task:
            return [self.name]
        return self.tasks + [f"{self.name}/{t}" for t in self.tasks]

    def save(self, path: str | os.PathLike) -> None:
        """Write `adapter_config.json` + `adapter_model.safetensors`; reloading is bit-exact."""
        write_adapter_dir(path, self.config_dict(), self.tensors)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, tasks={self.tasks}, rank={self.rank})"


class BoundAdapter(ABC):
    """An adapter ready to serve on one base model. Holds device tensors only; never mutates the model.

    `bind` is differentiable (no detach, no in-place writes to the adapter's tensors): a trainer makes the
    adapter's tensors require grad and binds again each step.
    """

    # True where `lowrank_factors` describes the delta exactly, so that batches can stack it (grouped.py)
    stackable: bool = False

    def __init__(self, adapter: Adapter, modules: frozenset[str]) -> None:
        self.adapter = adapter
        self.modules = modules
        self.serial = next(_SERIALS)  # identity for caches (an id() can be reused once an object is freed)
        # whether rows of different tasks need separate groups (R-LoRA, routed by content, sets False)
        self.task_sensitive = adapter.multi_task
        # training only (the trainer sets it): the family's own dropout; serving always runs with 0
        self.dropout = 0.0

    @property
    def mergeable(self) -> bool:
        return self.adapter.mergeable

    def check_task(self, task: int) -> int:
        num = len(self.adapter.tasks) if self.adapter.multi_task else 1
        if not 0 <= task < num:
            raise UnknownTaskError(f"adapter {self.adapter.name!r} has no task index {task}")
        return task

    @abstractmethod
    def delta(self, module: str, x: torch.Tensor, h: torch.Tensor, task: int) -> torch.Tensor | None:
        """The adapter output for `module`: x [n, d_in], base output h [n, d_out] -> [n, d_out], or None
        where the adapter does not touch `module`."""

    def lowrank_factors(self, module: str, task: int) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A [r, d_in], B [d_out, r], s) with delta = s·(x Aᵀ)Bᵀ, for `stackable` families; None where the
        module is untouched."""
        raise NotImplementedError(f"{self.adapter.adapter_type} adapters are not a single low-rank pair")

    def delta_weight(self, module: str, task: int) -> torch.Tensor | None:
        """Dense ΔW [d_out, d_in] in fp32 for merging, or None where the module is untouched."""
        raise UnsupportedAdapterError(f"{self.adapter.adapter_type} adapters cannot be merged into the base weights")

    def nbytes(self) -> int:
        """Device memory held by the bound adapter."""
        return 0


def require_modules(adapter: Adapter, wanted: Mapping[str, tuple[int | None, int | None]],
                    layers: Mapping[str, LinearSpec]) -> None:
    """Refuse an adapter whose modules are missing from the base or whose (d_in, d_out) differ."""
    for module, (d_in, d_out) in wanted.items():
        spec = layers.get(module)
        if spec is None:
            raise IncompatibleAdapterError(
                f"adapter {adapter.name!r} targets {module!r}, which is not a linear layer of the base model"
            )
        if (d_in is not None and d_in != spec.in_features) or (d_out is not None and d_out != spec.out_features):
            raise IncompatibleAdapterError(
                f"adapter {adapter.name!r} does not fit {module!r}: adapter (in={d_in}, out={d_out}), "
                f"base (in={spec.in_features}, out={spec.out_features})"
            )


def select_layers(layers: Mapping[str, LinearSpec], target_modules: list[str] | str) -> dict[str, LinearSpec]:
    """The base layers that `target_modules` names (PEFT matching rules), or an error naming the targets."""
    chosen = {name: spec for name, spec in layers.items() if matches_target(name, target_modules)}
    if not chosen:
        raise IncompatibleAdapterError(f"target_modules {target_modules!r} match no linear layer of the base model")
    return chosen


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """nn.Linear's default init, kaiming_uniform_(a=sqrt(5)): U(±1/sqrt(fan_in)), fan_in = shape[1]."""
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def get_field(config: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...,
              adapter: str = "adapter") -> Any:
    """Read one typed config field, with an error that names the key."""
    if key not in config or config[key] is None:
        if default is ...:
            raise AdapterFormatError(f"{adapter}: config key {key!r} is missing")
        return default
    value = config[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and kind is not bool and (kind is int or kind is float):
        raise AdapterFormatError(f"{adapter}: config key {key!r} must be {kind.__name__}, got {value!r}")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise AdapterFormatError(f"{adapter}: config key {key!r} must be {names}, got {value!r}")
    return value


def expect_shape(tensors: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...], adapter: str) -> torch.Tensor:
    """Fetch tensor `key` and check its shape, naming both on failure."""
    if key not in tensors:
        raise AdapterFormatError(f"{adapter}: tensor {key!r} is missing")
    tensor = tensors[key]
    if tuple(tensor.shape) != shape:
        raise AdapterFormatError(f"{adapter}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor
