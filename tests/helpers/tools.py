"""The external programs the tests run for real (promtool, prometheus, amtool, ...).

CI installs them (``.ci/run``: Debian's prometheus and prometheus-alertmanager packages). A test
that needs one and does not find it fails, naming the package: it never skips, because a skipped
check proves nothing.
"""
from __future__ import annotations

import shutil

import pytest

PACKAGES = {
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "amtool": "prometheus-alertmanager",
}


def tool(name: str) -> str:
    """The path of program ``name``; fails the test when it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: it comes with the Debian package {PACKAGES.get(name, name)}, "
                    f"which .ci/run installs", pytrace=False)
    return path


def promtool_check_metrics(text: str) -> tuple[int, str]:
    """(exit code, what it printed) of ``promtool check metrics`` on a scrape."""
    import subprocess

    done = subprocess.run([tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True,
                          timeout=30)
    return done.returncode, (done.stdout + done.stderr).strip()
