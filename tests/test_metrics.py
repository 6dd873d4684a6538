"""Prometheus metrics: the names, types and labels of CONTRACT.md, the bounded adapter label, the scrape."""

from __future__ import annotations

import threading
import urllib.request

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from loraplex.server.metrics import ADAPTER_BASE, ADAPTER_OVERFLOW, AdapterLabels, Metrics

# CONTRACT.md's table: name -> (type, labels). Counter families are named without `_total` by the parser.
CONTRACT = {
    "loraplex_requests_total": ("counter", {"adapter", "code"}),
    "loraplex_request_duration_seconds": ("histogram", {"adapter"}),
    "loraplex_time_to_first_token_seconds": ("histogram", {"adapter"}),
    "loraplex_time_per_output_token_seconds": ("histogram", set()),
    "loraplex_prompt_tokens_total": ("counter", {"adapter"}),
    "loraplex_generated_tokens_total": ("counter", {"adapter"}),
    "loraplex_queue_depth": ("gauge", set()),
    "loraplex_running_requests": ("gauge", set()),
    "loraplex_batch_size": ("histogram", set()),
    "loraplex_adapter_loads_total": ("counter", {"result"}),
    "loraplex_adapter_load_duration_seconds": ("histogram", set()),
    "loraplex_adapter_evictions_total": ("counter", set()),
    "loraplex_adapters": ("gauge", {"residency"}),
}


def _exercise(m: Metrics) -> None:
    m.request_finished("sentiment", grpc.StatusCode.OK, duration=1.0, ttft=0.1, prompt_tokens=5, generated_tokens=10)
    m.request_finished("", "NOT_FOUND", duration=0.002)
    m.observe_step(3)
    m.set_queue_depth(4)
    m.set_running_requests(3)
    m.adapter_loaded("success", 0.05)
    m.adapter_loaded("failure")
    m.adapter_evicted()
    m.set_adapters({"device": 2, "host": 1})


def _families(m: Metrics) -> dict[str, tuple[str, set[str]]]:
    out = {}
    for family in text_string_to_metric_families(m.render().decode()):
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = set().union(*(set(s.labels) - {"le"} for s in family.samples)) if family.samples else set()
        out[name] = (family.type, labels)
    return out


def test_names_types_and_labels_match_the_contract() -> None:
    m = Metrics(CollectorRegistry())
    _exercise(m)
    families = _families(m)
    for name, expected in CONTRACT.items():
        assert families.get(name) == expected, name
    assert all(name.startswith("loraplex_") for name in families)


def test_values() -> None:
    m = Metrics(CollectorRegistry())
    _exercise(m)
    get = m.registry.get_sample_value
    assert get("loraplex_requests_total", {"adapter": "sentiment", "code": "OK"}) == 1
    assert get("loraplex_requests_total", {"adapter": ADAPTER_BASE, "code": "NOT_FOUND"}) == 1
    assert get("loraplex_prompt_tokens_total", {"adapter": "sentiment"}) == 5
    assert get("loraplex_generated_tokens_total", {"adapter": "sentiment"}) == 10
    assert get("loraplex_time_to_first_token_seconds_count", {"adapter": "sentiment"}) == 1
    assert get("loraplex_time_to_first_token_seconds_count", {"adapter": ADAPTER_BASE}) is None  # no token
    # (1.0 s - 0.1 s to the first token) / 9 later tokens
    assert get("loraplex_time_per_output_token_seconds_sum") == pytest.approx(0.1)
    assert get("loraplex_request_duration_seconds_bucket", {"adapter": ADAPTER_BASE, "le": "0.01"}) == 1
    assert get("loraplex_batch_size_sum") == 3
    assert (get("loraplex_queue_depth"), get("loraplex_running_requests")) == (4, 3)
    assert get("loraplex_adapter_loads_total", {"result": "success"}) == 1
    assert get("loraplex_adapter_loads_total", {"result": "failure"}) == 1
    assert get("loraplex_adapter_load_duration_seconds_count") == 1
    assert get("loraplex_adapter_evictions_total") == 1
    residency = {r: get("loraplex_adapters", {"residency": r}) for r in ("disk", "host", "device")}
    assert residency == {"disk": 0, "host": 1, "device": 2}


def test_known_label_values_are_exported_before_use() -> None:
    m = Metrics(CollectorRegistry())
    assert m.registry.get_sample_value("loraplex_adapter_loads_total", {"result": "failure"}) == 0
    assert m.registry.get_sample_value("loraplex_adapters", {"residency": "disk"}) == 0


def test_adapter_label_is_bounded() -> None:
    m = Metrics(CollectorRegistry(), adapter_label_limit=2)
    for name in ["a1", "a2", "a3", "a4", "a5", "a1"]:
        m.request_finished(name, "OK", duration=0.5, ttft=0.1, prompt_tokens=1, generated_tokens=2)
    m.request_finished("", "OK", duration=0.5)
    for metric in ("loraplex_requests", "loraplex_request_duration_seconds", "loraplex_time_to_first_token_seconds",
                   "loraplex_prompt_tokens", "loraplex_generated_tokens"):
        [family] = [f for f in m.registry.collect() if f.name == metric]
        values = {s.labels["adapter"] for s in family.samples}
        assert values - {ADAPTER_BASE} == {"a1", "a2", ADAPTER_OVERFLOW}, metric
    get = m.registry.get_sample_value
    assert get("loraplex_requests_total", {"adapter": ADAPTER_OVERFLOW, "code": "OK"}) == 3
    assert get("loraplex_requests_total", {"adapter": "a1", "code": "OK"}) == 2
    assert get("loraplex_requests_total", {"adapter": ADAPTER_BASE, "code": "OK"}) == 1


def test_adapter_labels_edge_cases() -> None:
    labels = AdapterLabels(0)
    assert (labels("x"), labels("")) == (ADAPTER_OVERFLOW, ADAPTER_BASE)
    labels = AdapterLabels(5)
    assert labels(ADAPTER_BASE) == ADAPTER_OVERFLOW and labels(ADAPTER_OVERFLOW) == ADAPTER_OVERFLOW
    with pytest.raises(ValueError):
        AdapterLabels(-1)


def test_adapter_labels_are_thread_safe() -> None:
    labels = AdapterLabels(10)
    results: list[str] = []
    lock = threading.Lock()

    def worker(offset: int) -> None:
        got = [labels(f"adapter-{(offset + i) % 50}") for i in range(200)]
        with lock:
            results.extend(got)

    threads = [threading.Thread(target=worker, args=(k * 7,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(set(results) - {ADAPTER_OVERFLOW}) == 10


def test_bad_values_are_refused() -> None:
    m = Metrics(CollectorRegistry())
    with pytest.raises(ValueError):
        m.adapter_loaded("maybe")
    with pytest.raises(ValueError):
        m.set_adapters({"gpu": 1})


def test_instances_do_not_share_series() -> None:
    a, b = Metrics(), Metrics()  # each makes a registry of its own: no "Duplicated timeseries" error
    a.adapter_evicted(2)
    assert b.registry.get_sample_value("loraplex_adapter_evictions_total") == 0


def test_scrape_over_http() -> None:
    m = Metrics(CollectorRegistry())
    _exercise(m)
    port = m.start_http(0, "127.0.0.1")
    try:
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200
            body = response.read().decode()
        for name in CONTRACT:
            assert f"# TYPE {name} {CONTRACT[name][0]}" in body, name
        assert 'loraplex_requests_total{adapter="sentiment",code="OK"} 1.0' in body
        with pytest.raises(RuntimeError):
            m.start_http(0, "127.0.0.1")
    finally:
        m.stop_http()
