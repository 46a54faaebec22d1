"""The files an operator deploys for monitoring (issue 5), proven with the real tools.

- ``promtool check config`` / ``check rules`` accept ``config/prometheus.yml`` and
  ``config/alert_rules.yml``; ``amtool check-config`` accepts ``config/alertmanager.yml`` (when
  amtool, Debian's ``prometheus-alertmanager``, is installed).
- ``promtool test rules tests/promtool/*.yml`` passes, and those unit tests cover every alert on
  both sides of its threshold.
- Every metric name the rules (and ``dashboards/grafana-dashboard.json``, when present) use is
  in a real agent's scrape, after traffic through a real proxy with ``cache.mode: all``.
- End to end: a real ``prometheus`` on loopback scrapes that agent every second while a workload
  runs through the proxy, loads ``config/alert_rules.yml``, and answers every rule expression (and
  every dashboard panel's) through its HTTP API: each parses, and returns data.

Nothing is mocked; every wait polls with a deadline.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families as parse_text

from agent import keys
from migrations import runner
from proxy.invalidation import FUNCTION_SQL, trigger_sql
from tests.helpers.agent_http import RunningAgent
from tests.helpers.proxy_thread import RunningProxy
from tests.helpers.receiver import Receiver
from tests.helpers.wire import wait_for
from tests.helpers.tools import tool

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_YML = ROOT / "config" / "prometheus.yml"
ALERT_RULES = ROOT / "config" / "alert_rules.yml"
ALERTMANAGER_YML = ROOT / "config" / "alertmanager.yml"
PROMTOOL_TESTS = ROOT / "tests" / "promtool"
DASHBOARD = ROOT / "dashboards" / "grafana-dashboard.json"
JOB = "pgsidecar"  # the scrape job name the rules select on


# PromQL words that look like metric names but are not.
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
             "bool", "offset", "inf", "nan"}
# Grafana's built-in and the dashboard's template variables, as Prometheus can run them.
_GRAFANA_INTERVALS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}


# ----------------------------------------------------------------------------- helpers


def _run(program: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool(program), *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERT_RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in _rules() if "alert" in rule}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (good enough for our rules and panels:
    strings, label matchers, ranges and grouping clauses are removed, then every identifier
    that is not a function call or a keyword is a metric name)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if not call and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def _split_top_level(expr: str, words: tuple[str, ...] = ("and", "or", "unless")) -> list[str]:
    """Split at set operators outside parentheses."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(expr):
        ch = expr[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0:
            m = re.match(r"\s(%s)\s" % "|".join(words), expr[i:])
            if m:
                parts.append(expr[start:i])
                i += m.end()
                start = i
                continue
        i += 1
    parts.append(expr[start:])
    return [p.strip() for p in parts if p.strip()]


def value_parts(expr: str) -> list[str]:
    """The value-producing parts of an alert expression: each operand of a top-level
    ``and``/``or``/``unless``, without its trailing comparison with a constant (``... > 0.05``).
    A healthy system returns data for each, where the whole alert expression returns nothing."""
    out = []
    for part in _split_top_level(" ".join(expr.split())):
        out.append(re.sub(r"\s*(?:[<>]=?|==|!=)\s*(?:bool\s+)?[0-9.eE+\-*/ ]+$", "", part))
    return out


def _dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, PromQL ready for Prometheus) of every dashboard panel target."""
    doc = json.loads(DASHBOARD.read_text())

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    out = []
    for panel in panels(doc.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append((str(panel.get("title")), _substitute(target["expr"])))
    return out


def _substitute(expr: str) -> str:
    """Grafana's variables as Prometheus can run them: intervals become durations, template
    variables match anything (``label="$var"`` becomes a regex matcher)."""
    def var(m: re.Match[str]) -> str:
        return m.group(1) or m.group(2)

    pattern = r"\$\{(\w+)(?::\w+)?\}|\$(\w+)"
    for name, value in _GRAFANA_INTERVALS.items():
        expr = re.sub(r"\$\{%s\}|\$%s\b" % (name, name), value, expr)
    expr = re.sub(r'(\w+)\s*=~?\s*"(?:%s)"' % pattern, lambda m: f'{m.group(1)}=~".*"', expr)
    return re.sub(pattern, lambda m: ".*", expr)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])




# ----------------------------------------------------------------------------- the files, by the tools


def test_promtool_accepts_the_prometheus_config_and_its_rule_file() -> None:
    done = _run("promtool", "check", "config", str(PROMETHEUS_YML.relative_to(ROOT)))
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "SUCCESS: 1 rule files found" in out  # rule_files resolved next to prometheus.yml


def test_prometheus_config_intervals_targets_and_alertmanager() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    assert config["global"]["scrape_interval"] == "15s"
    assert config["global"]["evaluation_interval"] == "15s"
    assert config["rule_files"] == ["alert_rules.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs[JOB]["static_configs"][0]["targets"] == ["pgsidecar:9930"]
    (manager,) = config["alerting"]["alertmanagers"]
    assert manager["static_configs"][0]["targets"] == ["alertmanager:9093"]


def test_promtool_accepts_the_alert_rules() -> None:
    done = _run("promtool", "check", "rules", str(ALERT_RULES.relative_to(ROOT)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in done.stdout


def test_every_rule_has_severity_summary_and_description() -> None:
    alerts = _alerts()
    seed = {"HighErrorRate", "HighResponseTime", "LowCacheHitRatio", "DatabaseConnectionPoolExhausted",
            "HighMemoryUsage"}
    operator = {"PoolClientsWaiting", "PoolCheckoutTimeouts", "SlowQueryRate", "UpstreamConnectFailures",
                "CacheListenDown", "SidecarDown", "SidecarMetricsAbsent",
                "WebhookBacklogGrowing", "WebhookDeliveriesDead", "WebhookEmitterDown"}
    assert set(alerts) == seed | operator
    assert len(alerts) == len(_rules())  # no recording rules, no duplicate names
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"].strip(), name
        assert len(rule["annotations"]["description"]) > 100, name  # says what to look at
    # The seed's thresholds and durations.
    assert "> 0.05" in alerts["HighErrorRate"]["expr"] and alerts["HighErrorRate"]["for"] == "5m"
    assert "histogram_quantile(0.95" in alerts["HighResponseTime"]["expr"]
    assert ") > 1" in alerts["HighResponseTime"]["expr"] and alerts["HighResponseTime"]["for"] == "5m"
    assert "< 0.7" in alerts["LowCacheHitRatio"]["expr"] and alerts["LowCacheHitRatio"]["for"] == "10m"
    assert "> 18" in alerts["DatabaseConnectionPoolExhausted"]["expr"]
    assert "> 500 * 1024 * 1024" in alerts["HighMemoryUsage"]["expr"] and alerts["HighMemoryUsage"]["for"] == "5m"
    backlog = alerts["WebhookBacklogGrowing"]["expr"]
    assert "pgsidecar_webhook_oldest_pending_age_seconds > 600" in backlog
    assert "delta(pgsidecar_webhook_pending_deliveries[15m]) > 0" in backlog


def test_amtool_accepts_the_alertmanager_config() -> None:
    done = _run("amtool", "check-config", str(ALERTMANAGER_YML.relative_to(ROOT)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 receivers" in done.stdout
    # Critical pages and is posted to Slack; warnings (and anything else) go to Slack only.
    for labels, receivers in (("severity=critical", "pagerduty,slack"), ("severity=warning", "slack"),
                              ("alertname=Unlabelled", "slack")):
        done = _run("amtool", "config", "routes", "test", f"--config.file={ALERTMANAGER_YML}", labels)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.strip() == receivers, (labels, done.stdout)


def test_alertmanager_routes_by_severity_with_secrets_from_files() -> None:
    text = ALERTMANAGER_YML.read_text()
    config = yaml.safe_load(text)
    receivers = {r["name"]: r for r in config["receivers"]}
    (slack,) = receivers["slack"]["slack_configs"]
    (pagerduty,) = receivers["pagerduty"]["pagerduty_configs"]
    assert slack["api_url_file"].startswith("/") and "api_url" not in slack
    assert pagerduty["routing_key_file"].startswith("/") and "routing_key" not in pagerduty
    assert "service_key" not in pagerduty
    routes = config["route"]["routes"]
    assert routes[0]["matchers"] == ['severity="critical"'] and routes[0]["receiver"] == "pagerduty"
    assert config["route"]["receiver"] == "slack"
    assert not re.search(r"hooks\.slack\.com|https?://", text)  # no webhook URL in the repo


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    files = sorted(str(p.relative_to(ROOT)) for p in PROMTOOL_TESTS.glob("*.yml"))
    assert files
    done = _run("promtool", "test", "rules", *files)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_cover_every_alert_on_both_sides_of_its_threshold() -> None:
    """Each alert: a case where it fires, and a series just below its threshold (instance
    "below:9930") in a group that evaluates it without expecting it from that series."""
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in PROMTOOL_TESTS.glob("*.yml"):
        doc = yaml.safe_load(path.read_text())
        assert doc["rule_files"] == ["../../config/alert_rules.yml"]
        for group in doc["tests"]:
            below = any('instance="below:9930"' in s["series"] for s in group["input_series"])
            for case in group["alert_rule_test"]:
                expected = case.get("exp_alerts") or []
                if expected:
                    fires.add(case["alertname"])
                    for alert in expected:  # the full annotations are checked, not just labels
                        assert set(alert["exp_annotations"]) == {"summary", "description"}
                if below and all(a["exp_labels"].get("instance") != "below:9930" for a in expected):
                    quiet.add(case["alertname"])
    assert fires == set(_alerts()), set(_alerts()) - fires
    assert quiet == set(_alerts()), set(_alerts()) - quiet


def test_metric_name_extraction() -> None:
    expr = ('sum by (job, le) (rate(a_bucket{status="x y", le=~"1|2"}[5m])) / on (job) group_left(pool) '
            'b_total > 5 and absent(up{job="p"}) unless histogram_quantile(0.9, c) offset 5m')
    assert metric_names(expr) == {"a_bucket", "b_total", "up", "c"}
    assert value_parts("x / y > 0.05 and z == 0") == ["x / y", "z"]
    assert value_parts("rate(x[5m]) > 500 * 1024 * 1024") == ["rate(x[5m])"]
    assert _substitute('rate(m{database=~"$database", user="${user}"}[$__rate_interval])') == (
        'rate(m{database=~".*", user=~".*"}[1m])')


# ----------------------------------------------------------------------------- a real agent, a real Prometheus


class Workload:
    """Statements through the proxy from a thread until stopped: cache hits and misses, a write
    (invalidation), an error, and a statement over slow_query.threshold_ms."""

    def __init__(self, proxy: RunningProxy, table: str, agent_url: str | None = None) -> None:
        self.proxy, self.table, self.agent_url = proxy, table, agent_url
        self.stop_event = threading.Event()
        self.rounds = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="prometheus-stack-workload", daemon=True)

    def one_round(self, conn: psycopg.Connection[Any]) -> None:
        t = self.table
        for _ in range(4):
            assert conn.execute(f"select v from {t} where id = 1").fetchall() == [("one",)]
        conn.execute(f"select v from {t} where id = 2").fetchall()
        if self.rounds % 5 == 0:
            conn.execute(f"update {t} set v = 'two' where id = 2")
            conn.execute("select pgsidecar_emit('prom_stack.tick', '{}')")  # a webhook delivery
            self.graphql()
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0")
        conn.execute("select pg_sleep(0.003)")
        self.rounds += 1

    def graphql(self) -> None:
        """One GraphQL operation on the agent (its gateway reads through this same proxy)."""
        assert self.agent_url, "the workload needs the agent's URL for its GraphQL operation"
        req = urllib.request.Request(f"{self.agent_url}/graphql", method="POST",
                                     data=json.dumps({"query": "query Tick { users(first: 1) { id } }"}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200 and "errors" not in json.loads(resp.read())

    def _run(self) -> None:
        try:
            with _connect(self.proxy) as conn:
                while not self.stop_event.is_set():
                    self.one_round(conn)
                    self.stop_event.wait(0.05)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def __enter__(self) -> Workload:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(15)
        if self.error is not None and exc[0] is None:
            raise self.error


def _connect(proxy: RunningProxy) -> psycopg.Connection[Any]:
    # Simple protocol, no server-side prepares: what the result cache serves.
    return psycopg.connect(**proxy.kwargs(), autocommit=True, prepare_threshold=None, connect_timeout=10)


@pytest.fixture
def migrated(fresh_db: Any) -> tuple[str, Callable[[], Any]]:
    """A fresh database with pgsidecar's migrations (recruiter schema, webhook tables)."""
    dsn, connect = fresh_db
    runner.upgrade(runner.alembic_config(dsn))
    return dsn, connect


@pytest.fixture
def table(migrated: tuple[str, Callable[[], Any]]) -> str:
    """A table carrying the cache's invalidation trigger (created before the proxy reads the catalog)."""
    name = f"prom_stack_{uuid.uuid4().hex[:8]}"
    d = migrated[1]()
    d.execute(f"create table {name} (id int primary key, v text)")
    d.execute(f"insert into {name} values (1, 'one'), (2, 'two')")
    d.execute(FUNCTION_SQL)
    d.execute(trigger_sql("public", name))
    return name


@pytest.fixture
def agent(proxy_factory: Callable[..., RunningProxy], migrated: tuple[str, Callable[[], Any]], table: str,
          receiver: Receiver) -> Iterator[RunningAgent]:
    """An agent in front of a proxy with the result cache on for every SELECT, its LISTEN
    connection up, a slow-query threshold a pg_sleep(0.003) crosses, and a webhook endpoint
    (a real receiver) for the workload's events."""
    proxy = proxy_factory(migrated[0], cache__mode="all", slow_query__threshold_ms=1.0, pool__size=3,
                          pool__max_overflow=2, pool__checkout_timeout=10.0, webhooks__sweep_interval_s=1.0)
    front = proxy.server.cache_front
    assert front is not None
    monitor = proxy.run(lambda: front.monitor_for(proxy.database,
                                                  proxy.server.pool_for(proxy.database, proxy.user).endpoint))
    assert proxy.call(monitor.wait_ready(10))
    running = RunningAgent(proxy)
    assert proxy.call(running.runner.app[keys.WEBHOOKS].wait_ready(20))
    status, doc = running.json("POST", "/api/webhooks/register",
                               body=json.dumps({"url": receiver.url, "events": ["prom_stack.*"]}).encode())
    assert status == 201, doc
    yield running
    running.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    yield rec
    rec.close()


def _catalogue(agent: RunningAgent) -> set[str]:
    """Every metric name a scrape of the agent has: sample names (``_total``, ``_bucket``,
    ``_sum``, ``_count``) and family names."""
    status, _, body = agent.request("GET", "/metrics")
    assert status == 200
    names = set()
    for family in parse_text(body.decode()):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def test_every_metric_the_rules_and_dashboard_use_is_in_the_agents_catalogue(agent: RunningAgent,
                                                                             table: str) -> None:
    workload = Workload(agent.proxy, table, agent.url)
    with _connect(agent.proxy) as conn:
        for _ in range(2):
            workload.one_round(conn)
    # pgsidecar_event_loop_lag_seconds appears after the loop-lag monitor's first wake-up.
    catalogue = wait_for("the first event-loop lag measurement", lambda: (
        names if "pgsidecar_event_loop_lag_seconds" in (names := _catalogue(agent)) else None), timeout=5)
    catalogue |= {"up"}  # Prometheus's own, per target
    used = {name: rule["alert"] for rule in _rules() for name in metric_names(rule["expr"])}
    assert {"pgsidecar_query_duration_seconds_bucket", "pgsidecar_cache_requests_total",
            "pgsidecar_cache_listen_up", "process_resident_memory_bytes", "up"} <= set(used)
    missing = {name: alert for name, alert in used.items() if name not in catalogue}
    assert not missing, f"rules use metrics the agent does not export: {missing}"

    used_by_panels = {name: title for title, expr in _dashboard_targets() for name in metric_names(expr)}
    assert used_by_panels
    missing = {name: title for name, title in used_by_panels.items() if name not in catalogue}
    assert not missing, f"dashboard panels use metrics the agent does not export: {missing}"


class Prometheus:
    """A real ``prometheus`` on 127.0.0.1, scraping one agent every second, with the rules."""

    def __init__(self, agent_port: int, workdir: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERT_RULES)],
            "scrape_configs": [{"job_name": JOB,
                                "static_configs": [{"targets": [f"127.0.0.1:{agent_port}"]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self.log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [tool("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir)

    def get(self, path: str, **params: str) -> dict[str, Any]:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}" if params else self.url + path
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:  # 400 with {"status": "error", "error": ...}
            return json.loads(err.read())

    def ready(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"prometheus exited {self.process.returncode}: {self.log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/query", query=expr)
        assert answer["status"] == "success", (expr, answer)
        return list(answer["data"]["result"])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.log.close()


def _finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


def test_a_real_prometheus_scrapes_the_agent_and_answers_every_rule_and_panel(agent: RunningAgent,
                                                                               table: str) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="pgsidecar-prometheus-"))
    prometheus = Prometheus(agent.port, workdir)
    try:
        with Workload(agent.proxy, table, agent.url) as workload:
            wait_for("prometheus ready", prometheus.ready)
            wait_for("the agent's target up", lambda: [
                r for r in prometheus.query(f'up{{job="{JOB}"}}') if r["value"][1] == "1"])
            # Two scrapes that saw traffic: rate() over them is positive.
            wait_for("a positive query rate", lambda: _finite(prometheus.query(
                f'sum(rate(pgsidecar_queries_total{{job="{JOB}"}}[1m])) > 0')))
            wait_for("a positive cache lookup rate", lambda: _finite(prometheus.query(
                'sum(rate(pgsidecar_cache_requests_total{result=~"hit|miss"}[1m])) > 0')))
            wait_for("a positive webhook delivery rate", lambda: _finite(prometheus.query(
                'sum(rate(pgsidecar_webhook_attempts_total{result="delivered"}[1m])) > 0')))
            wait_for("a positive GraphQL operation rate", lambda: _finite(prometheus.query(
                'sum(rate(pgsidecar_graphql_operations_total{result="ok"}[1m])) > 0')))

            # Every rule's expression parses and runs; each value-producing part returns data.
            empty = []
            for rule in _rules():
                prometheus.query(rule["expr"])  # asserts status success
                for part in value_parts(rule["expr"]):
                    if part.startswith("absent("):
                        # The sidecar is up: absent() of its metrics is empty, and must be.
                        assert prometheus.query(part) == [], (rule["alert"], part)
                    elif not _finite(prometheus.query(part)):
                        empty.append((rule["alert"], part))
            assert not empty, f"rule expressions without data: {empty}"

            # The rules Prometheus loaded are the file's, and each has been evaluated without error.
            expected = {g["name"]: [r["alert"] for r in g["rules"]]
                        for g in yaml.safe_load(ALERT_RULES.read_text())["groups"]}

            def evaluated() -> dict[str, Any] | None:
                groups = prometheus.get("/api/v1/rules")["data"]["groups"]
                rules = [r for g in groups for r in g["rules"]]
                return groups if rules and all(r["health"] == "ok" for r in rules) else None

            groups = wait_for("every rule evaluated", evaluated)
            assert {g["name"]: [r["name"] for r in g["rules"]] for g in groups} == expected
            assert all(g["file"] == str(ALERT_RULES) and g["interval"] == 1 for g in groups)
            for g in groups:
                for r in g["rules"]:
                    assert r["type"] == "alerting" and not r.get("lastError"), r

            # The workload fails one statement in seven and sleeps past the 1 ms slow threshold
            # several times a second: HighErrorRate and SlowQueryRate go pending (their `for` keeps
            # them from firing within the test) with the proxy's own database and user.
            proxy = agent.proxy

            def pending() -> set[str]:
                alerts = prometheus.get("/api/v1/alerts")["data"]["alerts"]
                return {a["labels"]["alertname"] for a in alerts
                        if a["state"] == "pending" and a["labels"].get("database") == proxy.database
                        and a["labels"].get("user") == proxy.user and a["labels"].get("job") == JOB}

            wait_for("HighErrorRate and SlowQueryRate pending",
                      lambda: {"HighErrorRate", "SlowQueryRate"} <= pending())

            empty = []
            for title, expr in _dashboard_targets():
                if not _finite(prometheus.query(expr)):
                    empty.append((title, expr))
            assert not empty, f"dashboard panel targets without data: {empty}"
            assert workload.rounds >= 2
    finally:
        prometheus.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_dashboard_targets_have_every_template_variable_substituted() -> None:
    targets = _dashboard_targets()
    assert targets and all("$" not in expr for _, expr in targets)
