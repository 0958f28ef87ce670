"""deploy/grafana and deploy/prometheus without a Prometheus: names, structure, promtool.

The queries themselves run on a real Prometheus in test_prometheus_live.py; here every
series they name must be one moe-router exports (or one of Kubernetes' own, listed in
KUBERNETES_SERIES), and the rules pass promtool's checks and unit tests.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from observability_files import (
    ALERT_TESTS,
    ALERTS,
    KUBERNETES_SERIES,
    Query,
    adapter_queries,
    alert_queries,
    alert_signal,
    dashboard,
    dashboard_panels,
    dashboard_queries,
    dashboard_variables,
    recording_queries,
    rules,
)
from prometheus_client import CollectorRegistry

from moe_router.chain.metrics import RouterMetrics

_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported_series() -> set[str]:
    """Every series name a moe-router server exposes (from its own metric families)."""
    registry = CollectorRegistry()
    RouterMetrics(registry)
    names = set()
    for family in registry.collect():
        names |= {family.name + suffix for suffix in _SUFFIXES[family.type]}
    return names


def every_query() -> list[Query]:
    return (dashboard_queries() + recording_queries() + alert_queries()
            + adapter_queries("pod", 'namespace="ns"'))


def test_every_series_named_is_exported_by_the_server_or_by_kubernetes():
    recorded = {r["record"] for r in rules() if "record" in r}
    ours = exported_series()
    for query in every_query():
        unknown = query.metric_names() - ours - recorded - KUBERNETES_SERIES
        assert not unknown, f"{query.origin} names series nobody exports: {sorted(unknown)}"
    for var in dashboard_variables():
        assert Query(var.name, var.match or "").metric_names() <= ours, var


def test_the_name_check_catches_an_invented_series():
    assert Query("x", "rate(moe_router_made_up_total[5m])").metric_names() == {
        "moe_router_made_up_total"}
    assert "moe_router_made_up_total" not in exported_series()


def test_only_the_memory_panel_and_alert_read_kubernetes_series():
    external = [q.origin for q in every_query() if q.metric_names() & KUBERNETES_SERIES]
    assert external == ["panel 'Memory' A", "panel 'Memory' B", "alert MoeRouterMemoryNearLimit"]


def test_the_dashboard_has_every_panel_operators_asked_for():
    titles = {p["title"] for p in dashboard_panels()}
    assert {
        "Requests by code", "Errors by code", "Latency p50 / p99", "Queue time p50 / p99",
        "Compute time p50 / p99", "Batch size", "Cache hit rate", "Circuit breaker",
        "Per-expert load", "Expert imbalance per layer", "In flight", "Queue depth", "Memory",
    } <= titles


def test_dashboard_structure():
    board = dashboard()
    assert board["uid"] == "moe-router" and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard_panels():
        assert panel["targets"], panel["title"]
        assert panel["description"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert target["expr"].strip(), (panel["title"], target["refId"])
        assert 0 <= panel["gridPos"]["x"] and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


def test_every_alert_has_a_threshold_signal_and_a_severity():
    for query, rule in zip(alert_queries(), [r for r in rules() if "alert" in r], strict=True):
        assert alert_signal(query).expr
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert {"summary", "description"} <= set(rule["annotations"])


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (scripts/install_prometheus.py installs it)")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


def test_promtool_accepts_the_rules():
    done = _promtool("check", "rules", str(ALERTS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_of_the_alerts_pass():
    done = _promtool("test", "rules", str(ALERT_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_unit_tested_firing():
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test.get("alert_rule_test", [])
             if case.get("exp_alerts")}
    assert fired == {r["alert"] for r in rules() if "alert" in r}


def test_promtool_unit_tests_can_fail(tmp_path):
    """A threshold moved past the test's input makes promtool fail: the tests bite."""
    moved = ALERTS.read_text().replace("(moe_router_queue_capacity) > 0.8",
                                       "(moe_router_queue_capacity) > 0.95")
    assert moved != ALERTS.read_text()
    (tmp_path / "alerts.yml").write_text(moved)
    (tmp_path / "alerts_test.yml").write_text(ALERT_TESTS.read_text())
    done = _promtool("test", "rules", str(tmp_path / "alerts_test.yml"))
    assert done.returncode != 0
    assert "MoeRouterQueueSaturated" in done.stdout + done.stderr
