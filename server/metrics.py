"""Prometheus metrics: every series the server exports, defined in one place.

Each `Metrics` owns its own `CollectorRegistry` (tests and several servers in one process never share
series) and is fed by the engine and the servicer through a few plain methods; it knows nothing of gRPC
or torch. `start_http(port)` serves the registry at `/metrics`.

The `adapter` label is bounded (`--metrics-adapter-label-limit N`): the first N distinct adapter names seen
get their own label value for the life of the process, every later one is counted under `__other__`, so
thousands of adapters cannot blow up the scrape. Base-model requests (task id "") use `__base__`, which does
not count toward the limit. An adapter actually named `__base__` or `__other__` is counted under `__other__`,
so the two reserved values always mean what they say.

Histogram buckets are explicit and span CPU and GPU serving (see the `*_BUCKETS` constants): a tiny model on
a CPU decodes a token in about a millisecond, a 7B model on a CPU takes about a second, and a request may
run for minutes.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client import disable_created_metrics

# `*_created` series double the size of every scrape and nobody graphs them (vLLM does the same).
disable_created_metrics()

ADAPTER_BASE = "__base__"  # label value of requests served by the base model (task id "")
ADAPTER_OVERFLOW = "__other__"  # label value of every adapter past the label limit
DEFAULT_ADAPTER_LABEL_LIMIT = 100

RESIDENCIES = ("disk", "host", "device")
LOAD_RESULTS = ("success", "failure")

# Whole requests: 10 ms (a few tokens of a tiny model) to 5 min (a long generation on a CPU).
REQUEST_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
# Time to first token (queueing + prefill): 1 ms (GPU, short prompt) to 60 s (CPU, long prompt, long queue).
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                20.0, 60.0)
# One decode step per token: 1 ms (tiny model, or a GPU) to 2.5 s (a 7B model on a CPU).
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.4, 0.5, 0.75, 1.0, 2.5)
# Sequences per forward pass: powers of two up to 512.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Reading and validating an adapter: 1 ms (a tiny LoRA from page cache) to 60 s (a big one from slow disk).
ADAPTER_LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class AdapterLabels:
    """Maps adapter names to a bounded set of label values (thread-safe).

    The first `limit` distinct names keep their own value for good; later ones map to ADAPTER_OVERFLOW.
    Slots are never reused: a series, once exported, stays, so reusing a slot would not bound the scrape.
    """

    def __init__(self, limit: int = DEFAULT_ADAPTER_LABEL_LIMIT) -> None:
        if limit < 0:
            raise ValueError(f"adapter label limit must be >= 0, got {limit}")
        self.limit = limit
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, adapter: str) -> str:
        if not adapter:
            return ADAPTER_BASE
        if adapter in (ADAPTER_BASE, ADAPTER_OVERFLOW):
            return ADAPTER_OVERFLOW
        with self._lock:
            if adapter in self._known:
                return adapter
            if len(self._known) < self.limit:
                self._known.add(adapter)
                return adapter
        return ADAPTER_OVERFLOW


def _code_name(code: object) -> str:
    """A status code as its name: grpc.StatusCode.NOT_FOUND (or any enum) -> "NOT_FOUND"; a string as is."""
    return code.name if isinstance(code, enum.Enum) else str(code)


class Metrics:
    """The server's Prometheus metrics, on a registry of their own.

    The engine calls `observe_step`, `set_queue_depth`, `set_running_requests`; the servicer calls
    `request_finished` once per request, whatever its outcome; the adapter manager calls `adapter_loaded`,
    `adapter_evicted` and `set_adapters`.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        adapter_label_limit: int = DEFAULT_ADAPTER_LABEL_LIMIT,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.adapter_label = AdapterLabels(adapter_label_limit)
        self._http: WSGIServer | None = None
        r = self.registry
        # begin-metrics-definitions (names, types and labels are part of CONTRACT.md)
        self.requests = Counter(
            "loraplex_requests_total", "Finished generation requests, by adapter and gRPC status code.",
            ["adapter", "code"], registry=r)
        self.request_duration = Histogram(
            "loraplex_request_duration_seconds", "Time from receiving a generation request to its last token.",
            ["adapter"], buckets=REQUEST_DURATION_BUCKETS, registry=r)
        self.time_to_first_token = Histogram(
            "loraplex_time_to_first_token_seconds", "Time from receiving a request to its first generated token.",
            ["adapter"], buckets=TTFT_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            "loraplex_time_per_output_token_seconds",
            "Mean time between a request's generated tokens after the first (one observation per request).",
            buckets=TPOT_BUCKETS, registry=r)
        self.prompt_tokens = Counter(
            "loraplex_prompt_tokens_total", "Prompt tokens processed.", ["adapter"], registry=r)
        self.generated_tokens = Counter(
            "loraplex_generated_tokens_total", "Tokens generated.", ["adapter"], registry=r)
        self.queue_depth = Gauge(
            "loraplex_queue_depth", "Requests admitted and waiting for a batch slot.", registry=r)
        self.running_requests = Gauge(
            "loraplex_running_requests", "Requests in the running batch.", registry=r)
        self.batch_size = Histogram(
            "loraplex_batch_size", "Sequences per forward pass.", buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.adapter_loads = Counter(
            "loraplex_adapter_loads_total",
            "Adapter loads from disk (LoadAdapter, start-up, reload after eviction), by result.",
            ["result"], registry=r)
        self.adapter_load_duration = Histogram(
            "loraplex_adapter_load_duration_seconds", "Time to read and validate an adapter.",
            buckets=ADAPTER_LOAD_BUCKETS, registry=r)
        self.adapter_evictions = Counter(
            "loraplex_adapter_evictions_total", "Adapters evicted from device or host memory.", registry=r)
        self.adapters = Gauge(
            "loraplex_adapters", "Adapters known to the server, by where their weights are.", ["residency"],
            registry=r)
        # end-metrics-definitions
        for result in LOAD_RESULTS:  # labelled series appear only once used: show the known ones at 0
            self.adapter_loads.labels(result=result)
        for residency in RESIDENCIES:
            self.adapters.labels(residency=residency).set(0)

    # --- requests (servicer) ---

    def request_finished(
        self,
        adapter: str,
        code: object,
        duration: float,
        ttft: float | None = None,
        prompt_tokens: int = 0,
        generated_tokens: int = 0,
    ) -> None:
        """Record one finished request, successful or not.

        Args:
            adapter: the adapter that served it ("" = base model); bounded by the label limit.
            code: its gRPC status code (a `grpc.StatusCode` or its name, e.g. "OK", "NOT_FOUND").
            duration: seconds from receipt to the end.
            ttft: seconds from receipt to the first generated token; None if no token was generated.
            prompt_tokens, generated_tokens: token counts (0 for a request refused before tokenizing).
        """
        label = self.adapter_label(adapter)
        self.requests.labels(adapter=label, code=_code_name(code)).inc()
        self.request_duration.labels(adapter=label).observe(duration)
        if prompt_tokens:
            self.prompt_tokens.labels(adapter=label).inc(prompt_tokens)
        if generated_tokens:
            self.generated_tokens.labels(adapter=label).inc(generated_tokens)
        if ttft is not None:
            self.time_to_first_token.labels(adapter=label).observe(ttft)
            if generated_tokens > 1:
                self.time_per_output_token.observe(max(duration - ttft, 0.0) / (generated_tokens - 1))

    # --- scheduling (engine) ---

    def observe_step(self, batch_size: int) -> None:
        """One forward pass over `batch_size` sequences."""
        self.batch_size.observe(batch_size)

    def set_queue_depth(self, n: int) -> None:
        self.queue_depth.set(n)

    def set_running_requests(self, n: int) -> None:
        self.running_requests.set(n)

    # --- adapters (manager) ---

    def adapter_loaded(self, result: str, seconds: float | None = None) -> None:
        """One attempt to load an adapter from disk: `result` is "success" or "failure"."""
        if result not in LOAD_RESULTS:
            raise ValueError(f"adapter load result must be one of {LOAD_RESULTS}, got {result!r}")
        self.adapter_loads.labels(result=result).inc()
        if seconds is not None:
            self.adapter_load_duration.observe(seconds)

    def adapter_evicted(self, n: int = 1) -> None:
        self.adapter_evictions.inc(n)

    def set_adapters(self, residency_counts: Mapping[str, int]) -> None:
        """How many adapters are on disk only, in host memory, on the device; residencies not given are 0."""
        unknown = set(residency_counts) - set(RESIDENCIES)
        if unknown:
            raise ValueError(f"unknown residency {sorted(unknown)}; expected {RESIDENCIES}")
        for residency in RESIDENCIES:
            self.adapters.labels(residency=residency).set(residency_counts.get(residency, 0))

    # --- exposition ---

    def render(self) -> bytes:
        """The registry in the Prometheus text format (what a scrape of /metrics returns)."""
        return generate_latest(self.registry)

    def start_http(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve `/metrics` on host:port in a daemon thread; returns the bound port (pass 0 for any free one)."""
        if self._http is not None:
            raise RuntimeError("metrics HTTP server already started")
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def stop_http(self) -> None:
        """Stop the `/metrics` server, if started."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
