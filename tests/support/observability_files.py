"""The Grafana dashboard and Prometheus rules of deploy/, read as data (deploy tests).

Every PromQL expression of deploy/ in one list, so that the static tests and the test on
a real Prometheus check the same queries: dashboard targets, template variables,
recording rules, alert expressions and the prometheus-adapter rules.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "moe-router.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
ADAPTER_RULES = DEPLOY / "prometheus-adapter" / "rules.yaml"

#: Series that Kubernetes exports, not moe-router: the kubelet's cAdvisor and
#: kube-state-metrics. Only the memory panel and alert use them.
KUBERNETES_SERIES = frozenset({"container_memory_working_set_bytes",
                               "kube_pod_container_resource_limits"})

_SELECTOR_NAME = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?=\{|\[)")
_RECORDED_NAME = re.compile(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b")
_LABEL_VALUES = re.compile(r"^label_values\((?:(?P<match>.+),\s*)?(?P<label>[a-zA-Z_]+)\)$")
_THRESHOLD = re.compile(r"^(?P<signal>.*?)\s*(?:>=|<=|==|!=|>|<)\s*[0-9.eE+-]+\s*$", re.DOTALL)


@dataclass(frozen=True)
class Query:
    """One PromQL expression of deploy/: where it is (``origin``) and its text."""

    origin: str
    expr: str

    def metric_names(self) -> set[str]:
        """Names of the series it selects (selectors and recorded rule names)."""
        names = set(_SELECTOR_NAME.findall(self.expr)) | set(_RECORDED_NAME.findall(self.expr))
        return {n for n in names if not n.startswith("$")}

    @property
    def external(self) -> bool:
        """True when it reads only Kubernetes' series, none of ours."""
        return self.metric_names() <= KUBERNETES_SERIES


@dataclass(frozen=True)
class LabelValuesQuery:
    """A dashboard variable: ``label_values(match, label)``."""

    name: str
    match: str | None
    label: str


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel with queries (rows only group them)."""
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_queries() -> list[Query]:
    return [
        Query(f"panel {p['title']!r} {t['refId']}", t["expr"])
        for p in dashboard_panels() for t in p["targets"]
    ]


def dashboard_variables() -> list[LabelValuesQuery]:
    found = []
    for var in dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = _LABEL_VALUES.match(var["query"]["query"])
        assert m, f"variable {var['name']}: expected label_values(...), got {var['query']}"
        found.append(LabelValuesQuery(var["name"], m["match"], m["label"]))
    return found


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"]
            for rule in group["rules"]]


def recording_queries() -> list[Query]:
    return [Query(f"record {r['record']}", r["expr"]) for r in rules() if "record" in r]


def alert_queries() -> list[Query]:
    return [Query(f"alert {r['alert']}", r["expr"]) for r in rules() if "alert" in r]


def alert_signal(query: Query) -> Query:
    """The alert's expression without its final threshold comparison."""
    m = _THRESHOLD.match(query.expr.strip())
    assert m, f"{query.origin}: expected '<signal> <op> <number>', got {query.expr!r}"
    return Query(f"{query.origin} signal", m["signal"])


def adapter_queries(group_by: str, label_matchers: str) -> list[Query]:
    """prometheus-adapter's metricsQuery templates, filled in as the adapter fills them."""
    queries = []
    for rule in yaml.safe_load(ADAPTER_RULES.read_text())["rules"]:
        expr = (rule["metricsQuery"].replace("<<.GroupBy>>", group_by)
                .replace("<<.LabelMatchers>>", label_matchers))
        assert "<<" not in expr, f"adapter rule {rule['name']['as']}: unfilled template {expr}"
        queries.append(Query(f"adapter {rule['name']['as']}", expr))
    return queries


def substitute_variables(expr: str, values: dict[str, str]) -> str:
    """Grafana's ``$name`` variables replaced by ``values`` (longest names first)."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace(f"${name}", values[name])
    assert "$" not in expr, f"a variable is left in {expr!r}"
    return expr
