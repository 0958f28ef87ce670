"""Alert checks: a router's figures against ``monitoring.alert_thresholds``.

One rule for the server and the in-process monitoring wrapper: a check fails when its
figure exceeds its threshold; a figure with no value yet (no calls) passes. The figures
come from the router's :class:`~moe_router.chain.request_stats.RequestFigures` (one
definition each, see :meth:`AlertFigures.of`); the thresholds are the config's
:class:`~moe_router.config.schema.AlertThresholds`, declared once. The
:class:`AlertMonitor` remembers which checks fail, logs each change, and posts it as
JSON to ``monitoring.alert_webhook`` when one is set (in a thread, 5 s timeout, a failed
post is logged and dropped: an alert never blocks or breaks routing).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moe_router.chain.request_stats import RequestFigures
from moe_router.config.schema import AlertThresholds

__all__ = ["AlertCheck", "AlertFigures", "AlertMonitor", "AlertThresholds", "evaluate_alerts"]

log = logging.getLogger("moe_router.alerts")


@dataclass(frozen=True)
class AlertFigures:
    """The four figures the thresholds judge (None: no value yet).

    avg_latency_ms: mean latency over the recent latency window.
    error_rate: failures (errors of our own) / calls over the last minute.
    load_balance_variance: population variance over experts of each expert's share of
        the assignments answered recently (``metrics.load_window_s``), ``tokens_e / sum``.
    memory_usage_mb: the process's resident memory.
    """

    avg_latency_ms: float | None
    error_rate: float | None
    load_balance_variance: float | None
    memory_usage_mb: float | None

    @classmethod
    def of(cls, requests: RequestFigures, rss_bytes: int) -> AlertFigures:
        """The alert figures of a router's request figures and the process RSS."""
        latency = requests.latency
        return cls(
            avg_latency_ms=latency.mean_ms if latency.samples else None,
            error_rate=requests.error_rate,
            load_balance_variance=requests.recent_load_share_variance,
            memory_usage_mb=rss_bytes / 2**20,
        )


@dataclass(frozen=True)
class AlertCheck:
    """One check: its figure, its threshold, and whether it passes."""

    name: str
    value: float | None
    threshold: float
    ok: bool


def evaluate_alerts(figures: AlertFigures, thresholds: AlertThresholds) -> dict[str, AlertCheck]:
    """check name -> AlertCheck, for every threshold."""
    checks = {}
    for item in dataclasses.fields(thresholds):
        threshold = getattr(thresholds, item.name)
        value = getattr(figures, item.name)
        checks[item.name] = AlertCheck(item.name, value, threshold,
                                       value is None or value <= threshold)
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
        thresholds: AlertThresholds,
        webhook: str = "",
        post: Callable[[str, dict[str, Any]], None] = post_json,
    ) -> None:
        self.thresholds = thresholds
        self.webhook = webhook
        self._post = post
        self._lock = threading.Lock()
        self._failing: dict[str, dict[str, AlertCheck]] = {}

    def update(self, router: str, figures: AlertFigures) -> dict[str, AlertCheck]:
        """Evaluate ``router``'s figures; log and post the checks that changed state."""
        checks = evaluate_alerts(figures, self.thresholds)
        with self._lock:
            before = self._failing.get(router, {})
            now = {name: check for name, check in checks.items() if not check.ok}
            self._failing[router] = now
        for name in now.keys() - before.keys():
            self._report(router, now[name], "firing")
        for name in before.keys() - now.keys():
            self._report(router, checks[name], "resolved")
        return checks

    def failing(self, router: str) -> dict[str, AlertCheck]:
        """The checks of ``router`` that failed at the last update."""
        with self._lock:
            return dict(self._failing.get(router, {}))

    def _report(self, router: str, check: AlertCheck, status: str) -> None:
        log.warning("router %r: alert %s %s (value %s, threshold %s)", router, check.name,
                    status, check.value, check.threshold)
        if not self.webhook:
            return
        payload = {"router": router, "check": check.name, "status": status,
                   "value": check.value, "threshold": check.threshold}

        def send() -> None:
            try:
                self._post(self.webhook, payload)
            except Exception as exc:  # noqa: BLE001 - an alert must never break routing
                log.warning("alert webhook %s failed: %s", self.webhook, exc)

        threading.Thread(target=send, name="alert-webhook", daemon=True).start()
