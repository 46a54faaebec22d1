"""Pure parts of agent/health.py: platform detection from a described environment and file tree,
the shipped alert rules' summary, and the histogram quantile the p95 target is read with."""
from __future__ import annotations

from pathlib import Path

import pytest

from agent.health import alert_rules_summary, detect_platform, histogram_quantile

CONTAINER_ID = "4f3c" + "a" * 60


def test_amvera_is_named_by_its_variables_without_their_values(tmp_path: Path) -> None:
    env = {"AMVERA": "1", "AMVERA_SECRET_TOKEN": "do-not-show", "PATH": "/bin", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    doc = detect_platform(env, tmp_path)
    assert doc["name"] == "amvera" and doc["detected_by"] == "AMVERA"
    assert doc["variables"] == ["AMVERA", "AMVERA_SECRET_TOKEN"]
    assert "do-not-show" not in repr(doc)


def test_kubernetes_namespace_from_the_service_account_and_pod_from_env(tmp_path: Path) -> None:
    sa = tmp_path / "var/run/secrets/kubernetes.io/serviceaccount"
    sa.mkdir(parents=True)
    (sa / "namespace").write_text("payments\n")
    (sa / "token").write_text("a-service-account-token")
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443", "HOSTNAME": "api-7d9f-x2",
           "NODE_NAME": "node-3"}
    doc = detect_platform(env, tmp_path)
    assert doc == {"name": "kubernetes", "detected_by": "KUBERNETES_SERVICE_HOST", "namespace": "payments",
                   "pod": "api-7d9f-x2", "node": "node-3", "api_server": "10.96.0.1:443"}
    assert "a-service-account-token" not in repr(doc)
    env["POD_NAMESPACE"], env["POD_NAME"] = "staging", "api-0"
    doc = detect_platform(env, tmp_path)
    assert (doc["namespace"], doc["pod"]) == ("staging", "api-0")


def test_docker_from_dockerenv_or_cgroup(tmp_path: Path) -> None:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text(f"0::/system.slice/docker-{CONTAINER_ID}.scope\n")
    doc = detect_platform({}, tmp_path)
    assert doc["name"] == "docker" and doc["detected_by"] == "/proc/self/cgroup"
    assert doc["container_id"] == CONTAINER_ID
    (tmp_path / ".dockerenv").write_text("")
    assert detect_platform({}, tmp_path)["detected_by"] == "/.dockerenv"


def test_bare_host_otherwise(tmp_path: Path) -> None:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text("0::/user.slice/user-1000.slice/session-2.scope\n")
    doc = detect_platform({"HOME": "/root"}, tmp_path)
    assert doc["name"] == "bare_host" and doc["detected_by"] is None and doc["hostname"]


def test_alert_rules_summary(tmp_path: Path) -> None:
    path = tmp_path / "alert_rules.yml"
    assert alert_rules_summary(path)["status"] == "missing"
    assert alert_rules_summary(path)["alerts"] == 0
    path.write_text("""
groups:
  - name: pgsidecar
    rules:
      - alert: HighErrorRate
        expr: x > 0.05
      - record: pgsidecar:error_ratio
        expr: x
  - name: process
    rules:
      - alert: HighMemoryUsage
        expr: y > 500
""")
    doc = alert_rules_summary(path)
    assert doc["status"] == "shipped" and doc["groups"] == 2 and doc["recording"] == 1
    assert doc["alerts"] == 2 and doc["names"] == ["HighErrorRate", "HighMemoryUsage"]
    path.write_text("groups: [unclosed")
    doc = alert_rules_summary(path)
    assert doc["status"] == "invalid" and doc["alerts"] == 0 and doc["error"]


@pytest.mark.parametrize("cumulative,expected", [
    ([0, 0, 0, 0], None),  # nothing observed
    ([100, 100, 100, 100], 0.95 * 0.1),  # all in the first bucket: linear from 0
    ([0, 100, 100, 100], 0.1 + (0.5 - 0.1) * 0.95),
    ([50, 90, 100, 100], 0.5 + (1.0 - 0.5) * 0.5),  # rank 95 halfway into the third bucket
    ([0, 0, 0, 10], 1.0),  # all above the last bound: the last finite bound (as Prometheus)
])
def test_histogram_quantile(cumulative: list[int], expected: float | None) -> None:
    got = histogram_quantile(0.95, (0.1, 0.5, 1.0), cumulative)
    assert got == (None if expected is None else pytest.approx(expected))
