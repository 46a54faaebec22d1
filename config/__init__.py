"""Configuration: the ``Settings`` tree and the one loader that builds it."""
from __future__ import annotations

from config.loader import ConfigError, DsnParts, load_settings, parse_dsn, redact_dsn, redacted
from config.settings import Settings

__all__ = ["ConfigError", "DsnParts", "Settings", "load_settings", "parse_dsn", "redact_dsn", "redacted"]
