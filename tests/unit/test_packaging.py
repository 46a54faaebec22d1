"""What ``pip install .`` (the README's first command) puts in site-packages: every package of ours.

setup.py lists its packages by name; a subpackage missing from the list installs nothing of it,
and ``pgsidecar run`` fails at import on a fresh machine while the editable install the tests use
still works. This compares the list with the packages on disk."""
from __future__ import annotations

import ast
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL = ("agent", "proxy", "config", "graphql_gateway", "migrations")


def _setup_kwargs() -> dict[str, object]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(node for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords
            if kw.arg in ("packages", "package_data")}


def test_setup_py_lists_every_package_on_disk() -> None:
    on_disk = set(find_packages(str(ROOT), include=[f"{name}*" for name in TOP_LEVEL]))
    assert on_disk >= set(TOP_LEVEL)
    assert set(_setup_kwargs()["packages"]) == on_disk  # type: ignore[arg-type]


def test_package_data_names_files_that_exist() -> None:
    data = _setup_kwargs()["package_data"]
    assert isinstance(data, dict)
    for package, patterns in data.items():
        for pattern in patterns:
            assert list((ROOT / package.replace(".", "/")).glob(pattern)), (package, pattern)


def test_the_docker_build_context_holds_every_package_setup_py_installs() -> None:
    """The Dockerfile copies setup.py and the package folders one COPY at a time, and
    .dockerignore leaves folders out of the build context: a package that setup.py lists but
    the image does not get stops ``pip install`` inside ``docker build`` ("package directory
    'migrations' does not exist", as once happened)."""
    copied = set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and len(words) == 3 and words[2].startswith("/tmp/pgsidecar"):
            copied.add(words[1].rstrip("/"))
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert "setup.py" in copied and "setup.py" not in ignored
    packages = _setup_kwargs()["packages"]
    assert isinstance(packages, list)
    for top in {name.split(".")[0] for name in packages}:
        assert top in copied, f"the Dockerfile does not COPY {top}/, which setup.py installs"
        assert top not in ignored, f".dockerignore leaves out {top}/, which setup.py installs"
