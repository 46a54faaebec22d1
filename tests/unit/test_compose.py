"""docker-compose.yml, the Dockerfile and .dockerignore.

- The compose file is validated against the Compose specification's JSON schema
  (tests/data/compose-spec.json, vendored from compose-spec/compose-spec; see tests/data/README.md),
  and the validator is shown to reject what the specification rejects.
- The wiring the configs expect holds: every bind-mounted file exists, Prometheus's targets are
  compose services on the ports they listen on, Alertmanager's secret files are under a mounted
  directory, Grafana's provisioning and dashboard mounts meet its provider's path.
- The Dockerfile: python:3.11-slim, `pip install`, a non-root user, the run command, and a
  HEALTHCHECK on /readyz whose python one-liner is run here against a local HTTP server answering
  200 (healthy: exit 0) and 503 (unhealthy: exit non-zero).

The stack itself is not started here (no image registry is reachable from the test machines).
"""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml

ROOT = Path(__file__).parents[2]
SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def validator() -> Any:
    schema = json.loads(SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _errors(validator: Any, document: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_is_valid_against_the_compose_specification(validator: Any, compose: dict[str, Any]) -> None:
    assert _errors(validator, compose) == []


@pytest.mark.parametrize("breakage", ["unknown_top_level", "bad_condition", "port_object_typo",
                                      "healthcheck_typo", "duplicate_port"])
def test_the_schema_rejects_what_the_specification_rejects(validator: Any, compose: dict[str, Any],
                                                           breakage: str) -> None:
    broken = copy.deepcopy(compose)
    services = broken["services"]
    if breakage == "unknown_top_level":
        broken["servicess"] = {}
    elif breakage == "bad_condition":
        services["pgsidecar"]["depends_on"]["postgres"]["condition"] = "service_ready"
    elif breakage == "port_object_typo":
        services["grafana"]["ports"] = [{"target": 3000, "publish": 3000}]
    elif breakage == "healthcheck_typo":
        services["postgres"]["healthcheck"]["intervall"] = "5s"
    else:
        services["grafana"]["ports"] = ["3000:3000", "3000:3000"]
    assert _errors(validator, broken), breakage


def test_services_of_the_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "pgsidecar", "prometheus", "alertmanager", "grafana"}
    assert services["postgres"]["image"].startswith("postgres:16")
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    sidecar = services["pgsidecar"]
    assert sidecar["build"] == "."
    assert sidecar["depends_on"]["postgres"]["condition"] == "service_healthy"
    url = sidecar["environment"]["DATABASE_URL"]
    assert re.fullmatch(r"postgresql://app:\$\{POSTGRES_PASSWORD:-[^}]+\}@postgres:5432/app", url), url
    grafana_env = services["grafana"]["environment"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:-[^}]+\}", grafana_env["GF_SECURITY_ADMIN_PASSWORD"])


def _binds(service: dict[str, Any]) -> dict[str, str]:
    """target -> host path of a service's bind mounts (short syntax, relative to the project)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            out[target] = source
    return out


def test_every_bind_mounted_file_exists(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for target, source in _binds(service).items():
            if source == "./secrets":
                continue  # made by the operator, never committed (see the README)
            assert (ROOT / source).exists(), f"{name}: {source} (mounted at {target}) is missing"


def test_prometheus_targets_are_the_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    binds = _binds(services["prometheus"])
    config_path = binds["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load((ROOT / config_path).read_text())
    command = " ".join(services["prometheus"]["command"])
    assert "--config.file=/etc/prometheus/prometheus.yml" in command
    for rule_file in config.get("rule_files", []):
        assert f"/etc/prometheus/{rule_file}" in binds, rule_file
    listening = {"pgsidecar": {"9930", "6432"}, "alertmanager": {"9093"}, "prometheus": {"9090"}}
    targets = [t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    targets += [t for am in config["alerting"]["alertmanagers"] for sc in am["static_configs"] for t in sc["targets"]]
    assert "pgsidecar:9930" in targets and "alertmanager:9093" in targets
    for target in targets:
        host, port = target.rsplit(":", 1)
        if host in ("localhost", "127.0.0.1"):
            continue
        assert host in services and port in listening[host], target


def test_alertmanager_secret_files_are_mounted(compose: dict[str, Any]) -> None:
    service = compose["services"]["alertmanager"]
    binds = _binds(service)
    config = (ROOT / binds["/etc/alertmanager/alertmanager.yml"]).read_text()
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in service["command"]
    files = re.findall(r"_file:\s*(\S+)", config)
    assert files, "alertmanager.yml reads no secret from a file"
    for path in files:
        assert any(path.startswith(target.rstrip("/") + "/") for target in binds), path
    assert "/etc/alertmanager/secrets" in binds and service["volumes"][1].endswith(":ro")


def test_grafana_provisioning_meets_the_mounts(compose: dict[str, Any]) -> None:
    binds = _binds(compose["services"]["grafana"])
    assert binds["/etc/grafana/provisioning"] == "./dashboards/provisioning"
    provider = yaml.safe_load((ROOT / "dashboards/provisioning/dashboards/pgsidecar.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    mounted = [t for t, s in binds.items() if s == "./dashboards/grafana-dashboard.json"]
    assert mounted and all(t.startswith(path.rstrip("/") + "/") for t in mounted), (mounted, path)
    datasource = yaml.safe_load((ROOT / "dashboards/provisioning/datasources/prometheus.yml").read_text())
    host = re.match(r"http://([^:/]+):9090", datasource["datasources"][0]["url"])
    assert host and host.group(1) in compose["services"]


# --- Dockerfile ---------------------------------------------------------------------------------

def _instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_image_user_and_command() -> None:
    steps = _instructions()
    assert steps[0] == ("FROM", "python:3.11-slim")
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    assert "pip install" in runs and "useradd" in runs
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    cmd = json.loads(next(rest for word, rest in steps if word == "CMD"))
    assert cmd == ["pgsidecar", "run", "--listen", "0.0.0.0:6432", "--http", "0.0.0.0:9930"]
    copied = {rest.split()[0] for word, rest in steps if word == "COPY"}
    for package in ("agent", "proxy", "config", "graphql_gateway", "setup.py"):
        assert package in copied, package
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert {".git", "tests/", "secrets/"} <= set(ignored)
    assert not set(ignored) & {"agent", "proxy", "config", "setup.py", "graphql_gateway"}


def _healthcheck() -> list[str]:
    rest = next(rest for word, rest in _instructions() if word == "HEALTHCHECK")
    options, _, command = rest.partition("CMD ")
    assert "--interval=" in options and "--timeout=" in options
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"] and "/readyz" in argv[2] and "curl" not in argv[2]
    return argv


class _Ready(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = json.dumps({"status": "ready" if self.status == 200 else "not_ready"}).encode()
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def ready_server() -> Iterator[tuple[ThreadingHTTPServer, type[_Ready]]]:
    handler = type("Ready", (_Ready,), {"status": 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()


def test_healthcheck_exits_0_when_ready_and_non_zero_when_not(ready_server: Any) -> None:
    server, handler = ready_server
    argv = _healthcheck()
    script = argv[2]
    assert "http://127.0.0.1:9930/readyz" in script
    script = script.replace("127.0.0.1:9930", f"127.0.0.1:{server.server_address[1]}")

    def run() -> int:
        return subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=30).returncode

    assert run() == 0
    handler.status = 503
    assert run() != 0
    server.shutdown()
    server.server_close()
    assert run() != 0  # nothing listening


def test_compose_passwords_have_local_defaults_only() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for var in ("POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        assert re.search(rf"\$\{{{var}:-[^}}]*local[^}}]*\}}", text), var
