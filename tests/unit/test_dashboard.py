"""dashboards/grafana-dashboard.json and its provisioning files.

The metric catalogue is what the agent's own registry yields: `create_app` on a ProxyServer that is
built but never started (no socket, no PostgreSQL), its app started just long enough for the
event-loop monitor to record once, then every family the registry collects, named as Prometheus
exposes it (counters ``_total``, histograms ``_bucket``/``_sum``/``_count``), with its label names.
Every metric name in every dashboard expression must be in it, and every label a selector matches
or an aggregation groups by must be one the metric has. Where ``promtool`` is installed each expression (with
Grafana's variables filled in) must also parse, as a recording rule checked by ``promtool check
rules``. The end-to-end Prometheus test runs the expressions against a real scrape.
"""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from agent import keys
from agent.app import create_app
from config.loader import load_settings, parse_dsn
from proxy.listener import ProxyServer
from tests.helpers.tools import tool

ROOT = Path(__file__).parents[2]
DASHBOARD = ROOT / "dashboards" / "grafana-dashboard.json"
PROVISIONING = ROOT / "dashboards" / "provisioning"

PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
                "offset", "bool", "inf", "nan", "atan2"}
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h",
                     "$database": ".*", "$user": ".*"}


def _exposed_names(metric_type: str, name: str) -> set[str]:
    if metric_type == "counter":
        return {f"{name}_total"}
    if metric_type == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return {name}


#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}


def agent_catalogue() -> dict[str, frozenset[str]]:
    """Exposed metric name -> label names, of a real agent app (cache on, top-N on), collected from
    its registry (families with no sample yet, e.g. pools before the first client, still declare
    their label names)."""

    async def collect() -> dict[str, frozenset[str]]:
        settings = load_settings(None, env={}, overrides={
            "proxy.host": "127.0.0.1", "proxy.port": 0, "upstream.dsn": "postgresql://u@127.0.0.1:1/db",
            "cache.mode": "all", "stats.prometheus_top_n": 5})
        app = create_app(settings, ProxyServer(settings, parse_dsn(settings.upstream.dsn or "")))
        runner = web.AppRunner(app)
        await runner.setup()  # startup: cleanup_ctx starts the event-loop lag monitor
        try:
            names: dict[str, frozenset[str]] = {}
            for _ in range(100):  # until the monitor has measured once (LOOP_LAG_INTERVAL)
                names = {}
                for m in app[keys.REGISTRY].collect():
                    labels = set(getattr(m, "_labelnames", None) or ())
                    labels |= {k for sample in m.samples for k in sample.labels}
                    for name in _exposed_names(m.type, m.name):
                        names[name] = frozenset(labels | ({"le"} if name.endswith("_bucket") else set()))
                if "pgsidecar_event_loop_lag_seconds" in names:
                    break
                await asyncio.sleep(0.05)
            return names
        finally:
            await runner.cleanup()

    return asyncio.run(collect())


@pytest.fixture(scope="module")
def catalogue() -> dict[str, frozenset[str]]:
    return agent_catalogue()


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep theirs inside


def _expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every panel target and every query variable."""
    out = [(f"panel {p['title']!r} {t['refId']}", t["expr"])
           for p in _panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["definition"])
            assert match, var["definition"]
            out.append((f"variable {var['name']}", match.group(1)))
    return out


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, label
    names (inside braces or by/on/without/ignoring lists), strings or durations."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)           # string literals
    text = re.sub(r"\{[^}]*\}", "", text)                      # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                     # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        word = match.group(0)
        rest = text[match.end():].lstrip()
        if rest.startswith("(") or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def test_metric_name_parser() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, pool) (rate(x_bucket{pool=~"$a", state="active"}[5m]))) '
            '/ on (job) group_left y_total and z')
    assert metric_names(expr) == {"x_bucket", "y_total", "z"}


def test_catalogue_is_the_agents(catalogue: dict[str, frozenset[str]]) -> None:
    # A sanity check of the harness: the families the dashboard leans on, named as exposed.
    for name in ("pgsidecar_queries_total", "pgsidecar_query_duration_seconds_bucket",
                 "pgsidecar_pool_checkout_wait_seconds_bucket", "pgsidecar_cache_requests_total",
                 "process_resident_memory_bytes", "pgsidecar_event_loop_lag_seconds"):
        assert name in catalogue, name
    assert "pgsidecar_queries" not in catalogue
    assert catalogue["pgsidecar_pool_checkout_wait_seconds_bucket"] == {"pool", "database", "user", "le"}


def test_parses_with_schema_version_and_uid(dashboard: dict[str, Any]) -> None:
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and len(dashboard["uid"]) <= 40
    assert dashboard["title"]
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("database", "user"):
        var = variables[name]
        assert var["type"] == "query" and var["datasource"]["uid"] == "${datasource}"
        assert var["definition"].startswith("label_values(pgsidecar_queries_total")
        assert var["definition"].endswith(f", {name})")
        assert var["query"]["query"] == var["definition"]
        assert var["includeAll"] and var["multi"] and var["allValue"] == ".*"
    used = {m for _, e in _expressions(dashboard) for m in re.findall(r"\$(\w+)", e)}
    assert used - {"__rate_interval", "__interval", "__range"} <= set(variables), used


def test_every_panel_has_a_query(dashboard: dict[str, Any]) -> None:
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["type"] != "text", f"{panel['title']}: a placeholder, not a panel"
        assert panel.get("targets"), panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_issues_panels_are_there(dashboard: dict[str, Any]) -> None:
    exprs = " ".join(e for _, e in _expressions(dashboard))
    titles = " | ".join(p["title"].lower() for p in _panels(dashboard))
    for title in ("request rate", "error rate", "p95", "query count by kind", "cache hit ratio",
                  "active connections", "pool waiting clients", "checkout wait", "slow queries",
                  "event-loop lag", "memory", "webhook attempts", "webhook backlog", "webhook delivery latency",
                  "graphql operations", "graphql latency", "graphql sql statements per operation"):
        assert title in titles, title
    assert "histogram_quantile(0.95, sum by (le) (rate(pgsidecar_query_duration_seconds_bucket" in exprs
    assert "pgsidecar_pool_checkout_wait_seconds_bucket" in exprs
    assert "process_resident_memory_bytes" in exprs
    assert "pgsidecar_webhook_oldest_pending_age_seconds" in exprs


def test_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    taken: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_every_metric_is_in_the_agents_catalogue(dashboard: dict[str, Any],
                                                 catalogue: dict[str, frozenset[str]]) -> None:
    missing = {(where, name) for where, expr in _expressions(dashboard)
               for name in metric_names(expr) if name not in catalogue}
    assert not missing, sorted(missing)
    assert len({n for _, e in _expressions(dashboard) for n in metric_names(e)}) >= 12


def test_every_label_is_one_the_metric_has(dashboard: dict[str, Any],
                                           catalogue: dict[str, frozenset[str]]) -> None:
    """A matcher or grouping on a label the series lack selects nothing or collapses everything,
    silently: e.g. the cache's series have no database label."""
    wrong = []
    for where, expr in _expressions(dashboard):
        text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
        present = set(TARGET_LABELS)
        for name in metric_names(expr):
            present |= catalogue.get(name, frozenset())
        for name, matchers in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", text):
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                if label not in catalogue.get(name, frozenset()) | TARGET_LABELS:
                    wrong.append((where, name, label))
        for group in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
            wrong += [(where, "grouping", label.strip()) for label in group.split(",")
                      if label.strip() and label.strip() not in present]
    assert not wrong, wrong


def test_every_expression_parses_with_promtool(dashboard: dict[str, Any], tmp_path: Path) -> None:
    rules = []
    for n, (where, expr) in enumerate(_expressions(dashboard)):
        for var, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, (where, expr)
        rules.append({"record": f"dashboard:expr_{n}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run([tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_provisioning_files() -> None:
    sources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    assert sources["apiVersion"] == 1
    (prom,) = sources["datasources"]
    assert prom["type"] == "prometheus" and prom["url"] == "http://prometheus:9090" and prom["isDefault"]
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "pgsidecar.yml").read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/etc/grafana/dashboards/")
