"""Alert thresholds: the rule, the transitions, the webhook (a real local HTTP server),
and the server's Health turning a router DEGRADED while an alert fires."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from moe_router.chain.alerts import AlertCheck, AlertFigures, AlertMonitor, evaluate_alerts
from moe_router.config.schema import AlertThresholds

THRESHOLDS = AlertThresholds(avg_latency_ms=50.0, error_rate=0.05)


def figures(**given: float) -> AlertFigures:
    """Alert figures with the given values, the others not known yet (None)."""
    values = {"avg_latency_ms": None, "error_rate": None, "load_balance_variance": None,
              "memory_usage_mb": None}
    return AlertFigures(**{**values, **given})


@pytest.fixture()
def webhook():
    """A local HTTP server recording the JSON bodies POSTed to it."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/alerts", received
    server.shutdown()


def wait_for(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_a_check_fails_only_above_its_threshold_and_passes_without_data():
    checks = evaluate_alerts(figures(avg_latency_ms=50.0, error_rate=0.2), THRESHOLDS)
    assert checks["avg_latency_ms"] == AlertCheck("avg_latency_ms", 50.0, 50.0, True)
    assert checks["error_rate"].ok is False
    assert set(checks) == {"avg_latency_ms", "error_rate", "load_balance_variance",
                           "memory_usage_mb"}
    assert evaluate_alerts(figures(), THRESHOLDS)["error_rate"].ok is True


def test_transitions_are_posted_once_each(webhook):
    url, received = webhook
    monitor = AlertMonitor(THRESHOLDS, url)
    monitor.update("mixtral", figures(avg_latency_ms=80.0, error_rate=0.0))
    monitor.update("mixtral", figures(avg_latency_ms=90.0, error_rate=0.0))  # still firing
    assert set(monitor.failing("mixtral")) == {"avg_latency_ms"}
    monitor.update("mixtral", figures(avg_latency_ms=10.0, error_rate=0.0))
    wait_for(lambda: len(received) >= 2)
    time.sleep(0.2)
    assert sorted((r["check"], r["status"]) for r in received) == [
        ("avg_latency_ms", "firing"), ("avg_latency_ms", "resolved")]
    assert monitor.failing("mixtral") == {}


def test_an_unreachable_webhook_never_breaks_the_caller():
    monitor = AlertMonitor(THRESHOLDS, "http://127.0.0.1:9/unreachable")
    assert monitor.update("r", figures(error_rate=1.0))["error_rate"].ok is False


def test_server_health_shows_a_firing_alert_and_posts_it(tmp_path: Path, webhook):
    from inprocess_server import serve_in_process
    from server_process import small_routers, write_config

    from moe_router_client import RouterClient

    url, received = webhook
    routers = [r for r in small_routers() if r["name"] == "mixtral"]
    config = write_config(
        tmp_path / "config.yaml", routers,
        monitoring={"alert_thresholds": {"avg_latency_ms": 1e-6}, "alert_webhook": url},
    )
    with serve_in_process(config) as server, RouterClient(server.target, timeout=30) as client:
        assert client.health().routers[0].status == "SERVING"
        client.route("mixtral", np.ones((2, 64), np.float32))
        health = wait_for(lambda: (h := client.health()).routers[0].status == "DEGRADED" and h)
        assert "alert avg_latency_ms" in health.routers[0].detail
        assert health.status == "DEGRADED"
        posted = wait_for(lambda: received)
        assert posted[0]["router"] == "mixtral" and posted[0]["status"] == "firing"
