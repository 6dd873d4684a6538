"""The serving engine: iteration-level continuous batching of many adapters over one base model.

A background thread runs steps. Each step is one forward pass over every running sequence (one new token
each) plus the prompts admitted at this step (prefill), all rows in one packed batch, each sequence served
through its own (adapter, task) by `AdaptedModel.batch`. Requests join at the next step and leave as soon
as they finish or are cancelled, freeing their KV slot and their adapter lease. See docs/design.md.

    engine = Engine(adapted, tokenizer, manager, EngineConfig(max_slots=32))
    engine.start()
    handle = engine.submit("sentiment", "The film was", SamplingParams(max_new_tokens=16))
    for delta in handle: print(delta.text, end="")
    engine.stop(grace=5.0)
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..adapters import AdaptedModel, AdapterError, BoundAdapter
from ..adapters.errors import UnknownTaskError
from . import cpu_threads, host_memory
from .detokenize import Detokenizers, TextStream
from .forward import SeqRun, build_forward, build_step
from .forward.graphs import DecodeGraphs
from .kv_cache import KVCache, SlotTable
from .request import (
    EngineObserver,
    EngineStoppedError,
    FinishReason,
    GenerationResult,
    InvalidRequestError,
    QueueFullError,
    RequestHandle,
    RequestRecord,
    SamplingParams,
    StepRecord,
    StreamDelta,
    now,
)
from .sampling import RowSampler, sample, validate

log = logging.getLogger("loraplex.engine")

MERGE_MODES = ("auto", "merge", "batch")
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256


@dataclass
class EngineConfig:
    """Limits and policies of one engine. Memory: KV = slots x max_seq_len x (2 x layers x kv_heads x head_dim)
    elements of the model dtype, preallocated; `kv_cache_max_bytes` lowers the slot count to fit."""

    max_slots: int = 64  # sequences running at once (KV slots)
    max_seq_len: int | None = None  # prompt + output per sequence; None = min(2048, the model's limit)
    kv_cache_max_bytes: int | None = 1 << 30
    max_queued_requests: int = 256  # waiting (not running) requests; more -> QueueFullError
    max_prompt_tokens: int | None = None  # None = max_seq_len - 1
    max_new_tokens_limit: int | None = None  # the largest max_new_tokens accepted; None = max_seq_len - 1
    default_max_new_tokens: int = 256  # when a request asks for 0 / None (capped to fit the context)
    # prompt tokens admitted per step (one prompt is always admitted); None: 512 on CPU, 4096 on CUDA, where an eager
    # prefill step costs host time whatever its size (docs/design.md §2)
    max_prefill_tokens: int | None = None
    merge_mode: str = "auto"  # "auto" | "merge" | "batch" (see docs/design.md)
    merge_after_steps: int = 16  # auto: homogeneous steps in a row before merging
    prefetch_lookahead: int = 4  # queued requests whose adapters are warmed while no slot is free
    # a request waiting this long for its adapter stops requests that need a device slot overtaking it, and
    # one running adapter drains to free a slot for it (docs/design.md §4)
    adapter_wait_s: float = 2.0
    eos_token_ids: Sequence[int] | None = None  # None: the tokenizer's and the model's generation config
    idle_poll_s: float = 0.005  # loop wake-up while queued requests wait for an adapter load
    # on the CPU: keep the memory a step frees in the heap for the next step, give it back when idle (host_memory.py)
    retain_host_memory: bool = True
    # on CUDA: decode-only steps replay CUDA graphs (forward/graphs.py); merge_mode "auto" then never merges
    cuda_graphs: bool = True
    observer: EngineObserver | None = None

    def __post_init__(self) -> None:
        if self.merge_mode not in MERGE_MODES:
            raise ValueError(f"merge_mode must be one of {', '.join(MERGE_MODES)}, got {self.merge_mode!r}")
        for name in ("max_slots", "default_max_new_tokens", "merge_after_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_seq_len", "kv_cache_max_bytes", "max_prompt_tokens", "max_new_tokens_limit",
                     "max_prefill_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (or None), got {getattr(self, name)}")
        if self.max_queued_requests < 0 or self.prefetch_lookahead < 0:
            raise ValueError("max_queued_requests and prefetch_lookahead must be >= 0")


@dataclass(frozen=True)
class EngineStats:
    queue_depth: int
    running: int
    kv_bytes_used: int  # K/V of the tokens held by running sequences
    kv_bytes_total: int  # the preallocated cache
    slots_used: int
    slots_total: int
    steps: int
    merged: str | None  # "adapter[/task index]" while an adapter is merged into the weights


@dataclass(eq=False)
class _Seq:
    """One request inside the engine (engine thread only, except `handle`)."""

    handle: RequestHandle
    task_id: str
    adapter: str  # "" for the base model
    task_index: int
    prompt: list[int]
    params: SamplingParams
    max_new: int
    stream: TextStream
    t_submit: float
    sampler: RowSampler | None = None
    lease: object | None = None
    bound: BoundAdapter | None = None
    slot: int = -1
    kv_len: int = 0  # tokens of this sequence in its KV slot
    generated: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    t_admit: float | None = None
    t_blocked: float | None = None  # when its adapter was first found not on the device
    drain: str | None = None  # the running adapter that takes no new request while this one is starved
    t_first: float | None = None

    @property
    def key(self) -> tuple[int, int]:
        """Rows with the same key form one adapter group (as BatchContext groups them)."""
        if self.bound is None:
            return (0, 0)
        return (id(self.bound), self.task_index if self.bound.task_sensitive else 0)

    def next_run(self) -> SeqRun:
        if self.kv_len == 0:
            return SeqRun(self.prompt, self.slot, 0, decode=False)
        return SeqRun(self.generated[-1:], self.slot, self.kv_len, decode=True)


class Engine:
    def __init__(self, adapted: AdaptedModel, tokenizer, manager=None, config: EngineConfig | None = None) -> None:
        self.adapted = adapted
        self.tokenizer = tokenizer
        self.manager = manager
        self.config = config = config or EngineConfig()
        self.forward = build_forward(adapted.model)
        model_limit = self.forward.max_positions or getattr(adapted.model.config, "max_position_embeddings", None)
        self.max_seq_len = config.max_seq_len or min(2048, model_limit or 2048)
        if model_limit and self.max_seq_len > model_limit:
            raise ValueError(f"max_seq_len {self.max_seq_len} exceeds the model's {model_limit} positions")
        self.max_prompt = min(config.max_prompt_tokens or self.max_seq_len - 1, self.max_seq_len - 1)
        self.max_new_limit = min(config.max_new_tokens_limit or self.max_seq_len - 1, self.max_seq_len - 1)
        self.cache = self.forward.new_cache(self._num_slots(), self.max_seq_len)
        self.prefill_budget = config.max_prefill_tokens or (4096 if adapted.device.type == "cuda" else 512)
        self.graphs = (DecodeGraphs(self.forward, self.cache, adapted)
                       if config.cuda_graphs and adapted.device.type == "cuda" else None)
        # the most adapters a batch can stack: the factor pool need not grow (a copy) while serving
        device_adapters = getattr(manager, "device_capacity", self.cache.num_slots)
        adapted.factor_pool.reserve(min(device_adapters, self.cache.num_slots))
        self.slots = SlotTable(self.cache)
        self.device = adapted.device
        self.vocab_size = self.forward.head.weight.shape[0]
        eos = config.eos_token_ids if config.eos_token_ids is not None else _eos_ids(tokenizer, adapted.model)
        self.eos = frozenset(eos)
        self.detokenizers = Detokenizers(tokenizer)
        self._tokenizer_lock = threading.Lock()
        self._lock = threading.Condition()
        self._waiting: list[_Seq] = []
        self._running: list[_Seq] = []
        self._accepting = False
        self._halt = False
        self._thread: threading.Thread | None = None
        self._next_id = 0
        self._steps = 0
        self._homogeneous = (None, 0)  # (group key, consecutive steps) for merge_mode "auto"
        self._threads = torch.get_num_threads()  # the constructing thread's setting, which the loop takes

    def _num_slots(self) -> int:
        per_slot = KVCache.bytes_per_token(self.forward.num_layers, self.forward.kv_heads, self.forward.head_dim,
                                           self.adapted.dtype) * self.max_seq_len
        slots = self.config.max_slots
        if self.config.kv_cache_max_bytes is not None:
            slots = min(slots, self.config.kv_cache_max_bytes // per_slot)
        if slots < 1:
            raise ValueError(f"kv_cache_max_bytes={self.config.kv_cache_max_bytes} holds no sequence of "
                             f"max_seq_len={self.max_seq_len} ({per_slot} bytes each); lower max_seq_len")
        return slots

    # ------------------------------------------------------------------ public API
    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("the engine was already started")
            self._accepting = True
            cpu_threads.release_pool()  # else this thread's OpenMP workers make the loop's sleep (cpu_threads.py)
            if self.config.retain_host_memory and self.device.type == "cpu":
                host_memory.retain_freed_memory()
            if self.graphs is not None:  # before the loop runs: a capture writes to every KV slot
                self.graphs.capture_all()
            self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
            self._thread.start()

    def stop(self, grace: float = 0.0) -> None:
        """Refuse new requests, let running and queued ones finish for up to `grace` seconds, cancel the rest."""
        with self._lock:
            self._accepting = False
            self._lock.wait_for(lambda: not self._waiting and not self._running, timeout=max(grace, 0.0))
            self._halt = True
            self._lock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> "Engine":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=0.0)

    def submit(self, task_id: str, prompt: str | Sequence[int], params: SamplingParams | None = None) -> RequestHandle:
        """Queue a request. Raises at once: UnknownTaskError, InvalidRequestError, QueueFullError,
        EngineStoppedError."""
        params = params if params is not None else SamplingParams()
        route = self.manager.resolve(task_id) if self.manager is not None else _base_route(task_id)
        validate(params)
        if len(params.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in params.stop):
            raise InvalidRequestError(f"stop: at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} "
                                      "characters each")
        ids = self._prompt_ids(prompt)
        max_new = self._max_new(params, len(ids))
        adapter = route.adapter if route is not None else ""
        with self._lock:
            if not self._accepting:
                raise EngineStoppedError("the engine is not running")
            if len(self._waiting) >= self.config.max_queued_requests:
                raise QueueFullError(f"{len(self._waiting)} requests are already queued (max_queued_requests)")
            self._next_id += 1
            handle = RequestHandle(self._next_id, task_id, adapter, len(ids))
            handle._wake_engine = self._wake
            seq = _Seq(handle, task_id, adapter, route.task_index if route is not None else 0, ids, params, max_new,
                       TextStream(self.detokenizers.new(ids), params.stop), now())
            self._waiting.append(seq)
            self._lock.notify_all()
        return handle

    def generate(self, task_id: str, prompt: str | Sequence[int], params: SamplingParams | None = None,
                 timeout: float | None = None) -> GenerationResult:
        """Submit and wait for the result."""
        return self.submit(task_id, prompt, params).result(timeout)

    def stats(self) -> EngineStats:
        """A snapshot, safe from any thread (the running figures may be one step old)."""
        with self._lock:
            depth = len(self._waiting)
        merged = self.adapted.merged
        return EngineStats(
            queue_depth=depth,
            running=len(self._running),
            kv_bytes_used=self.slots.tokens_in_use() * self.cache.token_bytes,
            kv_bytes_total=self.cache.nbytes,
            slots_used=len(self.slots),
            slots_total=self.cache.num_slots,
            steps=self._steps,
            merged=None if merged is None else f"{merged[0].adapter.name}/{merged[1]}",
        )

    # ------------------------------------------------------------------ validation
    def tokenize(self, text: str) -> list[int]:
        """The token ids of a prompt, as `submit` takes them (InvalidRequestError if the tokenizer refuses the
        text). Thread-safe; megabytes of text take seconds."""
        try:
            with self._tokenizer_lock:
                return list(self.tokenizer(text)["input_ids"])
        except Exception as exc:  # the tokenizer refuses the text: the request's fault, not the server's
            raise InvalidRequestError(f"prompt cannot be tokenized: {type(exc).__name__}") from exc

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenize(prompt)
        else:
            ids = list(prompt)
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise InvalidRequestError("prompt: token ids must be integers")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt: token id {bad[0]} is not in the model's vocabulary "
                                      f"[0, {self.vocab_size})")
        if not ids:
            bos = getattr(self.tokenizer, "bos_token_id", None)
            if bos is None:
                raise InvalidRequestError("prompt is empty")
            ids = [bos]
        if len(ids) > self.max_prompt:
            raise InvalidRequestError(f"prompt has {len(ids)} tokens; the limit is {self.max_prompt}")
        return ids

    def _max_new(self, params: SamplingParams, prompt_len: int) -> int:
        room = self.max_seq_len - prompt_len
        if not params.max_new_tokens:
            return max(1, min(self.config.default_max_new_tokens, self.max_new_limit, room))
        if params.max_new_tokens > self.max_new_limit:
            raise InvalidRequestError(f"max_new_tokens {params.max_new_tokens} is above the limit {self.max_new_limit}")
        if params.max_new_tokens > room:
            raise InvalidRequestError(f"max_new_tokens {params.max_new_tokens} does not fit: the prompt has "
                                      f"{prompt_len} tokens and the context is {self.max_seq_len}")
        return params.max_new_tokens

    # ------------------------------------------------------------------ the loop
    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _loop(self) -> None:
        cpu_threads.set_threads(self._threads)
        stepped = False  # since the engine last went idle
        try:
            while True:
                with self._lock:
                    if self._halt:
                        break
                    if not self._running and not self._waiting:
                        if stepped:  # a burst is over: the memory its steps freed goes back to the system
                            host_memory.release_free_memory()
                            stepped = False
                        self._lock.wait()
                        continue
                try:
                    ran = self._step()
                    stepped = stepped or ran
                except Exception as exc:  # noqa: BLE001 - a fault fails the step's requests, never the server
                    log.exception("engine step failed")
                    self._fail_running(exc)
                    ran = True
                if not ran:  # queued requests wait for adapter loads: poll, or wake on submit / cancel
                    with self._lock:
                        if not self._halt:
                            self._lock.wait(timeout=self.config.idle_poll_s)
        finally:
            self._shutdown()

    def _step(self) -> bool:
        """One forward pass over every running sequence and the prompts admitted now; False if none ran."""
        start = now()
        self._reap_cancelled()
        admitted = self._admit()
        if not self._running:
            return False
        graphed = self._graph_step(admitted)
        if graphed is not None:
            order, logits = graphed
        else:
            # rows: running sequences first, then the new prompts, each part grouped by adapter (one slice each)
            # each part in factor-pool slot order: a batch that keeps its adapters reads one run of the pool, and
            # equal prompts of adapters in consecutive slots form a block that is stacked too
            def by_slot(s: _Seq) -> tuple[int, tuple[int, int]]:
                return self.adapted.stack_order(s.bound, s.task_index), s.key

            order = sorted((s for s in self._running if s.kv_len > 0), key=by_slot) + sorted(admitted, key=by_slot)
            runs = [s.next_run() for s in order]
            self._plan_merge(order)
            step = build_step(runs, self.device)
            with torch.no_grad(), self.adapted.batch([(s.bound, s.task_index) for s in order],
                                                     [len(r.tokens) for r in runs]):
                logits = self.forward(step, self.cache)  # [B, V]
        tokens = sample(logits, [s.sampler for s in order]).tolist()  # the one host sync of a step
        t = now()
        for seq in order:  # all first: a sequence leaving below moves another one's slot
            seq.kv_len = seq.kv_len + 1 if seq.kv_len else len(seq.prompt)
            if seq.t_first is None:
                seq.t_first = t
        for seq, token in zip(order, tokens):
            self._accept(seq, token)
        self._steps += 1
        prefill = sum(len(s.prompt) for s in admitted)
        self._observe_step(StepRecord(len(order), prefill, len(self._waiting), len(self._running), now() - start))
        return True

    def _graph_step(self, admitted: list[_Seq]) -> tuple[list[_Seq], torch.Tensor] | None:
        """A decode-only step replayed as a CUDA graph (forward/graphs.py): (rows in KV-slot order, logits [B, V]);
        None where one cannot run (a prompt in the step, merged weights, an adapter the graph cannot serve)."""
        if self.graphs is None or not self.graphs.enabled or admitted or self.adapted.merged is not None:
            return None
        order = list(self.slots.owners)  # row i is the sequence in KV slot i
        slots = [self.graphs.adapter_slot(s.bound, s.task_index) for s in order]
        if None in slots:
            return None
        logits = self.graphs.run([s.generated[-1] for s in order], [s.kv_len for s in order], slots)
        return None if logits is None else (order, logits)

    def _accept(self, seq: _Seq, token: int) -> None:
        seq.generated.append(token)
        reason = None
        if token in self.eos and not seq.params.ignore_eos:
            text, reason = seq.stream.finish(), FinishReason.EOS
        else:
            text, stopped = seq.stream.push(token)
            if stopped:
                reason = FinishReason.STOP
            elif len(seq.generated) >= seq.max_new:
                text, reason = text + seq.stream.finish(), FinishReason.LENGTH
        seq.text.append(text)
        seq.handle._push(StreamDelta(text, [token], reason))
        if reason is not None:
            self._retire(seq, reason)

    # ------------------------------------------------------------------ admission and leaving
    def _admit(self) -> list[_Seq]:
        """Move queued requests into free slots, in order, within the prefill budget.

        A request whose adapter is not on the device yet stays queued without holding back the ones behind
        it. Once it has waited `adapter_wait_s`, it is starved: it holds back the requests behind it that would
        take a device slot (their adapters are not running), and the running adapter with the fewest rows
        takes no new request until it drains, which frees a slot for it. Requests for the other running
        adapters and for the base model still join, so the batch stays full (docs/design.md §4)."""
        with self._lock:
            queued = list(self._waiting)
        admitted: list[_Seq] = []
        budget = self.prefill_budget
        lookahead = self.config.prefetch_lookahead
        rows = Counter(s.adapter for s in self._running if s.adapter)  # running rows per adapter
        starved: _Seq | None = None  # the first request past adapter_wait_s
        full = False
        for seq in queued:
            if starved is not None and seq.adapter and (seq.adapter == starved.drain or seq.adapter not in rows):
                continue  # it would take the device slot the starved request waits for
            full = full or self.slots.free == 0 or (bool(admitted) and len(seq.prompt) > budget)
            if full:  # no room this step: warm the adapters of the next few in line
                if lookahead <= 0:
                    break
                lookahead -= 1
                self._prefetch(seq)
                continue
            try:
                lease = self.manager.acquire(seq.adapter) if seq.adapter else None
                if seq.adapter and lease is None:  # loading in the background, or no device slot: retry
                    seq.t_blocked = seq.t_blocked or now()
                    if starved is None and now() - seq.t_blocked >= self.config.adapter_wait_s:
                        starved = seq
                        if seq.drain not in rows:
                            seq.drain = self._drain_choice(rows)
                    continue
                seq.lease, seq.bound = lease, (lease.bound if lease is not None else None)
                seq.sampler = RowSampler.create(seq.params, self.device)
            except Exception as exc:  # noqa: BLE001 - AdapterError (load failed, unloaded) or a manager fault
                if not isinstance(exc, AdapterError):
                    log.exception("admitting a request for adapter %r failed", seq.adapter)
                self._dequeue(seq)
                self._end(seq, "error", error=exc)
                continue
            self._dequeue(seq)
            seq.t_admit = now()
            self.slots.add(seq)
            self._running.append(seq)
            admitted.append(seq)
            budget -= len(seq.prompt)
            if seq.adapter:
                rows[seq.adapter] += 1
        return admitted

    def _drain_choice(self, rows: Counter) -> str | None:
        """The running adapter to drain for a starved request: the unpinned one with the fewest rows (a
        pinned adapter keeps its slot when it drains)."""
        candidates = [name for name in rows if not self.manager.is_pinned(name)]
        return min(candidates, key=lambda name: (rows[name], name)) if candidates else None

    def _prefetch(self, seq: _Seq) -> None:
        """Warm the adapter of a request that cannot run yet (a lease taken now is given back at once)."""
        if not seq.adapter:
            return
        try:
            lease = self.manager.acquire(seq.adapter)
        except AdapterError:
            return  # raised again, and handled, when the request is admitted
        if lease is not None:
            lease.release()

    def _dequeue(self, seq: _Seq) -> None:
        with self._lock:
            self._waiting.remove(seq)
            self._lock.notify_all()

    def _reap_cancelled(self) -> None:
        for seq in [s for s in self._running if s.handle.cancelled]:
            text = seq.stream.finish()
            seq.text.append(text)
            seq.handle._push(StreamDelta(text, [], FinishReason.CANCELLED))
            self._retire(seq, FinishReason.CANCELLED)
        with self._lock:
            gone = [s for s in self._waiting if s.handle.cancelled]
        for seq in gone:
            self._dequeue(seq)
            seq.handle._push(StreamDelta("", [], FinishReason.CANCELLED))
            self._end(seq, FinishReason.CANCELLED)

    def _retire(self, seq: _Seq, reason: str, error: BaseException | None = None) -> None:
        """A running sequence leaves: free its slot (the last slot's owner moves in) and its lease."""
        if seq.slot >= 0:
            self.slots.remove(seq)
        if seq in self._running:
            self._running.remove(seq)
        self._end(seq, reason, error)

    def _end(self, seq: _Seq, outcome: str, error: BaseException | None = None) -> None:
        if seq.lease is not None:
            seq.lease.release()
            seq.lease = seq.bound = None
        end = now()
        if error is None:
            seq.handle._finish(GenerationResult("".join(seq.text), list(seq.generated), outcome, len(seq.prompt),
                                                len(seq.generated), seq.adapter))
        else:
            outcome = "error"
            seq.handle._finish(None, error)
        observer = self.config.observer
        if observer is not None:
            record = RequestRecord(
                seq.adapter, seq.task_id, outcome, end - seq.t_submit,
                None if seq.t_first is None else seq.t_first - seq.t_submit,
                None if seq.t_admit is None else seq.t_admit - seq.t_submit, len(seq.prompt), len(seq.generated),
            )
            _notify(observer.request_finished, record)
        with self._lock:
            self._lock.notify_all()  # stop() waits for the engine to drain

    def _fail_running(self, exc: BaseException) -> None:
        for seq in list(self._running):
            self._retire(seq, "error", error=exc)
        self.adapted.unmerge()

    def _shutdown(self) -> None:
        for seq in list(self._running):
            text = seq.stream.finish()
            seq.text.append(text)
            seq.handle._push(StreamDelta(text, [], FinishReason.CANCELLED))
            self._retire(seq, FinishReason.CANCELLED)
        with self._lock:
            self._accepting = False
            queued, self._waiting = self._waiting, []
        for seq in queued:
            seq.handle._push(StreamDelta("", [], FinishReason.CANCELLED))
            self._end(seq, FinishReason.CANCELLED)

    # ------------------------------------------------------------------ merge or batch
    def _plan_merge(self, order: list[_Seq]) -> None:
        """Merged weights serve a batch whose rows all use one mergeable (adapter, task); anything else runs
        unmerged. "batch" never merges; "merge" merges as soon as it can; "auto" after `merge_after_steps`
        homogeneous steps in a row, so that a mix that changes every few steps does not pay for merging. With CUDA
        graphs on, "auto" never merges: a graph replays the unmerged step, and merged weights run eagerly."""
        mode = self.config.merge_mode
        if mode == "auto" and self.graphs is not None and self.graphs.enabled:
            mode = "batch"  # a graph replays unmerged steps; merged weights would take every step off the graphs
        first = order[0]
        homogeneous = first.bound is not None and first.bound.mergeable and all(s.key == first.key for s in order)
        target = (first.bound, first.task_index) if homogeneous else None
        streak = self._homogeneous[1] + 1 if homogeneous and self._homogeneous[0] == first.key else 1
        self._homogeneous = (first.key if homogeneous else None, streak)
        merged = self.adapted.merged
        if merged is not None and (mode == "batch" or target is None or merged[0] is not target[0]
                                   or merged[1] != target[1]):
            self.adapted.unmerge()
            merged = None
        if mode == "batch" or target is None or merged is not None:
            return
        if mode == "merge" or streak >= self.config.merge_after_steps:
            try:
                self.adapted.merge(*target)
            except (AdapterError, RuntimeError) as exc:  # e.g. out of memory for the merged weights
                log.warning("merging adapter %r failed, serving it unmerged: %s", first.adapter, exc)

    # ------------------------------------------------------------------ observation
    def _observe_step(self, record: StepRecord) -> None:
        if self.config.observer is not None:
            _notify(self.config.observer.step, record)


def _notify(callback, record) -> None:
    try:
        callback(record)
    except Exception:  # noqa: BLE001 - metrics never break serving
        log.exception("engine observer failed")


def _base_route(task_id: str) -> None:
    if task_id != "":
        raise UnknownTaskError(f"unknown task id {task_id!r} (this engine serves only the base model)")
    return None


def _eos_ids(tokenizer, model) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(getattr(model, "generation_config", None),
                                                                      "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(i for i in source if isinstance(i, int))
    return ids
