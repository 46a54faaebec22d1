"""The seed's entry point: ``python scripts/run_migrations.py [--to REV | --down REV | --status] [--sql]``
is ``pgsidecar migrate`` with the same options (DSN from DATABASE_URL / upstream.dsn)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["migrate", *sys.argv[1:]]))
