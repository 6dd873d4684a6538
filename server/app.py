"""`loraplex serve`: the whole server on one port, built from `ServeOptions`.

    options = ServeOptions(adapter_dir="adapters/", port=0)
    with BackgroundServer(options) as server:          # or: asyncio.run(serve(options)) in the foreground
        Client(server.address).generate("sentiment", "The film was")

One grpc.aio server carries `loraplex.v1.Generation`, `loraplex.v1.AdapterAdmin`, the standard
`grpc.health.v1.Health` service and reflection. The port opens at once with health NOT_SERVING; the model is
loaded, the adapters under `--adapter-dir` are loaded, one warm-up request runs, and only then does health
say SERVING and the one ready line get logged. Prometheus metrics are served over HTTP on their own port.

SIGTERM (or Ctrl-C) drains: health turns NOT_SERVING, new RPCs get UNAVAILABLE, requests in flight finish
within `--shutdown-grace` seconds (the rest are cancelled), and the process exits 0. A second signal cancels
what is still running at once.

Heavy modules (torch, transformers, the engine) are imported only when a server starts, so that
`loraplex --help` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from ..envflags import apply_env_defaults, env_errors
from .auth import AuthInterceptor, token_from

if TYPE_CHECKING:
    from .engine import Engine
    from .manager import AdapterManager
    from .metrics import Metrics
    from .request import StepRecord

log = logging.getLogger("loraplex")

GAUGE_REFRESH_S = 1.0  # queue depth, running requests and adapter residency are also refreshed this often
WARMUP_TIMEOUT_S = 600.0
# the values of the options that take one of a few (the flags' choices, and what `ServeOptions.check` accepts)
CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "merge_mode": ("auto", "merge", "batch"),
    "grouped_kernels": ("auto", "torch", "triton"),
    "cuda_graphs": ("on", "off"),
}


@dataclass
class ServeOptions:
    """Everything `loraplex serve` takes (the flags, one to one)."""

    base_model: str | None = None  # a directory or Hub id; None: the built-in default model
    adapter_dir: str | None = None  # every adapter directory directly under it is loaded at start
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (the ready line shows it)
    metrics_port: int | None = 9090  # 0: any free port; None: no metrics HTTP server
    device: str = "auto"
    dtype: str = "auto"
    auth_token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    max_queued_requests: int = 256
    metrics_adapter_label_limit: int = 100
    max_batch_size: int = 64  # sequences running at once
    max_seq_len: int | None = None  # prompt + output per sequence; None: min(2048, the model's limit)
    max_prefill_tokens: int | None = None  # None: 512 on CPU, 4096 on CUDA
    default_max_new_tokens: int = 256
    max_new_tokens_limit: int | None = None
    kv_cache_gib: float = 1.0
    device_adapters: int = 32  # adapters resident on the compute device at once
    adapter_wait: float = 2.0  # seconds a request waits for a device slot before it stops being overtaken
    host_adapters: int | None = None  # adapters kept in host memory; None: max(64, device_adapters)
    merge_mode: str = "auto"
    grouped_kernels: str = "auto"  # auto: the C kernel on CPU; on CUDA Triton inside graphs, torch in eager steps
    cuda_graphs: str = "on"  # on CUDA, decode-only steps replay CUDA graphs
    shutdown_grace: float = 30.0
    threads: int | None = None  # torch CPU threads; None: torch's default

    def check(self) -> None:
        """Refuse inconsistent options with a message naming the flag."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be in [0, 65535] (or negative to disable), got {self.metrics_port}")
        for flag in ("max_queued_requests", "max_batch_size", "max_prefill_tokens", "device_adapters"):
            if getattr(self, flag) is not None and getattr(self, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
        for flag, allowed in CHOICES.items():
            if getattr(self, flag) not in allowed:
                raise ValueError(f"--{flag.replace('_', '-')} must be one of {', '.join(allowed)}")
        if self.shutdown_grace < 0:
            raise ValueError("--shutdown-grace must be >= 0")
        if not self.adapter_wait >= 0:
            raise ValueError(f"--adapter-wait must be >= 0, got {self.adapter_wait}")
        if self.adapter_dir is not None and not Path(self.adapter_dir).is_dir():
            raise ValueError(f"--adapter-dir {self.adapter_dir!r} is not a directory")


def _HealthServicer():  # noqa: N802 - builds the class lazily (grpc_health is imported only when serving)
    """grpcio-health-checking's asyncio servicer plus the `List` RPC, which it leaves unimplemented (every
    call, unauthenticated ones included, would log an ERROR traceback)."""
    from grpc_health.v1 import health, health_pb2

    class HealthServicer(health.aio.HealthServicer):
        async def List(self, request: object, context: object) -> object:  # noqa: N802 - the RPC's name
            return health_pb2.HealthListResponse(statuses={
                name: health_pb2.HealthCheckResponse(status=status) for name, status in self._server_status.items()
            })

    return HealthServicer()


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class _MetricsBridge:
    """Feeds the Prometheus metrics from the engine (an EngineObserver) and the adapter manager (its events).
    Requests are counted by the servicer, which knows their status codes."""

    def __init__(self, metrics: "Metrics") -> None:
        self.metrics = metrics
        self.manager: "AdapterManager | None" = None
        self.engine: "Engine | None" = None

    def request_finished(self, record: object) -> None:
        """Keep the gauges true when a request leaves without a step after it (cancelled, failed, the last)."""
        if self.engine is not None:
            stats = self.engine.stats()
            self.metrics.set_queue_depth(stats.queue_depth)
            self.metrics.set_running_requests(stats.running)

    def step(self, record: "StepRecord") -> None:
        self.metrics.observe_step(record.batch_size)
        self.metrics.set_queue_depth(record.queue_depth)
        self.metrics.set_running_requests(record.running)

    def on_event(self, kind: str, event: dict[str, Any]) -> None:
        if kind == "load" and event.get("from") == "disk":  # a promotion host -> device reads no file
            self.metrics.adapter_loaded("success" if event.get("result") == "ok" else "failure", event.get("seconds"))
        elif kind == "evict":
            self.metrics.adapter_evicted()
        self.refresh_adapters()

    def refresh_adapters(self) -> None:
        if self.manager is not None:
            self.metrics.set_adapters(self.manager.residency_counts())

    def refresh(self, engine: "Engine") -> None:
        stats = engine.stats()
        self.metrics.set_queue_depth(stats.queue_depth)
        self.metrics.set_running_requests(stats.running)
        self.refresh_adapters()


class LoraplexServer:
    """One server. `await start()` (returns when SERVING), then `await shutdown(grace)`.

    `model` and `tokenizer` may be passed in (tests, embedding); otherwise `options.base_model` is loaded, or
    the built-in default model when it is None.
    """

    def __init__(self, options: ServeOptions, model: Any = None, tokenizer: Any = None,
                 model_name: str | None = None) -> None:
        options.check()
        self.options = options
        self._model, self._tokenizer = model, tokenizer
        self.model_name = model_name
        self.token = token_from(options.auth_token)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.engine: "Engine | None" = None
        self.manager: "AdapterManager | None" = None
        self.metrics: "Metrics | None" = None
        self._grpc: grpc.aio.Server | None = None
        self._health = None
        self._state = None
        self._bridge: _MetricsBridge | None = None
        self._refresher: asyncio.Task | None = None
        self._shutdown: asyncio.Task | None = None

    @property
    def address(self) -> str:
        """host:port of the gRPC server (the real port when started with port 0)."""
        return _hostport(self.options.host, self.port if self.port is not None else self.options.port)

    @property
    def tls(self) -> bool:
        return self.options.tls_cert is not None

    def ready_line(self) -> str:
        metrics = ("metrics off" if self.metrics_port is None
                   else f"metrics http://{_hostport(self.options.host, self.metrics_port)}/metrics")
        return f"loraplex ready: grpc {self.address}{' (tls)' if self.tls else ''}, {metrics}"

    # ------------------------------------------------------------------ start
    async def start(self) -> None:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection
        from loraplex_client.pb import loraplex_pb2, loraplex_pb2_grpc

        from .metrics import Metrics
        from .servicer import AdapterAdminServicer, ErrorInterceptor, GenerationServicer, ServingState

        o = self.options
        interceptors = ([AuthInterceptor(self.token)] if self.token else []) + [ErrorInterceptor()]
        # so_reuseport off: a port already taken is an error, not a second server sharing it
        server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
        self._state = ServingState()
        loraplex_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(self._state), server)
        loraplex_pb2_grpc.add_AdapterAdminServicer_to_server(AdapterAdminServicer(self._state), server)
        self._health = _HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        services = [loraplex_pb2.DESCRIPTOR.services_by_name[s].full_name for s in ("Generation", "AdapterAdmin")]
        for service in ["", *services]:
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection([*services, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        self.port = self._bind(server)
        self._grpc = server
        await server.start()
        try:
            self.metrics = Metrics(adapter_label_limit=o.metrics_adapter_label_limit)
            if o.metrics_port is not None:
                self.metrics_port = self.metrics.start_http(o.metrics_port, o.host)
            await asyncio.to_thread(self._build)
            from .servicer import Backend

            self._state.backend = Backend(self.engine, self.manager, self.metrics,
                                          admin_enabled=o.adapter_dir is not None)
            for service in ["", *services]:
                await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        except BaseException:
            await self._close(0.0)
            raise
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_gauges())
        log.info(self.ready_line())

    def _bind(self, server: grpc.aio.Server) -> int:
        o = self.options
        address = _hostport(o.host, o.port)
        try:
            if self.tls:
                key, cert = Path(o.tls_key).read_bytes(), Path(o.tls_cert).read_bytes()
                port = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
            else:
                port = server.add_insecure_port(address)
        except OSError as exc:
            raise RuntimeError(f"cannot read the TLS key or certificate: {exc}") from exc
        except RuntimeError as exc:
            raise RuntimeError(f"cannot listen on {address}: {exc}") from exc
        if not port:
            raise RuntimeError(f"cannot listen on {address} (in use, or not an address of this host?)")
        return port

    def _build(self) -> None:
        """Model, adapters, engine, warm-up (in a worker thread: it takes seconds to minutes)."""
        import torch

        from ..adapters import AdaptedModel
        from .engine import Engine, EngineConfig
        from .manager import AdapterManager
        from .request import SamplingParams

        from ..adapters import kernels

        o = self.options
        if o.threads:
            torch.set_num_threads(o.threads)
        kernels.select(o.grouped_kernels)
        model, tokenizer, name = self._load_model()
        adapted = AdaptedModel(model)
        log.info("serving %s on %s (%s)", name, adapted.device, str(adapted.dtype).removeprefix("torch."))
        self._bridge = _MetricsBridge(self.metrics)
        self.manager = AdapterManager(adapted, o.adapter_dir, device_capacity=o.device_adapters,
                                      host_capacity=o.host_adapters or max(64, o.device_adapters),
                                      on_event=self._bridge.on_event)
        self._bridge.manager = self.manager
        if o.adapter_dir is not None:
            infos = self.manager.load_all()
            log.info("%d adapters loaded from %s%s", len(infos), o.adapter_dir,
                     f" ({len(self.manager.load_errors)} refused, see the warnings above)"
                     if self.manager.load_errors else "")
        config = EngineConfig(max_slots=o.max_batch_size, max_seq_len=o.max_seq_len,
                              kv_cache_max_bytes=int(o.kv_cache_gib * (1 << 30)),
                              max_queued_requests=o.max_queued_requests, max_new_tokens_limit=o.max_new_tokens_limit,
                              default_max_new_tokens=o.default_max_new_tokens, max_prefill_tokens=o.max_prefill_tokens,
                              merge_mode=o.merge_mode, adapter_wait_s=o.adapter_wait, cuda_graphs=o.cuda_graphs == "on",
                              observer=self._bridge)
        self.engine = self._bridge.engine = Engine(adapted, tokenizer, self.manager, config)
        cache = self.engine.cache
        log.info("%d sequences run at once (--max-batch-size %d; KV cache %.0f MiB for --max-seq-len %d)",
                 cache.num_slots, o.max_batch_size, cache.nbytes / (1 << 20), self.engine.max_seq_len)
        self.engine.start()
        self.engine.generate("", "warm up", SamplingParams(max_new_tokens=2, ignore_eos=True), timeout=WARMUP_TIMEOUT_S)
        self._bridge.refresh(self.engine)

    def _load_model(self) -> tuple[Any, Any, str]:
        o = self.options
        if self._model is not None:
            return self._model, self._tokenizer, self.model_name or type(self._model).__name__
        if o.base_model is not None:
            from .loader import load_base

            log.info("loading %s", o.base_model)
            model, tokenizer = load_base(o.base_model, device=o.device, dtype=o.dtype)
            return model, tokenizer, o.base_model
        from .default_model import load_default

        return load_default(device=o.device, dtype=o.dtype)

    async def _refresh_gauges(self) -> None:
        while True:
            await asyncio.sleep(GAUGE_REFRESH_S)
            try:
                self._bridge.refresh(self.engine)
            except Exception:  # noqa: BLE001 - metrics never stop the server
                log.exception("refreshing the gauges failed")

    # ------------------------------------------------------------------ stop
    async def shutdown(self, grace: float | None = None) -> None:
        """Drain and stop (idempotent: a second call waits for the first, or cuts its grace to `grace`)."""
        grace = self.options.shutdown_grace if grace is None else grace
        if self._shutdown is None:
            self._shutdown = asyncio.get_running_loop().create_task(self._drain(grace))
        elif self.engine is not None and grace == 0.0:
            await asyncio.to_thread(self.engine.stop, 0.0)  # the running drain ends at once
        await asyncio.shield(self._shutdown)

    async def _drain(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        if self._state is not None:
            self._state.draining = True
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        log.info("shutting down: new requests are refused; waiting up to %.0f s for %s in flight", grace,
                 "the requests" if self.engine is None else f"{self._in_flight()} requests")
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop, grace)
        await self._close(max(deadline - time.monotonic(), 1.0))
        log.info("stopped")

    def _in_flight(self) -> int:
        stats = self.engine.stats()
        return stats.queue_depth + stats.running

    async def _close(self, grace: float) -> None:
        """Stop the gRPC server (RPCs still sending their last message get `grace` seconds), then the rest."""
        if self._refresher is not None:
            self._refresher.cancel()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop, 0.0)
        if self.manager is not None:
            await asyncio.to_thread(self.manager.close)
        if self.metrics is not None:
            self.metrics.stop_http()

    async def wait_for_termination(self) -> None:
        if self._grpc is not None:
            await self._grpc.wait_for_termination()


async def serve(options: ServeOptions) -> int:
    """Run a server in the foreground until SIGTERM / SIGINT; 0 after a clean shutdown."""
    server = LoraplexServer(options)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("%s received: draining (a second signal cancels what is still running)",
                     signal.Signals(signum).name)
            stop.set()
        else:
            log.warning("%s received again: cancelling the requests still running", signal.Signals(signum).name)
            loop.create_task(server.shutdown(0.0))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    starting = loop.create_task(server.start())
    waiting = loop.create_task(stop.wait())
    await asyncio.wait([starting, waiting], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # a signal while loading: give up on starting
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await server.shutdown(0.0)
        return 0
    starting.result()  # raises a start-up failure
    await waiting
    await server.shutdown()
    return 0


class BackgroundServer:
    """A `LoraplexServer` on its own event loop in a daemon thread: for tests, benchmarks and demos.

    `start()` returns once the server is SERVING (re-raising a start-up failure); `stop(grace)` drains it.
    """

    def __init__(self, options: ServeOptions, **kwargs: Any) -> None:
        self.server = LoraplexServer(options, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="loraplex-server", daemon=True)
        self._stopped = False

    @property
    def address(self) -> str:
        return self.server.address

    def start(self, timeout: float = 120.0) -> "BackgroundServer":
        from . import cpu_threads

        cpu_threads.release_pool()  # the caller's OpenMP workers (from training, say) would slow the engine
        self._thread.start()
        try:
            self.call(self.server.start(), timeout)
        except BaseException:
            self._stop_loop()
            raise
        return self

    def call(self, coro: Any, timeout: float | None = None) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def begin_stop(self, grace: float | None = None) -> concurrent.futures.Future:
        """Start draining (as SIGTERM does) without waiting; the future completes when stopped."""
        return asyncio.run_coroutine_threadsafe(self.server.shutdown(grace), self._loop)

    def stop(self, grace: float | None = 5.0, timeout: float | None = 120.0) -> None:
        if self._stopped:
            return
        try:
            self.begin_stop(grace).result(timeout)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._stopped = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------- command line
def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve the base model and its adapters over gRPC",
                              description="Serve one base model and many task adapters over gRPC.")
    d = ServeOptions()
    p.add_argument("--base-model", metavar="PATH_OR_HUB_ID",
                   help="base model directory or Hub id (default: the built-in default model, no network)")
    p.add_argument("--adapter-dir", metavar="DIR", help="load every adapter directory directly under DIR at start; "
                   "LoadAdapter paths are relative to it (without it, LoadAdapter is refused)")
    p.add_argument("--host", default=d.host, help="address to listen on (default %(default)s; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=d.port, help="gRPC port (default %(default)s; 0 picks a free one)")
    p.add_argument("--metrics-port", type=int, default=d.metrics_port,
                   help="Prometheus /metrics HTTP port (default %(default)s; 0 picks a free one; -1 disables)")
    p.add_argument("--device", default=d.device, choices=CHOICES["device"],
                   help="compute device of the model and adapters (auto: cuda when present)")
    p.add_argument("--dtype", default=d.dtype, choices=CHOICES["dtype"],
                   help="auto: bfloat16 on CUDA, float32 on CPU. On a GPU, bfloat16 matmuls round differently at "
                   "different batch sizes, so where two tokens nearly tie a batched request can differ from the same "
                   "request alone; float32 makes that far rarer")
    p.add_argument("--auth-token", metavar="TOKEN", help="require 'authorization: Bearer TOKEN' on every RPC but "
                   "health checks (default: none, no auth)")
    p.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain: serve TLS (with --tls-key)")
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    p.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests, metavar="N",
                   help="requests waiting beyond N get RESOURCE_EXHAUSTED (default %(default)s)")
    p.add_argument("--metrics-adapter-label-limit", type=int, default=d.metrics_adapter_label_limit, metavar="N",
                   help="distinct adapter label values in metrics; later adapters count as __other__ "
                   "(default %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, metavar="N",
                   help="sequences running at once (default %(default)s)")
    p.add_argument("--max-seq-len", type=int, metavar="N",
                   help="prompt + generated tokens per sequence (default: min(2048, the model's limit))")
    p.add_argument("--max-prefill-tokens", type=int, default=d.max_prefill_tokens, metavar="N",
                   help="prompt tokens admitted per step (default: 512 on CPU, 4096 on CUDA)")
    p.add_argument("--default-max-new-tokens", type=int, default=d.default_max_new_tokens, metavar="N",
                   help="max_new_tokens of a request that sends 0 (default %(default)s)")
    p.add_argument("--max-new-tokens-limit", type=int, metavar="N",
                   help="largest max_new_tokens accepted (default: max-seq-len - 1)")
    p.add_argument("--kv-cache-gib", type=float, default=d.kv_cache_gib, metavar="GIB",
                   help="KV cache budget; fewer sequences run at once if it is too small (default %(default)s)")
    p.add_argument("--device-adapters", type=int, default=d.device_adapters, metavar="N",
                   help="adapters resident on the device at once, LRU (default %(default)s)")
    p.add_argument("--host-adapters", type=int, metavar="N",
                   help="adapters kept in host memory, LRU (default: max(64, --device-adapters))")
    p.add_argument("--adapter-wait", type=float, default=d.adapter_wait, metavar="SECONDS",
                   help="when every device slot is in use, how long a request for another adapter waits before "
                   "requests that would take a device slot stop overtaking it and one running adapter drains to "
                   "free one (default %(default)s)")
    p.add_argument("--merge-mode", default=d.merge_mode, choices=CHOICES["merge_mode"],
                   help="when every running request uses one mergeable adapter, merge it into the weights: after "
                   "16 such steps in a row (auto), at once (merge), or never (batch)")
    p.add_argument("--grouped-kernels", default=d.grouped_kernels, choices=CHOICES["grouped_kernels"],
                   help="how steps that mix many adapters run: auto, a C kernel on CPU (compiled at first use; plain "
                   "torch without a C compiler), and on CUDA the Triton kernels inside CUDA graphs, plain torch in "
                   "eager steps; torch, plain torch everywhere (CUDA graphs then serve only steps without adapters); "
                   "triton, the Triton kernels on CUDA in eager steps too. Every kernel is checked against plain torch "
                   "at first use"),
    p.add_argument("--cuda-graphs", default=d.cuda_graphs, choices=CHOICES["cuda_graphs"],
                   help="on CUDA, replay decode-only steps as CUDA graphs (one per batch-size bucket, captured when "
                   "the engine starts, more for longer contexts as they come up; LoRA, MTL-LoRA and GIFT adapters go "
                   "through the Triton kernels inside them, and --merge-mode auto stops merging); off runs every step "
                   "eagerly. Ignored on CPU"),
    p.add_argument("--shutdown-grace", type=float, default=d.shutdown_grace, metavar="SECONDS",
                   help="on SIGTERM, how long requests in flight may take to finish (default %(default)s)")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log to stderr at this level and above")
    apply_env_defaults(p)
    return p


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    known = {f.name for f in fields(ServeOptions)}
    values = {k: v for k, v in vars(args).items() if k in known}
    if values.get("metrics_port") is not None and values["metrics_port"] < 0:
        values["metrics_port"] = None
    return ServeOptions(**values)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if env_errors(args):
            raise ValueError("; ".join(env_errors(args)))
        options = options_from_args(args)
        options.check()
        token_from(options.auth_token)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    try:
        return asyncio.run(serve(options))
    except Exception as exc:  # noqa: BLE001 - start-up failures: one clear line, no traceback wall
        log.error("loraplex serve failed: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return 1


__all__ = ["BackgroundServer", "LoraplexServer", "ServeOptions", "add_parser", "run", "serve"]
