"""Imports point one way (CONVENTIONS.md): config imports nothing of ours; proxy never imports
aiohttp, prometheus_client, graphql or agent; inside proxy, the layers only look down."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OURS = {"config", "proxy", "agent", "graphql_gateway"}
PROXY_ORDER = ["errors", "protocol", "_speedups", "frames", "auth", "server", "pool", "recorder", "invalidation", "caching", "client", "listener"]
PROXY_LEAVES = {"fingerprint", "cache", "columns", "stats", "explain"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    # Imports under ``if TYPE_CHECKING:`` are annotations only, not runtime dependencies.
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level and node.module:  # relative: inside the same package
                found.add(f".{node.module}")
            elif node.level:  # from . import x
                found.update(f".{alias.name}" for alias in node.names)
            elif node.module:
                found.add(node.module)
    return found


def test_config_imports_nothing_of_ours() -> None:
    for path in (ROOT / "config").glob("*.py"):
        bad = {m for m in _imports(path) if m.split(".")[0] in OURS - {"config"} or m.startswith(".")
               and m[1:].split(".")[0] not in {"", "settings", "loader"}}
        assert not bad, f"{path.name} imports {bad}"


def test_proxy_does_not_import_the_agent_or_web_stacks() -> None:
    forbidden = {"aiohttp", "prometheus_client", "graphql", "agent", "graphql_gateway"}
    for path in (ROOT / "proxy").glob("*.py"):
        bad = {m for m in _imports(path) if m.split(".")[0] in forbidden}
        assert not bad, f"proxy/{path.name} imports {bad}"


def test_proxy_layers_only_import_downwards() -> None:
    for path in (ROOT / "proxy").glob("*.py"):
        name = path.stem
        if name == "__init__":
            continue
        rank = PROXY_ORDER.index(name) if name in PROXY_ORDER else -1
        for module in _imports(path):
            if not module.startswith("."):
                continue
            target = module[1:].split(".")[0]
            if target in PROXY_LEAVES or name in PROXY_LEAVES:
                assert target not in PROXY_ORDER[PROXY_ORDER.index("server"):] or name not in PROXY_LEAVES, (
                    f"leaf proxy/{name}.py imports proxy/{target}.py"
                )
                continue
            assert rank >= 0 and target in PROXY_ORDER, f"unexpected module proxy/{target} in {name}"
            assert PROXY_ORDER.index(target) < rank, f"proxy/{name}.py imports proxy/{target}.py (upwards)"


def test_the_cache_knows_the_webhook_triggers_by_their_names() -> None:
    """proxy may not import agent: the cache's copy of the webhook triggers' names and tables
    must match the emitter's (else every write to a watched table would flush the cache)."""
    from agent.webhooks import sql
    from proxy import invalidation

    assert invalidation.WEBHOOK_TRIGGERS == (sql.ROW_TRIGGER, sql.TRUNCATE_TRIGGER)
    assert set(invalidation.WEBHOOK_WRITES) == {"webhook_events", "webhook_deliveries"}
    assert set(invalidation.WEBHOOK_WRITES) <= set(sql.TABLES)
