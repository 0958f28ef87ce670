"""Every dashboard query and alert expression, run by a real Prometheus on a real server.

A moe-router server (a subprocess, two small routers) takes a short mixed load from the
real client: good calls on both layers, repeated payloads (cache hits), concurrent
callers (batches), an unknown layer and a wrong width (NOT_FOUND, INVALID_ARGUMENT). A
Prometheus on loopback scrapes it every second with the labels the Prometheus Operator
adds (namespace, pod) and evaluates deploy/prometheus/alerts.yml every second. Then,
through Prometheus' HTTP API:

- every dashboard target and every recording rule returns at least one finite sample;
- every dashboard variable's label_values() finds values;
- every alert: Prometheus evaluated the rule without error (health "ok" in
  /api/v1/rules), its expression runs as a query, every series it names exists (a
  /api/v1/series lookup per name), and its signal, the expression without the final
  threshold comparison, returns a finite sample. An alert need not fire on a healthy
  server, so its full expression may return nothing;
- both prometheus-adapter metricsQuery templates, filled in, return data.

Queries that read only Kubernetes' series (cAdvisor, kube-state-metrics: the memory
panel and alert) cannot find data here; they must still evaluate without error, and
exactly those are exempt from "returns data".

Skipped only where the prometheus binary is missing (scripts/install_prometheus.py
installs it in `make test`).
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from observability_files import (
    ALERTS,
    KUBERNETES_SERIES,
    Query,
    adapter_queries,
    alert_queries,
    alert_signal,
    dashboard_queries,
    dashboard_variables,
    recording_queries,
    substitute_variables,
)
from server_process import ServerProcess, small_routers, start_server, write_config

from moe_router_client import RouterClient
from moe_router_client.errors import RouterError

NAMESPACE = "moe-router"
POD = "moe-router-test-0"
RATE_WINDOW = "20s"  # Grafana's $__rate_interval here: a 1 s scrape, ~15 s of load
VARIABLES = {"namespace": NAMESPACE, "pod": ".*", "router": ".*", "layer": ".*",
             "__rate_interval": RATE_WINDOW}
LOAD_SECONDS = 12.0
CALLERS = 4


@dataclass(frozen=True)
class Prometheus:
    """A Prometheus server on loopback and its HTTP API."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as reply:
            body = json.load(reply)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]

    def series(self, match: str) -> list[dict[str, str]]:
        end = time.time()
        return self.api("series", **{"match[]": match, "start": str(end - 600), "end": str(end)})

    def query_error(self, expr: str) -> str | None:
        """Prometheus' error text for ``expr``, or None when it evaluates."""
        try:
            self.query(expr)
        except urllib.error.HTTPError as exc:
            return exc.read().decode(errors="replace")
        return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _finite(result: list[dict[str, Any]]) -> list[float]:
    return [float(s["value"][1]) for s in result if math.isfinite(float(s["value"][1]))]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    routers = [r for r in small_routers() if r["name"] in {"mixtral", "deepseek"}]
    config = write_config(tmp_path_factory.mktemp("live") / "config.yaml", routers)
    process = start_server(config)
    yield process
    assert process.terminate() == 0, process.log()


@pytest.fixture(scope="module")
def prometheus(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (scripts/install_prometheus.py)")
    work = tmp_path_factory.mktemp("prometheus")
    (work / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{
            "job_name": "moe-router",
            "static_configs": [{
                "targets": [f"127.0.0.1:{server.metrics_port}"],
                "labels": {"namespace": NAMESPACE, "pod": POD},
            }],
        }],
    }))
    address = f"127.0.0.1:{_free_port()}"
    log_path = work / "prometheus.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={work / 'prometheus.yml'}",
         f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address={address}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    prom = Prometheus(f"http://{address}", proc, log_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        yield prom
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _load(target: str, seconds: float) -> dict[str, int]:
    """Mixed traffic from CALLERS threads; returns how many calls ended how."""
    outcomes: dict[str, int] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def caller(index: int) -> None:
        rng = np.random.default_rng(index)
        repeated = rng.standard_normal((8, 64), dtype=np.float32)
        with RouterClient(target, timeout=10.0) as client:
            n = 0
            while time.monotonic() < deadline:
                n += 1
                try:
                    if n % 10 == 0:
                        client.route("mixtral", repeated, layer=7)  # no layer 7: NOT_FOUND
                    elif n % 10 == 5:
                        client.route("mixtral", rng.standard_normal((4, 3), dtype=np.float32))
                    elif n % 3 == 0:
                        client.route("mixtral", repeated, layer=1)  # cache hits after the first
                    elif n % 3 == 1:
                        client.route("deepseek", rng.standard_normal((16, 32), dtype=np.float32))
                    else:
                        tokens = int(rng.integers(1, 64))
                        client.route("mixtral", rng.standard_normal((tokens, 64), dtype=np.float32),
                                     layer=n % 2)
                    code = "OK"
                except RouterError as exc:
                    code = exc.code.name
                with lock:
                    outcomes[code] = outcomes.get(code, 0) + 1

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(CALLERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


@pytest.fixture(scope="module")
def loaded(server: ServerProcess, prometheus: Prometheus) -> Prometheus:
    """Prometheus after the load, with every rule evaluated at least once since."""
    outcomes = _load(server.target, LOAD_SECONDS)
    assert outcomes.get("OK", 0) > 100 and outcomes.get("NOT_FOUND", 0) > 0, outcomes
    assert outcomes.get("INVALID_ARGUMENT", 0) > 0, outcomes
    time.sleep(2.5)  # two more scrapes and rule evaluations
    targets = prometheus.api("targets")["activeTargets"]
    assert [t["health"] for t in targets] == ["up"], targets
    return prometheus


def _assert_returns_data(prom: Prometheus, query: Query, expr: str) -> None:
    if query.external:
        error = prom.query_error(expr)
        assert error is None, f"{query.origin} does not evaluate: {error}\n{expr}"
        return
    values = _finite(prom.query(expr))
    assert values, f"{query.origin} returned no finite sample:\n{expr}"


def test_every_dashboard_query_returns_data(loaded):
    queries = dashboard_queries()
    assert len(queries) >= 25
    for query in queries:
        _assert_returns_data(loaded, query, substitute_variables(query.expr, VARIABLES))
    assert [q.origin for q in queries if q.external] == ["panel 'Memory' A", "panel 'Memory' B"]


def test_every_dashboard_variable_finds_values(loaded):
    expected = {"namespace": {NAMESPACE}, "pod": {POD}, "router": {"mixtral", "deepseek"},
                "layer": {"0", "1"}}
    for var in dashboard_variables():
        match = substitute_variables(var.match, VARIABLES) if var.match else None
        params = {"match[]": match} if match else {}
        values = set(loaded.api(f"label/{var.label}/values", **params))
        assert values == expected[var.name], (var, values)


def test_every_rule_evaluates_without_error_in_prometheus(loaded):
    groups = loaded.api("rules")["groups"]
    evaluated = {r["name"]: r for g in groups for r in g["rules"]}
    in_file = {q.origin.split(" ", 1)[1] for q in recording_queries() + alert_queries()}
    assert set(evaluated) == in_file
    for name, rule in evaluated.items():
        assert rule["health"] == "ok" and not rule.get("lastError"), (name, rule)


def test_every_recording_rule_returns_data(loaded):
    for query in recording_queries():
        _assert_returns_data(loaded, query, query.expr)
        name = query.origin.split(" ", 1)[1]
        assert _finite(loaded.query(name)), f"{name} was never recorded"


def test_every_alert_expression_evaluates_and_its_series_exist(loaded):
    for query in alert_queries():
        error = loaded.query_error(query.expr)
        assert error is None, f"{query.origin} does not evaluate: {error}"
        for name in query.metric_names() - KUBERNETES_SERIES:
            assert loaded.series(name), f"{query.origin}: no series {name}"
        _assert_returns_data(loaded, alert_signal(query), alert_signal(query).expr)
    external = [q.origin for q in alert_queries() if q.metric_names() & KUBERNETES_SERIES]
    assert external == ["alert MoeRouterMemoryNearLimit"]


def test_no_alert_fires_on_a_healthy_server(loaded):
    firing = [a for a in loaded.api("alerts")["alerts"] if a["state"] == "firing"]
    assert firing == []


def test_the_autoscaler_metrics_of_prometheus_adapter_return_data(loaded):
    matchers = f'namespace="{NAMESPACE}",pod=~"{POD}"'
    for query in adapter_queries("pod", matchers):
        result = loaded.query(query.expr)
        assert _finite(result), f"{query.origin} returned nothing:\n{query.expr}"
        assert {s["metric"]["pod"] for s in result} == {POD}


def test_the_prometheus_log_has_no_rule_errors(loaded):
    text = loaded.log.read_text()
    assert "Evaluating rule failed" not in text, text[-2000:]
