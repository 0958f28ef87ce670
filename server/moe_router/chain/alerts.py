"""Alert checks: a router's figures against ``monitoring.alert_thresholds``.

One rule for the server and the in-process monitoring wrapper: a check fails when its
figure exceeds its threshold; a figure with no value yet (no calls) passes. The
:class:`AlertMonitor` remembers which checks fail, logs each change, and posts it as
JSON to ``monitoring.alert_webhook`` when one is set (in a thread, 5 s timeout, a
failed post is logged and dropped: an alert never blocks or breaks routing).
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["DEFAULT_ALERT_THRESHOLDS", "evaluate_alerts", "AlertMonitor"]

log = logging.getLogger("moe_router.chain.alerts")

#: The seed's config.yaml ``monitoring.alert_thresholds`` defaults.
DEFAULT_ALERT_THRESHOLDS: dict[str, float] = {
    "avg_latency_ms": 50.0,
    "error_rate": 0.05,
    "load_balance_variance": 0.1,
    "memory_usage_mb": 1000.0,
}


def evaluate_alerts(
    figures: Mapping[str, float | None], thresholds: Mapping[str, float]
) -> dict[str, dict[str, Any]]:
    """check -> {"ok", "value", "threshold"} for every threshold."""
    checks = {}
    for check, threshold in thresholds.items():
        value = figures.get(check)
        checks[check] = {"ok": value is None or value <= threshold, "value": value,
                         "threshold": threshold}
    return checks


def post_json(url: str, payload: dict[str, Any]) -> None:
    """POST ``payload`` as JSON to ``url`` (5 s timeout)."""
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5):
        pass


class AlertMonitor:
    """Evaluates routers' checks, remembers the failing ones, reports every change."""

    def __init__(
        self,
        thresholds: Mapping[str, float],
        webhook: str = "",
        post: Callable[[str, dict[str, Any]], None] = post_json,
    ) -> None:
        self.thresholds = dict(thresholds)
        self.webhook = webhook
        self._post = post
        self._lock = threading.Lock()
        self._failing: dict[str, dict[str, dict[str, Any]]] = {}

    def update(self, router: str, figures: Mapping[str, float | None]) -> dict[str, dict]:
        """Evaluate ``router``'s figures; log and post the checks that changed state."""
        checks = evaluate_alerts(figures, self.thresholds)
        with self._lock:
            before = self._failing.get(router, {})
            now = {name: check for name, check in checks.items() if not check["ok"]}
            self._failing[router] = now
        for name in now.keys() - before.keys():
            self._report(router, name, now[name], "firing")
        for name in before.keys() - now.keys():
            self._report(router, name, checks[name], "resolved")
        return checks

    def failing(self, router: str) -> dict[str, dict[str, Any]]:
        """The checks of ``router`` that failed at the last update."""
        with self._lock:
            return dict(self._failing.get(router, {}))

    def _report(self, router: str, check: str, state: dict[str, Any], status: str) -> None:
        log.warning("router %r: alert %s %s (value %s, threshold %s)", router, check, status,
                    state["value"], state["threshold"])
        if not self.webhook:
            return
        payload = {"router": router, "check": check, "status": status,
                   "value": state["value"], "threshold": state["threshold"]}

        def send() -> None:
            try:
                self._post(self.webhook, payload)
            except Exception as exc:  # noqa: BLE001 - an alert must never break routing
                log.warning("alert webhook %s failed: %s", self.webhook, exc)

        threading.Thread(target=send, name="alert-webhook", daemon=True).start()
